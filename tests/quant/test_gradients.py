"""Closed-form gradient oracles of docs/method.md section 3, compared with autograd.

The oracles are written from the spec's formulas (3.1-3.5) with plain tensor expressions in
float64, independently of the implementation's chain of STE primitives.
"""

from __future__ import annotations

import math

import pytest
import torch

from mixq.quant import Pow2Quantizer, UniformQuantizer

LN2 = math.log(2.0)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)  # exact enough in float64


def _pow2round(v: float) -> float:
    return 2.0 ** math.floor(math.log2(v) + 0.5)


def _probe(x_hi: float, d_q: float, n: int = 400) -> torch.Tensor:
    """Random values plus the hard cases: exact zeros, +-x_hi, beyond, grid points and ties."""
    g = torch.Generator().manual_seed(1)
    rnd = torch.randn(n, generator=g, dtype=torch.float64) * x_hi
    k = torch.arange(-4, 5, dtype=torch.float64)
    special = torch.tensor([0.0, 0.0, x_hi, -x_hi, 2 * x_hi, -3 * x_hi], dtype=torch.float64)
    return torch.cat([rnd, special, k * d_q, (k + 0.5) * d_q]).float()


def _run(q, x):
    x = x.clone().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y = q(x)
    (y * g).sum().backward()
    grads = {n: getattr(q, n).grad.double() for n in q.param_names}
    return y.detach().double(), x.grad.double(), grads, g.double(), x.detach().double()


def _uniform_common(q, x):
    y, gx, grads, g, x = _run(q, x)
    d_q, x_hi = (float(t.detach()) for t in q.derived())
    lo = -x_hi if q.signed else 0.0
    c = x.clamp(lo, x_hi)
    y_ref = d_q * _round_half_away(c / d_q)
    hi_out = x >= x_hi
    lo_out = x <= -x_hi if q.signed else torch.zeros_like(hi_out)
    out_sign = hi_out.double() - lo_out.double()
    inside = (x > lo) & (x < x_hi)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, torch.where(inside, g, 0.0))
    return grads, g, x, y, c, d_q, x_hi, out_sign


