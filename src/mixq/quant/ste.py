"""Straight-through primitives (docs/method.md, "Reference-implementation primitive semantics").

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

_HALF_BELOW = {torch.float32: 0.5 - 2.0**-25, torch.float64: 0.5 - 2.0**-54}
"""The float just below 1/2, per dtype."""


def round_half_away(v: Tensor) -> Tensor:
    """Round to the nearest integer, ties away from zero: ``sign(v) * floor(|v| + 1/2)``.

    Computed exactly as ``copysign(trunc(|v| + h), v)`` with ``h`` the float just below 1/2
    (C's classic ``roundf``): ``|v| + h`` reaches the next integer exactly when the fraction
    of ``|v|`` is at least 1/2 (a tie ``n + 1/2`` sums to the midpoint below ``n + 1``, which
    rounds to the even ``n + 1``), and never otherwise. Equal to C ``roundf`` bit for bit,
    signed zeros included, for every float32 (checked over all 2^32 patterns). Other dtypes:
    ``torch.round`` (ties to even) with the ties moved away from zero.
    """
    h = _HALF_BELOW.get(v.dtype)
    if h is None:
        r = torch.round(v)
        s = torch.sign(v)
        return torch.where((v - r) * s == 0.5, r + s, r)
    return torch.copysign(torch.abs(v).add_(h).trunc_(), v)


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
