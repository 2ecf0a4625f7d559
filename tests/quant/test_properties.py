"""Hypothesis property tests of the six quantizers (design.md section 5)."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mixq.quant import Pow2Quantizer, UniformQuantizer
from mixq.quant.bounds import default_bounds

pow2_exp = st.integers(min_value=-8, max_value=0)


@st.composite
def uniform_q(draw):
    """A uniform quantizer of any parametrization with valid, interior parameters."""
    p = draw(st.sampled_from(["b_d", "b_qmax", "d_qmax"]))
    signed = draw(st.booleans())
    b_lo = 2 if signed else 1
    if p == "b_d":
        kw = {
            "b": draw(st.integers(b_lo, 8)) + draw(st.floats(-0.4, 0.4)),
            "d": draw(st.floats(2**-7, 0.9)),
        }
        kw["b"] = min(max(kw["b"], b_lo + 0.01), 7.99)
    elif p == "b_qmax":
        kw = {"b": draw(st.floats(b_lo + 0.01, 7.99)), "q_max": draw(st.floats(0.01, 20.0))}
    else:
        d = draw(st.floats(2**-7, 0.9))
        kw = {"d": d, "q_max": min(d * draw(st.floats(1.01, 200.0)), 120.0)}
    return UniformQuantizer(p, signed=signed, **kw)


@st.composite
def pow2_q(draw):
    p = draw(st.sampled_from(["b_qmax", "b_qmin", "qmin_qmax"]))
    signed = draw(st.booleans())
    b = draw(st.floats(2.01 if signed else 1.01, 4.49))  # keep 2^(2^(b-1)) finite and small
    if p == "b_qmax":
        kw = {"b": b, "q_max": draw(st.floats(0.01, 50.0))}
    elif p == "b_qmin":
        kw = {"b": b, "q_min": draw(st.floats(1e-3, 1.0))}
    else:
        q_min = draw(st.floats(2**-8, 1.0))
        kw = {"q_min": q_min, "q_max": min(q_min * draw(st.floats(1.0, 5000.0)), 100.0)}
    return Pow2Quantizer(p, signed=signed, **kw)


def _inputs(draw_seed: int, scale: float, n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw_seed)
    x = torch.randn(n, generator=g) * scale
    x[:8] = 0.0
    return x


@given(uniform_q(), st.integers(0, 10**6))
def test_uniform_grid_bounds_levels(q, seed):
    with torch.no_grad():
        d_q, x_hi = (float(t) for t in q.derived())
        x = _inputs(seed, 2 * x_hi)
        y = q(x)
    codes = y / d_q
    assert torch.equal(codes, torch.round(codes)), "outputs must lie on the grid d_q * Z"
    k = q.levels  # = round(x_hi / d_q)
    assert k == round(x_hi / d_q) or abs(x_hi / d_q - round(x_hi / d_q)) == 0.5
    assert y.abs().max() <= k * d_q
    assert (y >= 0).all() or q.signed
    n_levels = len(torch.unique(y))
    need = (2 * k + 1) if q.signed else (k + 1)
    assert n_levels <= need
    if q.parametrization == "d_qmax":  # U3 bitwidth covers every level (U2 may overflow, 1.3)
        assert need <= 2**q.bitwidth
    if q.parametrization == "b_d":
        assert k == 2 ** (q.bitwidth - int(q.signed)) - 1


@given(uniform_q(), st.integers(0, 10**6))
def test_uniform_idempotent_monotone_symmetric_error(q, seed):
    with torch.no_grad():
        d_q, x_hi = (float(t) for t in q.derived())
        x = torch.sort(_inputs(seed, 2 * x_hi)).values
        y = q(x)
        assert torch.equal(q(y), y), "Q(Q(x)) == Q(x)"
        assert (y[1:] >= y[:-1]).all(), "monotone non-decreasing"
        if q.signed:
            assert torch.equal(q(-x), -y), "odd symmetry"
        inside = x.abs() <= x_hi if q.signed else (x >= 0) & (x <= x_hi)
        assert ((y - x)[inside].abs() <= d_q / 2 + 1e-6).all()


@given(pow2_q(), st.integers(0, 10**6))
def test_pow2_grid_bounds_levels(q, seed):
    with torch.no_grad():
        x_min, x_max = (float(t) for t in q.derived())
        x = _inputs(seed, 2 * x_max)
        y = q(x)
    mag = y.abs()
    nz = mag[mag > 0]
    e = torch.log2(nz)
    assert torch.equal(e, torch.round(e)), "non-zero outputs are powers of two"
    assert (nz >= x_min).all() and (nz <= x_max).all()
    if not q.with_zero:
        assert (mag > 0).all(), "zero is not representable without with_zero"
    if not q.signed:
        assert (y >= 0).all()
    assert len(torch.unique(y)) <= 2**q.bitwidth


@given(pow2_q(), st.integers(0, 10**6))
def test_pow2_idempotent_monotone_symmetric_relative_error(q, seed):
    with torch.no_grad():
        x_min, x_max = (float(t) for t in q.derived())
        x = torch.sort(_inputs(seed, 2 * x_max)).values
        y = q(x)
        assert torch.equal(q(y), y)
        if q.signed and not q.with_zero:
            # monotone except at the sign flip of x = 0 -> +x_min (sign(0) = +1)
            assert (y[1:] >= y[:-1]).all()
            nz = x != 0
            assert torch.equal(q(-x[nz]), -y[nz])
        else:
            assert (y[1:] >= y[:-1]).all()
        a = x.abs()
        r2 = (a >= x_min) & (a <= x_max) & ((x > 0) | q.signed)
        rel = y[r2].abs() / a[r2]
        assert (rel <= math.sqrt(2) + 1e-5).all() and (rel >= 1 / math.sqrt(2) - 1e-5).all()


@given(uniform_q())
def test_uniform_parametrizations_agree_forward(q):
    """U1/U2/U3 with equal derived (d_q, x_hi) give identical outputs."""
    with torch.no_grad():
        d_q, x_hi = (float(t) for t in q.derived())
    k = q.levels
    assume(k >= 1)
    n_eff = math.ceil(math.log2(k + 1))
    b = n_eff + int(q.signed)
    assume(2 <= b <= 8 if q.signed else 1 <= b <= 8)
    # a grid-aligned range representable by all three
    x_hi = d_q * (2**n_eff - 1)
    assume(x_hi <= 100 and 2**-8 <= d_q <= 1.0)
    u1 = UniformQuantizer("b_d", signed=q.signed, b=b, d=d_q)
    u2 = UniformQuantizer("b_qmax", signed=q.signed, b=b, q_max=x_hi)
    u3 = UniformQuantizer("d_qmax", signed=q.signed, d=d_q, q_max=x_hi)
    x = torch.randn(500) * 2 * x_hi
    with torch.no_grad():
        y1, y2, y3 = u1(x), u2(x), u3(x)
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    assert u1.bitwidth == u2.bitwidth == u3.bitwidth == b


@given(st.integers(-4, 4), st.integers(1, 3), st.booleans())
def test_pow2_parametrizations_agree_forward(e_min, n_eff, signed):
    b = n_eff + 1
    span = 2**n_eff - 1
    x_min = 2.0**e_min * 2**-4
    x_max = x_min * 2.0**span
    assume(x_max <= 100 and x_max >= 2**-8 and x_min >= 2**-14)
    kw = {"signed": signed}
    p1 = Pow2Quantizer("b_qmin", b=b, q_min=x_min, **kw)
    p2 = Pow2Quantizer("b_qmax", b=b, q_max=x_max, **kw)
    p3 = Pow2Quantizer("qmin_qmax", q_min=x_min, q_max=x_max, **kw)
    x = torch.randn(500) * x_max
    with torch.no_grad():
        y1, y2, y3 = p1(x), p2(x), p3(x)
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    assert p1.bitwidth == p2.bitwidth == p3.bitwidth == b


@given(uniform_q())
def test_uniform_x_gradient_is_ste(q):
    _d_q, x_hi = (float(t.detach()) for t in q.derived())
    x = (torch.randn(300) * 2 * x_hi).requires_grad_(True)
    q(x).sum().backward()
    lo = -x_hi if q.signed else 0.0
    inside = (x > lo) & (x < x_hi)
    assert torch.equal(x.grad, inside.float())


@given(st.one_of(uniform_q(), pow2_q()))
def test_surrogate_equals_bitwidth_and_constrain_is_projection(q):
    assert float(q.bitwidth_surrogate().detach()) == q.bitwidth
    before = {n: getattr(q, n).detach().clone() for n in q.param_names}
    q.constrain_()
    once = {n: getattr(q, n).detach().clone() for n in q.param_names}
    q.constrain_()
    for n in q.param_names:
        assert torch.equal(once[n], getattr(q, n).detach()), "constrain_ is idempotent"
        # in-bounds values (interior by more than the margin) are unchanged
        lo, hi = q.bounds.range(n)
        pair_ok = q.param_names[0] == "b" or (
            before[q.param_names[0]] < before[q.param_names[1]] - 1e-5
        )
        if pair_ok and lo + 1e-5 < before[n] < hi - 1e-5:
            assert torch.equal(before[n], once[n])


@given(st.floats(2**-8 + 1e-4, 1.0 - 1e-4), st.floats(0.0, 130.0), st.booleans())
def test_u3_bitwidth_is_smallest_covering(d, q_max, signed):
    """b is the smallest integer whose grid covers q_max/d (spec 1.3, 5.2)."""
    lo, hi = default_bounds("uniform", signed).range("q_max")
    assume(max(lo, 2**-8) <= q_max <= hi)  # the constructor refuses out-of-bounds values
    q = UniformQuantizer("d_qmax", signed=signed, d=d, q_max=q_max)
    q.constrain_()
    k = q.levels
    levels = 2 * k + 1 if signed else k + 1
    b = q.bitwidth
    b_min = 2 if signed else 1
    assert 2**b >= levels
    assert b == b_min or 2 ** (b - 1) < levels
    step = q.step
    assert step == 2.0 ** round(math.log2(step)), "d_q is a power of two"
