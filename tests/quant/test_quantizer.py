"""Module-level behaviour: bitwidth surrogate gradients (spec 5.2), projection (1.5), gradient
clipping (3.6), initialisation (6) and errors."""

from __future__ import annotations

import math

import pytest
import torch

from mixq.quant import Pow2Quantizer, UniformQuantizer, make_quantizer, parse_spec

LN2 = math.log(2.0)


@pytest.mark.parametrize("signed", [True, False])
def test_u3_surrogate_gradient(signed):
    d, q_max = 0.1, 0.95
    q = UniformQuantizer("d_qmax", signed=signed, d=d, q_max=q_max)
    d_q = 2.0 ** round(math.log2(d))
    r = round(q_max / d_q)
    b = q.bitwidth_surrogate()
    assert b.item() == math.ceil(math.log2(r + 1) + int(signed)) == q.bitwidth
    b.backward()
    ref_qmax = 1 / (LN2 * (r + 1) * d_q)
    ref_d = -q_max / (LN2 * (r + 1) * d_q**2) * (d_q / d)
    assert q.q_max.grad.item() == pytest.approx(ref_qmax, rel=1e-5)
    assert q.d.grad.item() == pytest.approx(ref_d, rel=1e-5)


def test_u3_surrogate_zero_gradient_at_floor():
    q = UniformQuantizer("d_qmax", signed=True, d=0.5, q_max=0.6)  # k = 1 -> b = 2 = b_min
    assert q.bitwidth == 2
    s = q.bitwidth_surrogate()
    assert s.item() == 2.0
    s.backward()
    assert q.d.grad.item() == 0.0 and q.q_max.grad.item() == 0.0


def test_p3_surrogate_gradient():
    q_min, q_max = 0.01, 0.9
    q = Pow2Quantizer("qmin_qmax", q_min=q_min, q_max=q_max)
    L = round(math.log2(2.0 ** round(math.log2(q_max)) / 2.0 ** round(math.log2(q_min))))
    s = q.bitwidth_surrogate()
    assert s.item() == math.ceil(math.log2(L + 1) + 1) == q.bitwidth
    s.backward()
    assert q.q_max.grad.item() == pytest.approx(1 / (LN2**2 * (L + 1) * q_max), rel=1e-5)
    assert q.q_min.grad.item() == pytest.approx(-1 / (LN2**2 * (L + 1) * q_min), rel=1e-5)


@pytest.mark.parametrize(
    "q", [UniformQuantizer("b_d", b=3.3, d=0.1), Pow2Quantizer("b_qmin", b=3.3, q_min=0.01)]
)
def test_explicit_b_surrogate(q):
    s = q.bitwidth_surrogate()
    assert s.item() == 3 == q.bitwidth
    s.backward()
    assert q.b.grad.item() == 1.0


def test_bitwidth_rounds_half_away():
    assert UniformQuantizer("b_d", b=2.5, d=0.1).bitwidth == 3
    assert UniformQuantizer("b_qmax", b=3.49, q_max=1.0).bitwidth == 3


def test_constrain_swaps_crossed_pair_and_fixes_b():
    q = UniformQuantizer("d_qmax", d=0.1, q_max=0.9)
    with torch.no_grad():
        q.d.fill_(0.5)
        q.q_max.fill_(0.3)
    q.constrain_()
    assert q.d.item() == pytest.approx(0.3 - 1e-5) and q.q_max.item() == pytest.approx(0.5 + 1e-5)
    fixed = UniformQuantizer("b_qmax", b=2.0, q_max=0.5, b_min=2, b_max=2)  # TQT: b fixed
    fixed.constrain_()
    assert fixed.b.item() == pytest.approx(2 - 1e-5)
    assert fixed.bitwidth == 2
    fixed(torch.randn(100)).sum().backward()
    assert fixed.b.grad.item() == 0.0


def test_clip_grad():
    q = UniformQuantizer("d_qmax", d=0.125, q_max=0.875)
    q.d.grad = torch.tensor(5.0)
    q.q_max.grad = torch.tensor(-5.0)
    q.clip_grad_()
    assert q.d.grad.item() == 0.125 and q.q_max.grad.item() == -0.125
    p = Pow2Quantizer("qmin_qmax", q_min=2**-6, q_max=1.0)
    p.q_min.grad, p.q_max.grad = torch.tensor(1.0), torch.tensor(1e-3)
    p.clip_grad_()
    assert p.q_min.grad.item() == pytest.approx(2**-6, rel=1e-3)
    assert p.q_max.grad.item() == pytest.approx(1e-3)
    u1 = UniformQuantizer("b_d", b=4, d=0.1)
    u1.d.grad = torch.tensor(5.0)
    u1.clip_grad_()
    assert u1.d.grad.item() == 5.0


