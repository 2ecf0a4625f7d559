"""Straight-through primitives (spec/method.md, "Reference-implementation primitive semantics").

Every function here is pure: tensors in, tensors out, no module state.

* ``round_half_away(v)``: C ``std::round``, ties away from zero (decision 2).
* ``ste_round`` / ``ste_ceil``: forward round/ceil, backward identity.
* ``pow2round(v) = 2^round(log2 v)``: forward on a positive value; STE gradient
  ``pow2round(v) / v`` (in ``[1/sqrt2, sqrt2]``), the spec's "d_q/d factor".
* ``clip_scalar(v, lo, hi) = min(max(v, lo), hi)``: the gradient flows only if ``lo < v < hi``
  strictly; at or beyond a bound the parameter gets zero gradient (``clip_s`` in the spec).
* ``max_strict(v, a) = max(v, a)``: passes the gradient only if ``v > a`` (``maximum_scalar``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_half_away(v: Tensor) -> Tensor:
    """Round to the nearest integer, ties away from zero: ``sign(v) * floor(|v| + 1/2)``.

    Computed exactly (no ``|v| + 0.5`` rounding error): ``torch.round`` rounds ties to even,
    and a tie that went towards zero is moved one step away from zero.
    """
    r = torch.round(v)
    s = torch.sign(v)
    return torch.where((v - r) * s == 0.5, r + s, r)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        return round_half_away(v)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class _CeilSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        return torch.ceil(v)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class _Pow2RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        p = torch.exp2(round_half_away(torch.log2(v)))
        ctx.save_for_backward(v, p)
        return p

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        v, p = ctx.saved_tensors
        return g * p / v


def ste_round(v: Tensor) -> Tensor:
    """``round_half_away(v)`` forward, identity backward."""
    return _RoundSTE.apply(v)


def ste_ceil(v: Tensor) -> Tensor:
    """``ceil(v)`` forward, identity backward."""
    return _CeilSTE.apply(v)


def pow2round(v: Tensor) -> Tensor:
    """``2^round(log2 v)`` for ``v > 0``; backward ``d pow2round(v)/dv = pow2round(v)/v``."""
    return _Pow2RoundSTE.apply(v)


def clip_scalar(v: Tensor, lo: float, hi: float) -> Tensor:
    """``min(max(v, lo), hi)`` with gradient 1 only for ``lo < v < hi`` (strict), else 0.

    With ``lo > hi`` the result is ``hi`` (nnabla's order: max first, then min), which is how
    a bitwidth fixed by ``b_min = b_max`` is held constant (spec section 1.5).
    """
    inside = (v > lo) & (v < hi)
    return torch.where(inside, v, v.detach().clamp(min=lo).clamp(max=hi))


def max_strict(v: Tensor, a: float) -> Tensor:
    """``max(v, a)``; the gradient passes only where ``v > a`` (strict)."""
    return torch.where(v > a, v, v.detach().clamp(min=a))
