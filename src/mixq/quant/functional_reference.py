"""Reference fake-quantization: docs/method.md section 3 written out op by op (``MIXQ_KERNEL=
reference``).

This is the implementation the fast paths of ``functional.py`` are tested against (bit-identical
forward values, gradients equal up to the summation order of the two parameter reductions). It
saves only ``x`` and recomputes everything in the backward pass, one PyTorch op per formula.

Uniform (spec 1.2, 3.1), ``x_lo = -x_hi`` (signed) or ``0`` (unsigned)::

    c = min(max(x, x_lo), x_hi),   y = d_q * round_half_away(c / d_q)
    dy/dx = [x_lo < x < x_hi],     dL/dd_q = sum g (y - c) / d_q,   dL/dx_hi = sum_out g sign(x)

Power-of-two (spec 2.2, 3.5), ``a = |x|`` (``max(x, 0)`` unsigned), ``s = sign(x)`` (+1 at 0)::

    p = 2^round(log2 a)                  (log2 in float64: the threshold between 2^k and 2^(k+1)
                                          is exactly the geometric mean sqrt2 * 2^k)
    y = s * min(max(p, x_min), x_max)    (0 where a < x_min / sqrt2 when with_zero)
    dy/dx = p / a in R2,  dL/dx_min = sum_R1 g s,  dL/dx_max = sum_R3 g s

The pruning threshold ``x_min / sqrt2`` is compared in float64 as well (decision 9: ``log2(0) =
-inf`` gives ``p = 0`` and is masked out of every gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

INV_SQRT2 = 1.0 / math.sqrt(2.0)


def round_half_away_reference(v: Tensor) -> Tensor:
    """``sign(v) * floor(|v| + 1/2)`` computed exactly: ``torch.round`` (ties to even), then a
    tie that went towards zero is moved one step away from zero."""
    r = torch.round(v)
    s = torch.sign(v)
    return torch.where((v - r) * s == 0.5, r + s, r)


def pow2_magnitude(a: Tensor) -> Tensor:
    """``2^round(log2 a)`` for ``a >= 0``, decided in float64 (exact for float32 inputs).

    ``0 -> 0``, ``inf -> inf``, ``NaN -> NaN``; powers beyond the dtype's range overflow to inf.
    """
    a64 = a.double()
    return torch.exp2(round_half_away_reference(torch.log2(a64))).to(a.dtype)


def zero_mask(a: Tensor, x_min: Tensor) -> Tensor:
    """``a >= x_min / sqrt2`` with the threshold ``x_min * (1/sqrt2)`` formed in float64."""
    return a.double() >= x_min.double() * INV_SQRT2


def _uniform_forward(x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    x_lo = -x_hi if signed else torch.zeros_like(x_hi)
    c = torch.minimum(torch.maximum(x, x_lo), x_hi)
    y = round_half_away_reference(c / d_q) * d_q
    return y, c


class _FakeQuantUniformRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool) -> Tensor:
        y, _ = _uniform_forward(x, d_q, x_hi, signed)
        ctx.save_for_backward(x, d_q, x_hi)
        ctx.signed = signed
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, d_q, x_hi = ctx.saved_tensors
        signed = ctx.signed
        y, c = _uniform_forward(x, d_q, x_hi, signed)
        hi = x >= x_hi
        lo = x <= -x_hi if signed else x <= 0
        grad_x = grad_dq = grad_xhi = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(hi | lo, 0.0, g)
        if ctx.needs_input_grad[1]:
            grad_dq = (g * (y - c)).sum() / d_q
        if ctx.needs_input_grad[2]:
            out_sign = hi.to(g.dtype) - lo.to(g.dtype) if signed else hi.to(g.dtype)
            grad_xhi = (g * out_sign).sum()
        return grad_x, grad_dq, grad_xhi, None


def fake_quant_uniform_reference(
    x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool = True
) -> Tensor:
    """Reference of :func:`mixq.quant.functional.fake_quant_uniform` (same arguments)."""
    return _FakeQuantUniformRef.apply(x, d_q, x_hi, signed)


def _pow2_forward(
    x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(y, a, s, p)``: output, magnitude, sign (constant), rounded magnitude."""
    if signed:
        a = x.abs()
        s = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
    else:
        a = x.clamp(min=0)
        s = torch.ones((), dtype=x.dtype, device=x.device)
    p = pow2_magnitude(a)
    y = torch.minimum(torch.maximum(p, x_min), x_max)
    if with_zero:
        y = torch.where(zero_mask(a, x_min), y, 0.0)
    return y * s, a, s, p


class _FakeQuantPow2Ref(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool
    ) -> Tensor:
        y, _, _, _ = _pow2_forward(x, x_min, x_max, signed, with_zero)
        ctx.save_for_backward(x, x_min, x_max)
        ctx.signed, ctx.with_zero = signed, with_zero
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, x_min, x_max = ctx.saved_tensors
        _, a, s, p = _pow2_forward(x, x_min, x_max, ctx.signed, ctx.with_zero)
        r3 = a >= x_max
        r1 = a < x_min
        if ctx.with_zero:
            r1 = r1 & zero_mask(a, x_min)
        r2 = ~(r3 | (a < x_min))
        gs = g * s
        grad_x = grad_min = grad_max = None
        if ctx.needs_input_grad[0]:
            # a > 0 in R2, so the division is safe; the ReLU mask is implied (a = 0 for x <= 0).
            grad_x = torch.where(r2, g * p / torch.where(r2, a, 1.0), 0.0)
        if ctx.needs_input_grad[1]:
            grad_min = torch.where(r1, gs, 0.0).sum()
        if ctx.needs_input_grad[2]:
            grad_max = torch.where(r3, gs, 0.0).sum()
        return grad_x, grad_min, grad_max, None, None


def fake_quant_pow2_reference(
    x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool = True, with_zero: bool = False
) -> Tensor:
    """Reference of :func:`mixq.quant.functional.fake_quant_pow2` (same arguments)."""
    return _FakeQuantPow2Ref.apply(x, x_min, x_max, signed, with_zero)
