"""A model's layer weights and biases fake-quantized in one autograd node per quantizer group.

Every quantized layer calls its weight quantizer in its forward: a module call, the backend
choice and one ``autograd.Function`` forward and backward per layer and step (~40 us of Python
and dispatch each on CPU, more than the arithmetic of a small weight). The weights do not
depend on the input, so a model forward pre-hook (:class:`mixq.quant.group.SharedDerived`)
quantizes all of them at its start instead: per group of quantizers
(:mod:`mixq.quant.group`), one :class:`_FakeQuantBound` node runs the C++ kernel of each bound
tensor with that member's entry of the group's derived vectors ``a = d_q`` (``x_min``), ``b =
x_hi`` (``x_max``), and hands each layer ``Q_w(W)`` (``Q_b(b)``) for this forward
(:data:`mixq.quant.base.SHARED_TENSORS`). Its backward computes each tensor's input gradient
and writes the two parameter sums of member ``i`` into row ``i`` of one ``[n, 2]`` tensor, whose
columns are the gradients of ``a`` and ``b``: no 0-d tensors, no per-member unstacking.

The values are the same kernels on the same scalars, so outputs and weight gradients equal
the per-layer path bit for bit, and so do the parameter sums when each layer runs once per
forward (a layer called twice gets its two output gradients added before the one kernel
instead of after two: equal up to the order of summation). A layer whose forward did not run
gives its tensor and its quantizer no gradient (``None``), as per layer.

Used only where the per-layer call would do exactly this: CPU float32 tensors on the C++
kernels (``MIXQ_KERNEL`` ``auto`` / ``cpp``), a quantizer with no forward hooks (global or its
own, e.g. :func:`mixq.repair.capture_inputs`) and its class's own ``forward``, bound to one tensor
of one layer that reads :data:`~mixq.quant.base.SHARED_TENSORS` (``QuantConv2d``,
``QuantLinear``); every other quantizer keeps its call in the layer's forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixq.quant import kernels
from mixq.quant.base import SHARED_TENSORS, Quantizer
from mixq.quant.kernels import cpp
from mixq.quant.pow2 import Pow2Quantizer
from mixq.quant.uniform import UniformQuantizer

READS_SHARED = "_mixq_reads_shared_tensors"
"""Class attribute (True) of the layer types whose forward reads their shared tensors."""

_ATTRS = (("weight", "weight_quantizer"), ("bias", "bias_quantizer"))
_FORWARDS = {UniformQuantizer: UniformQuantizer.forward, Pow2Quantizer: Pow2Quantizer.forward}


@dataclass(frozen=True)
class Binding:
    """Member ``index`` of a group quantizes ``layer.<attr>`` (its ``<attr>_quantizer``)."""

    index: int
    layer: nn.Module
    attr: str
    quantizer: Quantizer


def find_bindings(model: nn.Module) -> dict[Quantizer, tuple[nn.Module, str]]:
    """``q -> (layer, attr)`` for every quantizer of ``model`` that quantizes exactly one tensor
    of one layer reading shared tensors (a quantizer shared by two tensors: none). Keyed by the
    objects, so that a deep copy of the model maps to the copy's."""
    seen: dict[Quantizer, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        if not getattr(type(m), READS_SHARED, False):
            continue
        for attr, qattr in _ATTRS:
            q = m._modules.get(qattr)
            if isinstance(q, Quantizer):
                seen.setdefault(q, []).append((m, attr))
    return {k: v[0] for k, v in seen.items() if len(v) == 1}


def group_bindings(members: Sequence[Quantizer], found: dict) -> list[Binding]:
    """The members of one group that are bound to a layer tensor, as :class:`Binding`."""
    out = []
    for i, q in enumerate(members):
        hit = found.get(q)
        if hit is not None and type(q) in _FORWARDS:
            out.append(Binding(i, hit[0], hit[1], q))
    return out


def _global_hooks() -> bool:
    mod = torch.nn.modules.module
    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks
                or getattr(mod, "_global_forward_hooks_always_called", None))  # fmt: skip


def _callable_here(b: Binding) -> bool:
    """Whether calling ``b.quantizer`` in the layer would run exactly its class's forward."""
    q = b.quantizer
    return (
        not q._forward_hooks
        and not q._forward_pre_hooks
        and "forward" not in q.__dict__
        and type(q).forward is _FORWARDS[type(q)]
        and b.layer._modules.get(b.attr + "_quantizer") is q
    )


