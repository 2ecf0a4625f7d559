"""The quantizers' scalar work, batched: derived quantities, bitwidth surrogates, projection and
gradient clip of many quantizers at once (docs/method.md 1.3, 1.5, 2.3, 3.6, 5.2).

Each quantizer holds two 0-d Parameters; deriving its step and range, its bitwidth surrogate,
clipping its gradients and projecting it into its bounds are a few dozen tiny tensor operations
per quantizer and step (ResNet-20: ~40 quantizers, ~3,700 operations per step). Here the
quantizers are split into groups of one computation, keyed by ``(class, parametrization,
pow2_step, device, dtype)``, and each formula runs once per group on 1-D tensors whose entry
``i`` belongs to member ``i``. What differs between members (bounds, sign bit, ``with_zero``,
``b_min``) is a constant vector. Every operation is elementwise and the same as the
per-quantizer one, so entry ``i`` equals member ``i``'s ``derived()``, ``bitwidth_surrogate()``,
``constrain_()`` and ``clip_grad_()`` bit for bit (``tests/quant/test_group.py``):

* derived (spec 1.3, 2.3): ``d_q = pow2round(clip(d))``, ``x_hi = clip(q_max)`` (U3), ...;
* surrogates (5.2): ``round(clip(b))`` (U1, U2, P1, P2), the STE views of
  ``max(ceil(log2(k + 1) + [signed]), b_min)`` (U3) and ``max(ceil(log2(L + 1) + 1), b_min)``
  (P3), as :meth:`UniformQuantizer.bitwidth_surrogate` / :meth:`Pow2Quantizer.bitwidth_surrogate`;
* projection (1.5): ``small <- min(small, large - 1e-5)``, ``large <- max(small_old + 1e-5,
  large)`` for ``d_qmax`` / ``qmin_qmax``, then ``v <- clip(v, lo + 1e-5, hi - 1e-5)``;
* gradient clip (3.6): ``grad <- clip(grad, -|small|, |small|)`` for ``d_qmax`` / ``qmin_qmax``.

The Parameters stay the quantizers' own (state dicts, optimizers, DDP and checkpoints see
nothing new): a group stacks them (one operation) and unstacks the gradient (one operation).
Gradients equal the per-quantizer ones bit for bit when each quantizer runs once per forward,
else up to the order of summation; a quantizer that no forward or penalty used gets no gradient
(``None``), as per quantizer.

What a quantizer class overrides or adds (its own ``derived``, ``constrain_``, ..., or an allowed
bit set ``bit_set``) is not batched: :func:`batchable` says no and that quantizer keeps its own
methods inside the same calls.

Use: :class:`QuantizerGroups` (``derived``, ``bitwidths``, ``constrain_``, ``clip_grad_``),
:func:`cached_groups` (one per owner and quantizer list) and :func:`share_derived` (a model's
forward derives every quantizer's scalars once, the quantizers read them, and the memory
penalty of the same step computes its bitwidth surrogates from the vectors that forward
stacked: :meth:`SharedDerived.bitwidths`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixq.quant import bound
from mixq.quant.base import SHARED, Quantizer, config_version
from mixq.quant.bounds import MARGIN
from mixq.quant.pow2 import Pow2Quantizer
from mixq.quant.ste import pow2round, ste_round
from mixq.quant.uniform import UniformQuantizer

_PAIRS = (("d", "q_max"), ("q_min", "q_max"))
"""Parametrizations with a ``small < large`` pair: the cross projection and the gradient clip."""

#: The methods whose formulas this module reproduces; a subclass overriding one is not batched.
_COMMON = ("derived", "bitwidth_surrogate", "_clip", "constrain_", "clip_grad_", "_bits_from_b",
           "_charge", "_project_bits_")  # fmt: skip
_REPRODUCED: dict[type[Quantizer], tuple[str, ...]] = {
    UniformQuantizer: (*_COMMON, "_step", "_n_eff"),
    Pow2Quantizer: _COMMON,
}

#: The parametrizations whose formulas :class:`_Group` implements.
_FORMULAS = ("uniform/b_d", "uniform/b_qmax", "uniform/d_qmax", "pow2/b_qmax", "pow2/b_qmin",
             "pow2/qmin_qmax")  # fmt: skip

#: Attributes that change a quantizer's semantics beyond this module's formulas when not None:
#: an allowed bit set, frozen bits and the scale held with them (issue 20).
_UNSUPPORTED_ATTRIBUTES = ("bit_set", "frozen_bits", "held_scale")


def batchable(q: Quantizer) -> bool:
    """Whether ``q``'s scalar work is exactly what this module computes in batch.

    True for :class:`UniformQuantizer` and :class:`Pow2Quantizer` of the six parametrizations
    of spec 1.3 / 2.3, and their subclasses that override
    none of the reproduced methods (``derived``, ``bitwidth_surrogate``, ``constrain_``,
    ``clip_grad_``, ...; on the class or the instance) and set no ``bit_set``; every other
    quantizer keeps its own methods. Looked at when the groups are built (see
    :meth:`QuantizerGroups.check`), so a method patched onto a class later is not seen.
    """
    if any(getattr(q, a, None) is not None for a in _UNSUPPORTED_ATTRIBUTES):
        return False
    cls = type(q)
    base = next((c for c in _REPRODUCED if issubclass(cls, c)), None)
    if base is None or f"{base.kind}/{q.parametrization}" not in _FORMULAS:
        return False
    return all(
        getattr(cls, name, None) is getattr(base, name, None) and name not in q.__dict__
        for name in _REPRODUCED[base]
    )


def _signature(q: Quantizer) -> tuple:
    """What decides ``q``'s group and constants (re-checked when a quantizer attribute was set).

    The device and dtype are not in it: the constants are kept per device and dtype of the
    stacked parameters, so moving a whole model needs no regrouping.
    """
    flag = q.pow2_step if isinstance(q, UniformQuantizer) else getattr(q, "with_zero", None)
    extra = tuple(getattr(q, a, None) for a in _UNSUPPORTED_ATTRIBUTES)
    return (type(q), q.parametrization, q.signed, q.bounds, flag, extra)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# -- autograd plumbing: stack the 0-d Parameters, unstack to 0-d views --------------------------


class _Use:
    """Which members of a stacked group a consumer used (the others get no gradient)."""

    __slots__ = ("used",)

    def __init__(self, n: int) -> None:
        self.used = [False] * n


class _Stack(torch.autograd.Function):
    """``(stack(ps[:k]), stack(ps[k:2k]), ...)``; backward: one ``unbind`` per vector.

    (``torch.stack``'s own backward is one ``select`` per entry.) With a :class:`_Use`, members
    that no consumer used get ``None``, so that they keep no gradient as per quantizer.
    """

    @staticmethod
    def forward(ctx, use: _Use | None, n: int, *ps: Tensor) -> tuple[Tensor, ...]:
        k = len(ps) // n
        ctx.use, ctx.k = use, k
        return tuple(torch.stack(ps[i * k : (i + 1) * k]) for i in range(n))

    @staticmethod
    def backward(ctx, *gs: Tensor):
        out: list[Tensor | None] = [p for g in gs for p in g.unbind()]
        use = ctx.use
        if use is not None and not all(use.used):
            out = [g if use.used[j % ctx.k] else None for j, g in enumerate(out)]
        return (None, None, *out)


class _Split(torch.autograd.Function):
    """``v.unbind()`` (0-d views, one per member); backward: one ``stack``, recording in a
    :class:`_Use` which members got a gradient (zeros fill the others)."""

    @staticmethod
    def forward(ctx, use: _Use, v: Tensor) -> tuple[Tensor, ...]:
        ctx.use, ctx.like = use, (v.dtype, v.device)
        ctx.set_materialize_grads(False)
        return v.unbind()

    @staticmethod
    def backward(ctx, *gs: Tensor | None):
        if all(g is None for g in gs):
            return None, None
        dtype, device = ctx.like
        zero = None
        filled = []
        for i, g in enumerate(gs):
            if g is None:
                if zero is None:
                    zero = torch.zeros((), dtype=dtype, device=device)
                g = zero
            else:
                ctx.use.used[i] = True
            filled.append(g)
        return None, torch.stack(filled)


class _Clip(torch.autograd.Function):
    """:func:`mixq.quant.ste.clip_scalar` with per-entry bounds: ``min(max(v, lo), hi)``, the
    gradient passing only where ``lo < v < hi`` strictly (one operation forward)."""

    @staticmethod
    def forward(ctx, v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        ctx.save_for_backward(v, lo, hi)
        return torch.clamp(v, lo, hi)

    @staticmethod
    def backward(ctx, g: Tensor):
        v, lo, hi = ctx.saved_tensors
        return torch.where((v > lo) & (v < hi), g, 0.0), None, None


def _split(use: _Use, d: Derived) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The 0-d entries of ``d.a`` and ``d.b``, one per member."""
    if _compiling():
        return d.a.unbind(), d.b.unbind()
    return _Split.apply(use, d.a), _Split.apply(use, d.b)


def _clip(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    if _compiling():  # traceable spelling of the same function
        return torch.where((v > lo) & (v < hi), v, v.detach().clamp(lo, hi))
    return _Clip.apply(v, lo, hi)


# -- one group ------------------------------------------------------------------------------------


@dataclass
class _Consts:
    """A group's per-member constants on one device and dtype (entry ``i``: member ``i``)."""

    lo: list[Tensor]  # clip bounds of each parameter name (spec 1.4)
    hi: list[Tensor]
    proj_lo: Tensor  # projection bounds lo + 1e-5, hi - 1e-5 of all names, concatenated
    proj_hi: Tensor
    sign: Tensor  # [signed]
    zero: Tensor  # [with_zero] (pow-2)
    b_min: Tensor


@dataclass
class Derived:
    """A group's derived scalars as vectors: ``a = d_q`` or ``x_min``, ``b = x_hi`` or
    ``x_max``; ``n_q = round(clip(b))`` for the parametrizations with a bitwidth parameter."""

    a: Tensor
    b: Tensor
    n_q: Tensor | None = None


class _Group:
    """Quantizers of one computation: same class, parametrization, ``pow2_step``, device, dtype."""

    def __init__(self, members: list[Quantizer]) -> None:
        q0 = members[0]
        self.members = members
        self.uniform = isinstance(q0, UniformQuantizer)
        self.parametrization = q0.parametrization
        self.names = q0.param_names
        self.pair = self.names in _PAIRS
        self.pow2_step = getattr(q0, "pow2_step", True)
        self._consts: dict[tuple, _Consts] = {}

    def params(self) -> list[Tensor]:
        """The members' Parameters, name by name: ``[p0 of each member, p1 of each member]``."""
        return [q._parameters[n] for n in self.names for q in self.members]

    def consts(self, like: Tensor) -> _Consts:
        key = (like.device, like.dtype)
        c = self._consts.get(key)
        if c is None:

            def vec(values: list[float]) -> Tensor:
                return torch.tensor(values, dtype=like.dtype, device=like.device)

            ranges = [[q.bounds.range(n) for q in self.members] for n in self.names]
            c = _Consts(
                lo=[vec([r[0] for r in rs]) for rs in ranges],
                hi=[vec([r[1] for r in rs]) for rs in ranges],
                proj_lo=vec([r[0] + MARGIN for rs in ranges for r in rs]),
                proj_hi=vec([r[1] - MARGIN for rs in ranges for r in rs]),
                sign=vec([float(q.signed) for q in self.members]),
                zero=vec([float(getattr(q, "with_zero", False)) for q in self.members]),
                b_min=vec([q.bounds.b_min for q in self.members]),
            )
            self._consts[key] = c
        return c

    def raw(self, use: _Use | None, n: int = 2) -> list[Tensor]:
        """The stacked raw parameters of the first ``n`` names, one vector per name
        (differentiable; the other names get no gradient)."""
        k = len(self.members)
        ps = self.params()[: n * k]
        if _compiling():
            return [torch.stack(ps[i * k : (i + 1) * k]) for i in range(n)]
        return list(_Stack.apply(use, n, *ps))

    def _step(self, v: Tensor) -> Tensor:
        return pow2round(v) if self.pow2_step else v

    def derived(self, raw: list[Tensor], c: _Consts) -> Derived:
        """``UniformQuantizer.derived`` / ``Pow2Quantizer.derived`` of every member."""
        p, (u, v) = self.parametrization, raw
        if self.uniform:
            if p == "d_qmax":
                return Derived(self._step(_clip(u, c.lo[0], c.hi[0])), _clip(v, c.lo[1], c.hi[1]))
            n_q = ste_round(_clip(u, c.lo[0], c.hi[0]))
            levels = torch.exp2(n_q - c.sign) - 1.0
            if p == "b_d":
                d_q = self._step(_clip(v, c.lo[1], c.hi[1]))
                return Derived(d_q, d_q * levels, n_q)
            x_hi = _clip(v, c.lo[1], c.hi[1])
            return Derived(self._step(x_hi / levels), x_hi, n_q)
        if p == "qmin_qmax":
            return Derived(pow2round(_clip(u, c.lo[0], c.hi[0])),
                           pow2round(_clip(v, c.lo[1], c.hi[1])))  # fmt: skip
        n_q = ste_round(_clip(u, c.lo[0], c.hi[0]))
        span = torch.exp2(torch.exp2(n_q - c.sign - c.zero) - 1.0)
        if p == "b_qmax":
            x_max = pow2round(_clip(v, c.lo[1], c.hi[1]))
            return Derived(x_max / span, x_max, n_q)
        x_min = pow2round(_clip(v, c.lo[1], c.hi[1]))
        return Derived(x_min, x_min * span, n_q)

    def bitwidths(self, raw: list[Tensor], c: _Consts) -> Tensor:
        """``bitwidth_surrogate()`` of every member (spec 5.2)."""
        p = self.parametrization
        if p not in _SURROGATE_FROM_RANGE:  # U1, U2, P1, P2: round(clip(b)); raw may be [b]
            return ste_round(_clip(raw[0], c.lo[0], c.hi[0]))
        d = self.derived(raw, c)
        if p == "d_qmax":
            r = ste_round(d.b / d.a)
            exact = torch.frexp(r.detach()).exponent.to(r.dtype) + c.sign
            smooth = torch.log2(r + 1.0) + c.sign
        else:
            ratio = d.b / d.a
            L = (torch.frexp(ratio.detach()).exponent - 1).to(ratio.dtype)
            exact = torch.frexp(L).exponent.to(ratio.dtype) + 1.0
            smooth = torch.log2(torch.log2(ratio) + 1.0) + 1.0
        return torch.where(
            exact > c.b_min, smooth - smooth.detach() + exact, exact.clamp(min=c.b_min)
        )

    @torch.no_grad()
    def constrain_(self) -> None:
        """``constrain_()`` of every member (spec 1.5), written back with one ``_foreach_copy_``."""
        ps = self.params()
        v = torch.stack(ps)
        c = self.consts(v)
        if self.pair:
            s, large = v.view(2, -1).unbind()
            v = torch.cat([torch.minimum(s, large - MARGIN), torch.maximum(s + MARGIN, large)])
        torch._foreach_copy_(ps, list(torch.clamp(v, c.proj_lo, c.proj_hi).unbind()))

    def clip_lists(self, grads: list[Tensor], bounds: list[Tensor]) -> None:
        """Append ``(grad, small)`` of every member's parameter with a gradient (spec 3.6)."""
        if not self.pair:
            return
        small, large = self.names
        for q in self.members:
            b = q._parameters[small]
            for n in (small, large):
                g = q._parameters[n].grad
                if g is not None:
                    grads.append(g)
                    bounds.append(b)


_SURROGATE_FROM_RANGE = ("d_qmax", "qmin_qmax")
"""Parametrizations whose bitwidth is inferred from the derived range (spec 5.2)."""


# -- all quantizers of a list ---------------------------------------------------------------------


class QuantizerGroups:
    """A fixed list of quantizers, split into groups of one computation (module docstring).

    Every method covers the whole list: the batchable quantizers group by group, the others
    (:func:`batchable` is False) one by one with their own methods. The grouping is re-checked
    on every call (class, parametrization, sign, bounds, flags, device, dtype of each member) and
    rebuilt when one changed.

    Args:
        quantizers: the quantizers, in the order of :meth:`bitwidths` (duplicates allowed).
    """

    def __init__(self, quantizers: Sequence[Quantizer]) -> None:
        self.quantizers = list(quantizers)
        self._build()

    def _build(self) -> None:
        self._version = config_version()
        self._signatures = [_signature(q) for q in self.quantizers]
        keyed: dict[tuple, list[int]] = {}
        self.solo: list[int] = []
        for i, (q, sig) in enumerate(zip(self.quantizers, self._signatures, strict=True)):
            if batchable(q):
                p = q._parameters[q.param_names[0]]
                flag = sig[4] if isinstance(q, UniformQuantizer) else None  # pow2_step
                keyed.setdefault((sig[0], sig[1], flag, p.device, p.dtype), []).append(i)
            else:
                self.solo.append(i)
        self.positions = list(keyed.values())
        self.groups = [_Group([self.quantizers[i] for i in idx]) for idx in self.positions]
        order = [i for idx in self.positions for i in idx] + self.solo
        identity = order == list(range(len(order)))
        # bitwidths(): the concatenated group results, put back into list order
        self._inverse = None if identity else sorted(range(len(order)), key=order.__getitem__)
        self._index: dict[tuple, Tensor] = {}

    def check(self) -> None:
        """Rebuild the groups when a member's class, parametrization, sign, bounds or flags
        changed (looked at only when some quantizer attribute was set since the last look)."""
        if _compiling() or config_version() == self._version:
            return
        if any(_signature(q) != s for q, s in zip(self.quantizers, self._signatures, strict=True)):
            self._build()
        self._version = config_version()

    def matches(self, quantizers: Sequence[Quantizer]) -> bool:
        """True when ``quantizers`` is this object's list (the same objects, same order)."""
        return len(quantizers) == len(self.quantizers) and all(
            a is b for a, b in zip(quantizers, self.quantizers, strict=True)
        )

    @property
    def batched(self) -> list[Quantizer]:
        """The quantizers computed in batch (each group's members, group by group)."""
        return [q for g in self.groups for q in g.members]

    # -- the four computations ---------------------------------------------------------------------
    def derived_vectors(self) -> list[tuple[_Group, _Use, list[Tensor], Derived]]:
        """``(group, use, raw, derived)`` of every group: its members' stacked raw parameters
        and ``derived()`` as vectors (differentiable), with the :class:`_Use` that its
        consumers mark."""
        self.check()
        out = []
        for g in self.groups:
            use = _Use(len(g.members))
            raw = g.raw(use)
            out.append((g, use, raw, g.derived(raw, g.consts(raw[0]))))
        return out

    def derived(self) -> list[tuple[Quantizer, Tensor, Tensor]]:
        """``(q, a, b)`` for every batchable quantizer: its ``derived()`` as 0-d views of the
        group's vectors (differentiable; the gradients of all members flow back together)."""
        out = []
        for g, use, _, d in self.derived_vectors():
            out += zip(g.members, *_split(use, d), strict=True)
        return out

    def bitwidths(self) -> Tensor:
        """``stack([q.bitwidth_surrogate() for q in quantizers])`` (spec 5.2), in list order."""
        self.check()
        parts = []
        for g in self.groups:
            raw = g.raw(None, 2 if g.parametrization in _SURROGATE_FROM_RANGE else 1)
            parts.append(g.bitwidths(raw, g.consts(raw[0])))
        if self.solo:
            parts.append(torch.stack([self.quantizers[i].bitwidth_surrogate() for i in self.solo]))
        if not parts:
            return torch.zeros(0)
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self._inverse is None:
            return values
        key = (values.device,)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor(self._inverse, device=values.device)
        return values[index]

    @torch.no_grad()
    def constrain_(self) -> None:
        """Every quantizer's ``constrain_()`` (spec 1.5)."""
        self.check()
        for g in self.groups:
            g.constrain_()
        for i in self.solo:
            self.quantizers[i].constrain_()

    @torch.no_grad()
    def clip_grad_(self) -> None:
        """Every quantizer's ``clip_grad_()`` (spec 3.6): ``grad <- clip(grad, -|d|, |d|)``
        (``d_qmax``), ``clip(grad, -|q_min|, |q_min|)`` (``qmin_qmax``), four multi-tensor
        operations for all batched quantizers together."""
        self.check()
        grads: list[Tensor] = []
        smalls: list[Tensor] = []
        for g in self.groups:
            g.clip_lists(grads, smalls)
        if grads:
            bound = torch._foreach_abs(smalls)
            torch._foreach_clamp_min_(grads, torch._foreach_neg(bound))
            torch._foreach_clamp_max_(grads, bound)
        for i in self.solo:
            self.quantizers[i].clip_grad_()


_CACHE = "_mixq_quantizer_groups"


def cached_groups(owner: object, quantizers: Sequence[Quantizer]) -> QuantizerGroups:
    """The :class:`QuantizerGroups` of ``quantizers``, cached on ``owner`` (e.g. the model)."""
    cache: dict = owner.__dict__.setdefault(_CACHE, {})
    key = tuple(id(q) for q in quantizers)
    g = cache.get(key)
    if g is None or not g.matches(quantizers):
        if len(cache) > 16:  # lists of a model's quantizers are few; never grow without bound
            cache.clear()
        g = cache[key] = QuantizerGroups(quantizers)
    return g


def check_cached(owner: object) -> None:
    """:meth:`QuantizerGroups.check` of every list cached on ``owner``, run eagerly: compiled
    code skips the check (``QATStep`` calls this before its compiled functions, so that a
    quantizer frozen or given a bit set mid-training leaves its group there too)."""
    for g in owner.__dict__.get(_CACHE, {}).values():
        g.check()


# -- a model forward reads every quantizer's derived scalars from one batched computation ---------


def _tracing() -> bool:
    """Inside torch.compile / torch.export / torch.jit.trace, or under a TorchFunctionMode
    (mixq's site trace)."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch._C._is_torch_function_mode_enabled()
    )


class _Step:
    """The stacked raw parameters and derived vectors of one forward with gradients, and the
    version counters of the parameters they were stacked from
    (:meth:`SharedDerived.bitwidths`)."""

    __slots__ = ("groups", "params", "vectors", "versions")

    def __init__(self, groups: list[_Group], vectors: list) -> None:
        self.groups, self.vectors = groups, vectors
        self.params = [p for g in groups for p in g.params()]
        self.versions = [p._version for p in self.params]

    def current(self) -> bool:
        """No parameter was changed in place (an optimizer step, a load) since the forward."""
        return [p._version for p in self.params] == self.versions


@dataclass
class _Plan:
    """Where each quantizer of a list sits in the groups of :class:`SharedDerived`:
    ``groups``: ``(group index, member indices of the list)`` of every group it needs, in group
    order; ``solo``: its quantizers computed one by one, after them; ``index``: entry ``j`` of
    the result is entry ``index[j]`` of the groups' concatenated surrogates then the solo ones
    (None: the identity)."""

    quantizers: list[Quantizer]
    grouping: list[_Group]
    groups: list[tuple[int, list[int]]]
    solo: list[Quantizer]
    index: Tensor | None

    def valid_for(self, quantizers: Sequence[Quantizer], grouping: list[_Group]) -> bool:
        return grouping is self.grouping and len(quantizers) == len(self.quantizers) and all(
            a is b for a, b in zip(quantizers, self.quantizers, strict=True)
        )

    @classmethod
    def build(cls, quantizers: Sequence[Quantizer], groups: QuantizerGroups) -> _Plan | None:
        where: dict[int, tuple[int, int]] = {}
        for gi, g in enumerate(groups.groups):
            for i, q in enumerate(g.members):
                where.setdefault(id(q), (gi, i))
        solo_ids = {id(groups.quantizers[i]) for i in groups.solo}
        marks: dict[int, list[int]] = {}
        solo: list[Quantizer] = []
        solo_at: dict[int, int] = {}
        for q in quantizers:
            if id(q) in where:
                gi, i = where[id(q)]
                marks.setdefault(gi, []).append(i)
            elif id(q) in solo_ids:
                if id(q) not in solo_at:
                    solo_at[id(q)] = len(solo)
                    solo.append(q)
            else:
                return None  # not one of the forward's quantizers
        order = sorted(marks)
        offset, start = {}, 0
        for gi in order:
            offset[gi] = start
            start += len(groups.groups[gi].members)
        positions = []
        for q in quantizers:
            if id(q) in where:
                gi, i = where[id(q)]
                positions.append(offset[gi] + i)
            else:
                positions.append(start + solo_at[id(q)])
        identity = positions == list(range(start + len(solo)))
        return cls(
            list(quantizers), groups.groups, [(gi, marks[gi]) for gi in order], solo,
            None if identity else torch.tensor(positions),
        )  # fmt: skip


SHARED_DERIVED = "_mixq_shared_derived"
"""Where :func:`share_derived` keeps a model's :class:`SharedDerived` (in its ``__dict__``)."""


class SharedDerived:
    """Forward hooks of a model: before each forward, derive the scalars of every batchable
    quantizer of ``groups`` in one batch and hand each quantizer its ``(a, b)``, and
    fake-quantize the layer weights and biases bound to them in one node per group
    (:mod:`mixq.quant.bound`; with ``model``); after it (always, errors included), take them
    back.

    A quantizer's forward uses the values only when they were derived with gradients or it runs
    without; under ``torch.compile``/``torch.export`` and inside a ``TorchFunctionMode`` the
    hooks do nothing and each quantizer derives its own (the compiler fuses them).
    """

    def __init__(self, groups: QuantizerGroups, model: nn.Module | None = None) -> None:
        self.groups = groups
        self.handles: list = []
        self._found = bound.find_bindings(model) if model is not None else {}
        self._bindings: dict[_Group, list[bound.Binding]] = {}
        self._bound_of: list[_Group] | None = None
        self._handed: list[bound.Binding] = []
        self._step: _Step | None = None
        self._plans: dict[tuple, _Plan] = {}

    def _bindings_of(self, g: _Group) -> list[bound.Binding]:
        if self._bound_of is not self.groups.groups:  # regrouped: the members moved
            self._bindings, self._bound_of = {}, self.groups.groups
        b = self._bindings.get(g)
        if b is None:
            b = self._bindings[g] = bound.group_bindings(g.members, self._found)
        return b

    def before(self, module: nn.Module, args: tuple) -> None:
        """The forward pre-hook."""
        self._step = None
        if _tracing():
            return
        grad = torch.is_grad_enabled()
        vectors = self.groups.derived_vectors()
        for g, use, _, d in vectors:
            for q, a, b in zip(g.members, *_split(use, d), strict=True):
                q.__dict__[SHARED] = (a, b, grad)
            if self._found:
                todo = self._bindings_of(g)
                if todo:
                    self._handed += bound.quantize_bound(todo, g.uniform, use, d.a, d.b, grad)
        if grad:
            self._step = _Step(self.groups.groups, vectors)

    def bitwidths(self, quantizers: Sequence[Quantizer]) -> Tensor | None:
        """``stack([q.bitwidth_surrogate() for q in quantizers])`` (spec 5.2) from the raw
        parameters the last forward stacked, or None when they cannot serve.

        The memory penalty of a training step reads the quantizers the forward just derived;
        computing their surrogates on the forward's vectors (rather than stacking the
        parameters again) makes the penalty's gradient and the forward's meet in one vector per
        group, so each parameter receives one sum, not one per consumer. The values equal
        :meth:`QuantizerGroups.bitwidths` bit for bit (the same operations on the same stacked
        values), and so do the gradients where each quantizer has one consumer in the forward
        (the penalty's and the forward's gradients are added once, at the stacked parameter,
        as they are at the parameter per quantizer); else up to the order of summation.

        None (the caller computes afresh) without gradients, under tracing, after a
        regrouping, when a parameter changed since that forward (its version counter), for an
        empty list, or when a quantizer of ``quantizers`` was not among the forward's.
        """
        step = self._step
        if step is None or not quantizers or not torch.is_grad_enabled() or _tracing():
            return None
        self.groups.check()
        if step.groups is not self.groups.groups or not step.current():
            return None
        plan = self._plan(quantizers)
        if plan is None:
            return None
        parts = []
        for gi, marks in plan.groups:
            g, use, raw, _ = step.vectors[gi]
            for i in marks:  # the penalty's gradient reaches them (see _Stack)
                use.used[i] = True
            # derived anew from the shared raw vectors: the two gradients then meet where the
            # per-quantizer path adds them (at the raw parameters), so the sums are the same
            parts.append(g.bitwidths(raw, g.consts(raw[0])))
        parts += [q.bitwidth_surrogate().reshape(1) for q in plan.solo]
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        if plan.index is None:
            return values
        if plan.index.device != values.device:
            plan.index = plan.index.to(values.device)
        return values[plan.index]

    def _plan(self, quantizers: Sequence[Quantizer]) -> _Plan | None:
        key = tuple(id(q) for q in quantizers)
        plan = self._plans.get(key)
        if plan is not None and plan.valid_for(quantizers, self.groups.groups):
            return plan
        plan = _Plan.build(quantizers, self.groups)
        if plan is not None:
            if len(self._plans) > 16:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def after(self, module: nn.Module, args: tuple, output: object) -> None:
        """The forward hook (``always_call``)."""
        if _tracing():  # nothing was handed over (and no side effect for the compiler)
            return
        for q in self.groups.quantizers:
            q.__dict__.pop(SHARED, None)
        if self._handed:
            bound.release(self._handed)
            self._handed = []

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickle) starts without the last forward's vectors: they are not
        # graph leaves (no deepcopy), and they belong to the original's step
        state = dict(self.__dict__)
        state["_step"], state["_plans"] = None, {}
        return state

    def remove(self) -> None:
        """Unregister both hooks."""
        self._step = None
        for h in self.handles:
            h.remove()
        self.handles = []


def share_derived(model: nn.Module, quantizers: Sequence[Quantizer]) -> SharedDerived:
    """Make every forward of ``model`` derive the scalars of ``quantizers`` in one batch.

    Replaces the hooks an earlier call put on ``model``; returns the hook object
    (``.remove()`` unregisters it).
    """
    old = model.__dict__.get(SHARED_DERIVED)
    if old is not None:
        old.remove()
    s = SharedDerived(cached_groups(model, quantizers), model)
    s.handles = [
        model.register_forward_pre_hook(s.before),
        model.register_forward_hook(s.after, always_call=True),
    ]
    model.__dict__[SHARED_DERIVED] = s
    return s


__all__ = [
    "SHARED_DERIVED",
    "Derived",
    "QuantizerGroups",
    "SharedDerived",
    "batchable",
    "cached_groups",
    "check_cached",
    "share_derived",
]