def test_init_from_tensor_weight_rule():
    w = torch.tensor([0.3, -0.9, 0.1])
    q = UniformQuantizer("d_qmax")
    q.init_from_tensor(w, b=4)
    # d0 = 2^floor(log2(0.9 / 7)) = 2^-3, q_max0 = 7 d0 = 0.875, inferred b = 4
    assert q.d.item() == 0.125 and q.q_max.item() == 0.875 and q.bitwidth == 4
    q8 = UniformQuantizer("d_qmax")
    q8.init_from_tensor(w, b=8)  # ceil above 4 bits
    assert q8.d.item() == 2.0 ** math.ceil(math.log2(0.9 / 127))
    u1 = UniformQuantizer("b_d")
    u1.init_from_tensor(w, b=2)
    assert u1.b.item() == 2 - 0 or u1.b.item() == pytest.approx(2 + 1e-5)
    assert u1.bitwidth == 2
    p3 = Pow2Quantizer("qmin_qmax")
    p3.init_from_tensor(w, b=4)
    assert p3.q_max_effective == 1.0 and p3.q_min_effective == 2**-7 and p3.bitwidth == 4


def test_activation_default_init():
    """Spec 6: activations start at d0 = 2^-3, q_max0 = 1.875 (4 bits); pow-2 2 and 2^-6."""
    u = UniformQuantizer("d_qmax", signed=False)
    assert u.d.item() == 0.125 and u.q_max.item() == 1.875 and u.bitwidth == 4
    p = Pow2Quantizer("qmin_qmax", signed=False)
    assert p.q_max_effective == 2.0 and p.q_min_effective == 2**-6 and p.bitwidth == 4
    assert p.with_zero and not Pow2Quantizer("qmin_qmax").with_zero
    p6 = Pow2Quantizer("qmin_qmax", signed=False)
    p6.reset_parameters(b=6)
    assert p6.q_max_effective == 8.0 and p6.q_min_effective == 2**-14


@pytest.mark.parametrize(
    "ctor,match",
    [
        (lambda: UniformQuantizer("d_xmax"), "unknown uniform parametrization 'd_xmax'.*d_qmax"),
        (lambda: Pow2Quantizer("d_qmax"), "valid: \\['b_qmax', 'b_qmin', 'qmin_qmax'\\]"),
        (lambda: UniformQuantizer("d_qmax", d=0.1), "missing \\['q_max'\\]"),
        (lambda: UniformQuantizer("d_qmax", d=0.1, q_max=1, b=4), "superfluous \\['b'\\]"),
        (lambda: UniformQuantizer("d_qmax", d=2.0, q_max=4.0), "d=2.0 is out of bounds"),
        (lambda: Pow2Quantizer("b_qmin", b=9, q_min=0.1), "b=9 is out of bounds"),
        (lambda: UniformQuantizer("b_d", b=4, d=0.1, b_min=5, b_max=4), "b_min=5"),
        (lambda: UniformQuantizer("b_d", b=4, d=0.1, dmin=1), "unknown bound"),
        (lambda: parse_spec("uniformm/d_qmax"), "Did you mean 'uniform'"),
        (lambda: parse_spec("uniform"), "must look like"),
        (lambda: make_quantizer("pow2/qmin_qmx", signed=True), "Did you mean 'qmin_qmax'"),
    ],
)
def test_errors(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_encoding_and_derived_properties():
    u = UniformQuantizer("d_qmax", d=0.1, q_max=0.95)
    e = u.encoding()
    assert e["d"] == 0.125 and e["k"] == 8 and e["bitwidth"] == 5
    assert u.q_max_effective == 1.0 and u.clip_bound == pytest.approx(0.95)
    p = Pow2Quantizer("b_qmax", b=3, q_max=1.0)
    assert p.encoding()["L"] == 3 and p.q_min_effective == 0.125


def test_pow2_step_off_gives_free_step():
    q = UniformQuantizer("d_qmax", d=0.1, q_max=0.95, pow2_step=False)
    assert q.step == pytest.approx(0.1)
    y = q(torch.tensor([0.26]))
    assert y.item() == pytest.approx(0.3)


def test_learnable_false_freezes():
    q = UniformQuantizer("b_d", b=2, d=0.25, learnable=False)
    assert not any(p.requires_grad for p in q.parameters())
    x = torch.randn(10, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None


def test_forward_any_shape_and_dtype():
    q = UniformQuantizer("d_qmax")
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y = q(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    x_cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert q(x_cl).shape == x_cl.shape
