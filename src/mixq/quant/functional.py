"""Fake-quantization kernels: forward and the exact STE backward of docs/method.md section 3.

Two pure functions, each a fused ``torch.autograd.Function`` that saves only its input ``x``
(the scalars are tiny) and computes, in one backward pass, the input gradient and the two
reductions for the quantizer parameters:

Uniform (spec 1.2, 3.1), with ``x_lo = -x_hi`` (signed) or ``0`` (unsigned)::

    c = clip(x, x_lo, x_hi)
    y = d_q * round(c / d_q)                      (round half away from zero)
    dy/dx    = 1 if x_lo < x < x_hi else 0        (strict)
    dL/dd_q  = sum g * (y - c) / d_q              (in and out elements)
    dL/dx_hi = sum_{out} g * sign(x)              (out: |x| >= x_hi, or x >= x_hi unsigned)

Power-of-two (spec 2.2, 3.5), ``a = |x|`` (after ReLU when unsigned), ``s = sign(x)`` with
``sign(0) = +1``, ``p = 2^round(log2 a)`` (threshold exactly the geometric mean sqrt2 * 2^k)::

    y = s * clip(p, x_min, x_max)                 (0 for a < x_min/sqrt2 when with_zero)
    dy/dx     = p / a in R2 = {x_min <= a < x_max}, else 0
    dL/dx_min = sum_{R1} g * s,   R1 = {a < x_min} (and a >= x_min/sqrt2 with zero)
    dL/dx_max = sum_{R3} g * s,   R3 = {a >= x_max}

``d_q``, ``x_hi``, ``x_min`` and ``x_max`` are the *derived* (rounded, clipped) scalars; the
parametrizations in ``uniform.py``/``pow2.py`` map raw parameters to them with autograd through
the STE primitives of ``ste.py``, which yields the per-parametrization gradients of spec 3.2-3.5.

The arithmetic runs in one of the backends of :mod:`mixq.quant.kernels` (``cpp``: C++/OpenMP
kernels; ``inductor``: ``torch.compile`` of the ``eager`` path, Triton on CUDA; ``eager``: a
pure-PyTorch path; ``reference``: ``functional_reference``), each with the same four functions;
all give the same forward values (up to
the sign of a zero output) and the same gradients (the two parameter sums up to summation
order). Select with ``MIXQ_KERNEL`` or :func:`mixq.quant.kernels.use`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixq.quant import kernels
from mixq.quant.functional_reference import (
    fake_quant_pow2_reference,
    fake_quant_uniform_reference,
)


def _dense(x: Tensor) -> Tensor:
    """``x`` itself if its memory is one dense block (contiguous or channels_last), else a copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _like(g: Tensor, x: Tensor) -> Tensor:
    """``g`` laid out exactly as the dense ``x`` (the dense backends index both linearly)."""
    if g.stride() == x.stride():
        return g
    out = torch.empty_like(x)
    out.copy_(g)
    return out


def _needed(grads: tuple, needs: tuple[bool, ...]) -> tuple:
    """The backend's ``(dL/dx, dL/da, dL/db)`` with None where autograd needs none."""
    return tuple(g if need else None for g, need in zip(grads, needs[:3], strict=True))


def _cap_kw(cap: float | None) -> dict[str, float]:
    """``cap=`` for a backend whose functions fuse ``min(x, cap)`` (only those get one)."""
    return {} if cap is None else {"cap": cap}


def _uncapped(x: Tensor, cap: float | None, backend: str) -> tuple[Tensor, float | None]:
    """``(x, cap)`` for ``backend``: one without a fused cap gets ``clamp(x, max=cap)``."""
    if cap is None or (backend != "reference" and getattr(kernels.implementation(backend),
                                                          "CAP", False)):  # fmt: skip
        return x, cap
    return x.clamp(max=cap), None


