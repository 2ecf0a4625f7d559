"""Fake-quantization kernels: forward and the exact STE backward of spec/method.md section 3.

Two pure functions, each a fused ``torch.autograd.Function`` that saves only its input ``x``
(the scalars are tiny) and computes, in its backward, the input gradient and the reductions for
the quantizer parameters:

Uniform (spec 1.2, 3.1), with ``x_lo = -x_hi`` (signed) or ``0`` (unsigned)::

    c = clip(x, x_lo, x_hi)
    y = d_q * round(c / d_q)                      (round half away from zero)
    dy/dx    = 1 if x_lo < x < x_hi else 0        (strict)
    dL/dd_q  = sum g * (y - c) / d_q              (in and out elements)
    dL/dx_hi = sum_{out} g * sign(x)              (out: |x| >= x_hi, or x >= x_hi unsigned)

Power-of-two (spec 2.2, 3.5), ``a = |x|`` (after ReLU when unsigned), ``s = sign(x)`` with
``sign(0) = +1``, ``p = 2^round(log2 a)``::

    y = s * clip(p, x_min, x_max)                 (0 for a < x_min/sqrt2 when with_zero)
    dy/dx     = p / a in R2 = {x_min <= a < x_max}, else 0
    dL/dx_min = sum_{R1} g * s,   R1 = {a < x_min} (and a >= x_min/sqrt2 with zero)
    dL/dx_max = sum_{R3} g * s,   R3 = {a >= x_max}

``d_q``, ``x_hi``, ``x_min`` and ``x_max`` are the *derived* (rounded, clipped) scalars; the
parametrizations in ``quantizer.py`` map raw parameters to them with autograd through the STE
primitives of ``ste.py``, which yields the per-parametrization gradients of spec 3.2-3.5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mixq.quant.ste import round_half_away

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _uniform_forward(x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    x_lo = -x_hi if signed else torch.zeros_like(x_hi)
    c = torch.minimum(torch.maximum(x, x_lo), x_hi)
    y = round_half_away(c / d_q) * d_q
    return y, c


class _FakeQuantUniform(torch.autograd.Function):
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


def fake_quant_uniform(x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool = True) -> Tensor:
    """Uniform fake quantization ``y = d_q * round(clip(x, x_lo, x_hi) / d_q)`` (spec 1.2).

    Args:
        x: tensor of any shape.
        d_q: scalar step size (already rounded to a power of two when required).
        x_hi: scalar clip bound (a float; not necessarily a multiple of ``d_q``).
        signed: ``x_lo = -x_hi`` if True, else ``x_lo = 0`` (the quantizer replaces a ReLU).

    Example:
        >>> fake_quant_uniform(torch.tensor([0.3, -2.0]), torch.tensor(0.25), torch.tensor(0.95))
        tensor([ 0.2500, -1.0000])
    """
    return _FakeQuantUniform.apply(x, d_q, x_hi, signed)


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
    # log2(0) = -inf gives p = 0 in the forward; masked out of every gradient (decision 9).
    p = torch.exp2(round_half_away(torch.log2(a)))
    y = torch.minimum(torch.maximum(p, x_min), x_max)
    if with_zero:
        y = torch.where(a >= x_min * _INV_SQRT2, y, 0.0)
    return y * s, a, s, p


class _FakeQuantPow2(torch.autograd.Function):
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
            r1 = r1 & (a >= x_min * _INV_SQRT2)
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


def fake_quant_pow2(
    x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool = True, with_zero: bool = False
) -> Tensor:
    """Power-of-two fake quantization (spec 2.2).

    ``y = sign(x) * clip(2^round(log2|x|), x_min, x_max)``; with ``with_zero`` magnitudes below
    ``x_min/sqrt2`` map to 0, without it an exact 0 maps to ``+x_min``. Unsigned quantizers
    apply a ReLU first.

    Example:
        >>> fake_quant_pow2(torch.tensor([0.3, -5.0]), torch.tensor(0.125), torch.tensor(2.0))
        tensor([ 0.2500, -2.0000])
    """
    return _FakeQuantPow2.apply(x, x_min, x_max, signed, with_zero)
