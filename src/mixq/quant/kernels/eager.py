"""The ``eager`` backend: the formulas of ``functional_reference.py`` in fewer PyTorch ops.

Used where the ``cpp`` kernels are not (CUDA, dtypes other than float32, no compiler) and
under ``torch.compile`` (traceable).
Values are bit-identical to the reference (tested); the differences are only in how they are
computed:

* ``round_half_away(v) = trunc(v + copysign(h, v))`` with ``h`` the float just below 1/2:
  three ops instead of seven (exact for every float, see ``mixq.quant.ste``);
* ``clamp(x, lo, hi)`` (one op) instead of ``minimum(maximum(x, lo), hi)``;
* for float32, ``2^round(log2 a)`` from the exponent and mantissa bits (``a = m 2^e`` rounds up
  iff ``m >= 1.41421366``, the float just above sqrt 2) instead of a float64 ``log2``;
* in-place updates of temporaries, and no float casts of boolean masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixq.quant.functional_reference import INV_SQRT2, pow2_magnitude
from mixq.quant.ste import round_half_away

#: Works on any layout and dtype.
DENSE = False

_FLT_MIN = 2.0**-126


def clip_round(x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(y, c)``: ``c = clip(x, x_lo, x_hi)`` and ``y = d_q * round_half_away(c / d_q)``."""
    x_lo = -x_hi if signed else torch.zeros_like(x_hi)
    c = torch.clamp(x, x_lo, x_hi)
    return round_half_away(c / d_q).mul_(d_q), c


def uniform_fwd(x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool) -> Tensor:
    """Uniform fake quantization (spec 1.2)."""
    return clip_round(x, d_q, x_hi, signed)[0]


def uniform_bwd(
    x: Tensor, g: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool, need_x: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(dL/dx, dL/dd_q, dL/dx_hi)`` of spec 3.1 (``dL/dx`` None unless ``need_x``)."""
    hi = x >= x_hi
    lo = x <= -x_hi if signed else x <= 0
    gx = g.masked_fill(hi | lo, 0.0) if need_x else None
    y, c = clip_round(x, d_q, x_hi, signed)
    grad_dq = y.sub_(c).mul_(g).sum() / d_q
    grad_hi = torch.where(hi, g, 0.0).sum()
    if signed:
        grad_hi = grad_hi - torch.where(lo, g, 0.0).sum()
    return gx, grad_dq, grad_hi


def pow2_magnitude_fast(a: Tensor) -> Tensor:
    """``2^round(log2 a)`` for ``a >= 0`` (same values as ``functional_reference``)."""
    if a.dtype != torch.float32:
        return pow2_magnitude(a)
    sub = a < _FLT_MIN  # zero or subnormal: rescale by 2^24 so that the bits are normalised
    s = torch.where(sub, a * 2.0**24, a)
    bits = s.view(torch.int32)
    up = (bits & 0x7FFFFF) >= 0x3504F4
    p = ((bits & 0x7F800000) + up.to(torch.int32) * 0x800000).view(torch.float32)
    p = torch.where(sub, p * 2.0**-24, p)
    return torch.where(torch.isnan(a), a, p)


def zero_threshold(x_min: Tensor, dtype: torch.dtype) -> Tensor:
    """The smallest ``dtype`` value ``t >= x_min * (1/sqrt2)`` (product in float64)."""
    t64 = x_min.double() * INV_SQRT2
    t = t64.to(dtype)
    return torch.where(t.double() < t64, torch.nextafter(t, torch.full_like(t, float("inf"))), t)


def _magnitude(x: Tensor, signed: bool) -> Tensor:
    return x.abs() if signed else x.clamp(min=0)


def pow2_fwd(x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool) -> Tensor:
    """Power-of-two fake quantization (spec 2.2)."""
    a = _magnitude(x, signed)
    m = torch.clamp(pow2_magnitude_fast(a), x_min, x_max)
    if with_zero:
        m = torch.where(a >= zero_threshold(x_min, a.dtype), m, 0.0)  # NaN -> 0 as the reference
    return torch.where(x < 0, -m, m) if signed else m


def pow2_bwd(
    x: Tensor, g: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool,
    need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """``(dL/dx, sum_R1 g s, sum_R3 g s)`` of spec 3.5 (``dL/dx`` None unless ``need_x``)."""
    a = _magnitude(x, signed)
    gs = torch.where(x < 0, -g, g) if signed else g
    r3 = a >= x_max
    below = a < x_min
    r1 = below & (a >= zero_threshold(x_min, a.dtype)) if with_zero else below
    gx = None
    if need_x:
        r2 = ~(r3 | below)
        p = pow2_magnitude_fast(a)
        gx = torch.where(r2, g * p / torch.where(r2, a, 1.0), 0.0)
    return gx, torch.where(r1, gs, 0.0).sum(), torch.where(r3, gs, 0.0).sum()