def _tensor_ok(t: object) -> bool:
    return isinstance(t, Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"


class _Use:  # the protocol of mixq.quant.group._Use: which members got a gradient
    used: list[bool]


class _FakeQuantBound(torch.autograd.Function):
    """``(Q_0(t_0), Q_1(t_1), ...)`` of one group: ``spec[j] = (i, signed, with_zero)`` is the
    member index and flags of tensor ``j``; ``a``, ``b`` the group's derived vectors."""

    @staticmethod
    def forward(ctx, uniform: bool, spec: tuple, use: _Use | None, a: Tensor, b: Tensor,
                *ts: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.uniform, ctx.spec, ctx.use = uniform, spec, use
        ctx.save_for_backward(a, b, *ts)
        pairs = zip(spec, ts, strict=True)
        if uniform:
            return tuple(cpp.uniform_fwd_at(t, a, b, i, s) for (i, s, _), t in pairs)
        return tuple(cpp.pow2_fwd_at(t, a, b, i, s, z) for (i, s, z), t in pairs)

    @staticmethod
    def backward(ctx, *gs: Tensor | None):
        a, b, *ts = ctx.saved_tensors
        need = ctx.needs_input_grad
        sums = torch.zeros(a.numel(), 2, dtype=torch.float32) if need[3] or need[4] else None
        scratch = torch.empty(1, 2, dtype=torch.float32) if sums is None else None
        grads: list[Tensor | None] = []
        any_grad = False
        for j, ((i, s, z), t, g) in enumerate(zip(ctx.spec, ts, gs, strict=True)):
            if g is None:
                grads.append(None)
                continue
            any_grad = True
            if g.stride() != t.stride():
                g = torch.empty_like(t).copy_(g)
            out, row = (sums, i) if sums is not None else (scratch, 0)
            need_x = need[5 + j]
            if ctx.uniform:
                gx = cpp.uniform_bwd_at(t, g, a, b, i, s, need_x, out, row)
            else:
                gx = cpp.pow2_bwd_at(t, g, a, b, i, s, z, need_x, out, row)
            if ctx.use is not None:
                ctx.use.used[i] = True
            grads.append(gx)
        if sums is None or not any_grad:
            ga = gb = None
        else:
            ga, gb = sums.unbind(1)
        return (None, None, None, ga if need[3] else None, gb if need[4] else None, *grads)


def quantize_bound(
    bindings: Sequence[Binding], uniform: bool, use: _Use | None, a: Tensor, b: Tensor,
    grad: bool,
) -> list[Binding]:  # fmt: skip
    """Fake-quantize the bound tensors of one group in one node and hand them to their layers
    (``layer.__dict__[SHARED_TENSORS]``); returns the bindings it handled (the others keep
    their quantizer call)."""
    if (not bindings or kernels.mode() not in ("auto", "cpp") or not cpp.available()
            or not (_tensor_ok(a) and _tensor_ok(b)) or _global_hooks()):  # fmt: skip
        return []
    a, b = a.contiguous(), b.contiguous()
    done, ts, spec = [], [], []
    for bd in bindings:
        t = getattr(bd.layer, bd.attr, None)
        if not (_tensor_ok(t) and _callable_here(bd)):
            continue
        if not (t.is_contiguous() or (t.dim() == 4 and
                                      t.is_contiguous(memory_format=torch.channels_last))):
            continue  # fmt: skip
        q = bd.quantizer
        done.append(bd)
        ts.append(t)
        spec.append((bd.index, bool(q.signed), bool(getattr(q, "with_zero", False))))
    if not done:
        return []
    outs = _FakeQuantBound.apply(uniform, tuple(spec), use, a, b, *ts)
    for bd, out in zip(done, outs, strict=True):
        shared = bd.layer.__dict__.get(SHARED_TENSORS)
        if shared is None:
            bd.layer.__dict__[SHARED_TENSORS] = shared = (grad, {})
        shared[1][bd.attr] = out
    return done


def release(bindings: Sequence[Binding]) -> None:
    """Take the shared tensors back from the layers (after the model forward)."""
    for bd in bindings:
        bd.layer.__dict__.pop(SHARED_TENSORS, None)


def shared_tensor(layer: nn.Module, attr: str) -> Tensor | None:
    """The tensor handed to ``layer`` for ``attr`` in this forward, or None (then the layer
    calls its quantizer). Values made with gradients serve any forward, those made without
    only a forward without gradients (as :meth:`Quantizer.forward_derived`)."""
    shared = layer.__dict__.get(SHARED_TENSORS)
    if shared is None or not (shared[0] or not torch.is_grad_enabled()):
        return None
    return shared[1].get(attr)


__all__ = ["READS_SHARED", "Binding", "find_bindings", "group_bindings", "quantize_bound",
           "release", "shared_tensor"]  # fmt: skip