SIGNS = [True, False]


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("d,q_max", [(0.1, 0.95), (2**-3, 0.875), (0.03, 0.4)])
def test_u3_d_qmax(signed, d, q_max):
    q = UniformQuantizer("d_qmax", signed=signed, d=d, q_max=q_max)
    grads, g, _x, y, c, _d_q, _x_hi, out_sign = _uniform_common(q, _probe(q_max, _pow2round(d)))
    # 3.2: dL/dd = sum g (y - c) / d (raw d); dL/dq_max = sum_out g sign(x)
    torch.testing.assert_close(grads["d"], (g * (y - c)).sum() / d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["q_max"], (g * out_sign).sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("b,q_max", [(4.0, 0.95), (3.3, 0.6), (5.0, 2.0)])
def test_u2_b_qmax(signed, b, q_max):
    q = UniformQuantizer("b_qmax", signed=signed, b=b, q_max=q_max)
    n_eff = round(b) - int(signed)
    d_q = _pow2round(q_max / (2**n_eff - 1))
    grads, g, _x, y, c, d_q2, x_hi, out_sign = _uniform_common(q, _probe(q_max, d_q))
    assert d_q2 == d_q
    ref_qmax = (g * (y - c)).sum() / x_hi + (g * out_sign).sum()
    ref_b = -(2**n_eff * LN2 / (2**n_eff - 1)) * (g * (y - c)).sum()
    torch.testing.assert_close(grads["q_max"], ref_qmax, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["b"], ref_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("b,d", [(4.0, 0.1), (2.4, 0.2), (6.0, 0.01)])
def test_u1_b_d(signed, b, d):
    q = UniformQuantizer("b_d", signed=signed, b=b, d=d)
    n_eff = round(b) - int(signed)
    d_q = _pow2round(d)
    grads, g, x, y, _c, _, x_hi, out_sign = _uniform_common(q, _probe(d_q * (2**n_eff - 1), d_q))
    assert x_hi == d_q * (2**n_eff - 1)
    inside = out_sign == 0
    if not signed:
        inside = inside & (x > 0)
    ref_d = (g * (y - x))[inside].sum() / d + (2**n_eff - 1) * (d_q / d) * (g * out_sign).sum()
    ref_b = d_q * 2**n_eff * LN2 * (g * out_sign).sum()
    torch.testing.assert_close(grads["d"], ref_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["b"], ref_b, rtol=1e-4, atol=1e-5)


def _pow2_common(q, x):
    y, gx, grads, g, x = _run(q, x)
    x_min, x_max = (float(t.detach()) for t in q.derived())
    if q.signed:
        a, s = x.abs(), torch.where(x < 0, -1.0, 1.0).double()
    else:
        a, s = x.clamp(min=0), torch.ones_like(x)
    p = torch.exp2(_round_half_away(torch.log2(a)))
    r3 = a >= x_max
    r2 = (a >= x_min) & ~r3
    r1 = a < x_min
    if q.with_zero:
        r1 = r1 & (a >= x_min / math.sqrt(2))
    mag = torch.where(r3, x_max, torch.where(r2, p, torch.where(r1, x_min, 0.0)))
    assert torch.equal(y, s * mag)
    gx_ref = torch.where(r2, g * p / torch.where(r2, a, 1.0), 0.0)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(gx).all()
    return grads, (g * s)[r1].sum(), (g * s)[r3].sum(), x_min, x_max


def _probe_pow2(x_min: float, x_max: float) -> torch.Tensor:
    x = _probe(x_max, x_min)
    extra = torch.tensor([x_min, -x_min, x_min / 1.5, x_min * 0.7, x_max * 0.9, x_max * 1.3])
    return torch.cat([x, extra, -extra])


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("q_min,q_max", [(0.01, 0.9), (2**-6, 2.0), (0.3, 0.31)])
def test_p3_qmin_qmax(signed, q_min, q_max):
    q = Pow2Quantizer("qmin_qmax", signed=signed, q_min=q_min, q_max=q_max)
    grads, s1, s3, x_min, x_max = _pow2_common(q, _probe_pow2(_pow2round(q_min), _pow2round(q_max)))
    torch.testing.assert_close(grads["q_min"], x_min / q_min * s1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["q_max"], x_max / q_max * s3, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("b,q_max", [(4.0, 0.9), (3.0, 2.5), (2.2, 0.5)])
def test_p2_b_qmax(signed, b, q_max):
    q = Pow2Quantizer("b_qmax", signed=signed, b=b, q_max=q_max)
    n_eff = round(b) - 1  # signed weights: sign bit; unsigned activations: zero code
    grads, s1, s3, x_min, x_max = _pow2_common(q, _probe_pow2(1e-3, _pow2round(q_max)))
    assert x_min == x_max * 2.0 ** (-(2**n_eff) + 1)
    ref_qmax = x_max / q_max * (s3 + 2.0 ** (-(2**n_eff) + 1) * s1)
    ref_b = -(LN2**2) * 2**n_eff * x_min * s1
    torch.testing.assert_close(grads["q_max"], ref_qmax, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["b"], ref_b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("b,q_min", [(3.0, 0.01), (2.2, 0.3), (4.0, 2**-7)])
def test_p1_b_qmin(signed, b, q_min):
    q = Pow2Quantizer("b_qmin", signed=signed, b=b, q_min=q_min)
    n_eff = round(b) - 1
    x_min = _pow2round(q_min)
    grads, s1, s3, x_min2, x_max = _pow2_common(q, _probe_pow2(x_min, x_min * 2 ** (2**n_eff - 1)))
    assert x_min2 == x_min
    ref_qmin = x_min / q_min * (s1 + 2.0 ** (2**n_eff - 1) * s3)
    ref_b = LN2**2 * 2**n_eff * x_max * s3
    torch.testing.assert_close(grads["q_min"], ref_qmin, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["b"], ref_b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,value", [("d", 0.5), ("q_max", 0.6)])
def test_no_gradient_outside_parameter_clip_range(name, value):
    """Spec 3: a raw parameter outside its clip range gets zero gradient (strict clip)."""
    q = UniformQuantizer("d_qmax", d=0.125, q_max=0.375, d_max=0.25, q_max_max=0.5)
    getattr(q, name).data.fill_(value)  # beyond its upper bound, as an optimizer step may leave it
    q(torch.randn(1000) * 2).sum().backward()
    assert getattr(q, name).grad.item() == 0.0


def test_pow2_zero_input_gradients_are_finite():
    """Decision 9: log(0) in the pow-2 backward must not produce NaN (signed weights at 0)."""
    for p in ("qmin_qmax", "b_qmax", "b_qmin"):
        for signed in SIGNS:
            q = Pow2Quantizer(p, signed=signed)
            x = torch.zeros(10, requires_grad=True)
            q(x).sum().backward()
            assert torch.isfinite(x.grad).all()
            assert all(torch.isfinite(getattr(q, n).grad) for n in q.param_names)