class _FakeQuantUniform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool, backend: str,
                cap: float | None = None) -> Tensor:  # fmt: skip
        impl = kernels.implementation(backend)
        x = _dense(x) if impl.DENSE else x
        y = impl.uniform_fwd(x, d_q, x_hi, signed, **_cap_kw(cap))
        ctx.save_for_backward(x, d_q, x_hi)
        ctx.signed, ctx.backend, ctx.cap = signed, backend, cap
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, d_q, x_hi = ctx.saved_tensors
        impl = kernels.implementation(ctx.backend)
        g = _like(g, x) if impl.DENSE else g
        grads = impl.uniform_bwd(x, g, d_q, x_hi, ctx.signed, ctx.needs_input_grad[0],
                                 **_cap_kw(ctx.cap))  # fmt: skip
        return (*_needed(grads, ctx.needs_input_grad), None, None, None)


def fake_quant_uniform(
    x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool = True, cap: float | None = None
) -> Tensor:
    """Uniform fake quantization ``y = d_q * round(clip(x, x_lo, x_hi) / d_q)`` (spec 1.2).

    Args:
        x: tensor of any shape.
        d_q: scalar step size (already rounded to a power of two when required).
        x_hi: scalar clip bound (a float; not necessarily a multiple of ``d_q``).
        signed: ``x_lo = -x_hi`` if True, else ``x_lo = 0`` (the quantizer replaces a ReLU).
        cap: quantize ``min(x, cap)`` instead (the 6 of a replaced ReLU6): the same values and
            gradients as ``fake_quant_uniform(x.clamp(max=cap), ...)``, in the same kernel pass
            where the backend fuses it (``cpp``).

    Example:
        >>> fake_quant_uniform(torch.tensor([0.3, -2.0]), torch.tensor(0.25), torch.tensor(0.95))
        tensor([ 0.2500, -1.0000])
    """
    backend = kernels.backend(x, d_q, x_hi)
    x, cap = _uncapped(x, cap, backend)
    if backend == "reference":
        return fake_quant_uniform_reference(x, d_q, x_hi, signed)
    return _FakeQuantUniform.apply(x, d_q, x_hi, bool(signed), backend, cap)


class _FakeQuantPow2(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool, backend: str,
        cap: float | None = None,
    ) -> Tensor:  # fmt: skip
        impl = kernels.implementation(backend)
        x = _dense(x) if impl.DENSE else x
        y = impl.pow2_fwd(x, x_min, x_max, signed, with_zero, **_cap_kw(cap))
        ctx.save_for_backward(x, x_min, x_max)
        ctx.signed, ctx.with_zero, ctx.backend, ctx.cap = signed, with_zero, backend, cap
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, x_min, x_max = ctx.saved_tensors
        impl = kernels.implementation(ctx.backend)
        g = _like(g, x) if impl.DENSE else g
        args = (x_min, x_max, ctx.signed, ctx.with_zero, ctx.needs_input_grad[0])
        grads = impl.pow2_bwd(x, g, *args, **_cap_kw(ctx.cap))
        return (*_needed(grads, ctx.needs_input_grad), None, None, None, None)


def fake_quant_pow2(
    x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool = True, with_zero: bool = False,
    cap: float | None = None,
) -> Tensor:
    """Power-of-two fake quantization (spec 2.2).

    ``y = sign(x) * clip(2^round(log2|x|), x_min, x_max)``; with ``with_zero`` magnitudes below
    ``x_min/sqrt2`` map to 0, without it an exact 0 maps to ``+x_min``. Unsigned quantizers
    apply a ReLU first. ``log2`` is rounded exactly: ``|x|`` goes up to ``2^(k+1)`` iff
    ``|x| > sqrt2 * 2^k``. ``cap``: quantize ``min(x, cap)``, as in :func:`fake_quant_uniform`.

    Example:
        >>> fake_quant_pow2(torch.tensor([0.3, -5.0]), torch.tensor(0.125), torch.tensor(2.0))
        tensor([ 0.2500, -2.0000])
    """
    backend = kernels.backend(x, x_min, x_max)
    x, cap = _uncapped(x, cap, backend)
    if backend == "reference":
        return fake_quant_pow2_reference(x, x_min, x_max, signed, with_zero)
    return _FakeQuantPow2.apply(x, x_min, x_max, bool(signed), bool(with_zero), backend, cap)
