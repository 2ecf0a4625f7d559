"""The quantizer base class: parameters, validation, projection and gradient clipping.

A quantizer owns two trainable scalars (the parametrization's, registered under the paper's
names ``b``, ``d``, ``q_min``, ``q_max``) and *derives* everything else. Subclasses implement
``derived()`` (raw parameters -> rounded/clipped scalars, differentiable through the STE
primitives), ``bitwidth`` (an int) and ``bitwidth_surrogate()`` (its differentiable twin).
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import Tensor, nn

from mixq.quant.bounds import MARGIN, Bounds
from mixq.quant.ste import clip_scalar, ste_round

#: The spec string of each parametrization: ``kind/parametrization`` -> its two parameters.
PARAMETRIZATIONS: dict[str, tuple[str, str]] = {
    "uniform/b_d": ("b", "d"),
    "uniform/b_qmax": ("b", "q_max"),
    "uniform/d_qmax": ("d", "q_max"),
    "pow2/b_qmax": ("b", "q_max"),
    "pow2/b_qmin": ("b", "q_min"),
    "pow2/qmin_qmax": ("q_min", "q_max"),
}


_config_version = 0


def config_version() -> int:
    """A counter that changes whenever an attribute of any quantizer is set (``bounds``,
    ``signed``, a Parameter, ...; not ``training``): :mod:`mixq.quant.group` re-checks its
    grouping of the quantizers only then, instead of on every call."""
    return _config_version


SHARED = "_mixq_shared"
"""Instance attribute that :mod:`mixq.quant.group` sets on a quantizer for one model forward:
``(a, b, grad_enabled)``, the quantizer's ``derived()`` computed in batch with its group's."""

SHARED_TENSORS = "_mixq_shared_tensors"
"""Instance attribute that :mod:`mixq.quant.bound` sets on a layer for one model forward:
``(grad_enabled, {"weight": Q_w(W), "bias": Q_b(b)})``, its tensors fake-quantized in batch with
the other layers' (the layer reads them instead of calling its quantizers)."""


def check_parametrization(kind: str, parametrization: str) -> tuple[str, str]:
    """Return the parameter names of ``kind/parametrization`` or raise a ``ValueError``."""
    key = f"{kind}/{parametrization}"
    if key not in PARAMETRIZATIONS:
        valid = sorted(p.split("/")[1] for p in PARAMETRIZATIONS if p.startswith(kind + "/"))
        hint = difflib.get_close_matches(parametrization, valid, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(
            f"unknown {kind} parametrization {parametrization!r}; valid: {valid}.{extra}"
        )
    return PARAMETRIZATIONS[key]


def check_bit_set(
    bit_set: tuple[int, ...] | list[int] | None, bounds: Bounds, what: str = "quantizer"
) -> tuple[int, ...] | None:
    """``bit_set`` sorted and deduplicated, or a ``ValueError`` naming the fix.

    Every member must be an integer inside ``[b_min, b_max]``: outside, no parameter value
    gives that bitwidth (U1/U2/P1/P2 clip ``b``), or the budget feasibility check could
    not rely on ``b_min``.
    """
    if bit_set is None:
        return None
    vals = list(bit_set)
    if not vals or any(isinstance(v, bool) or int(v) != v for v in vals):
        raise ValueError(f"{what}: bit_set {vals!r} must be a non-empty list of integers")
    out = tuple(sorted({int(v) for v in vals}))
    bad = [v for v in out if not bounds.b_min <= v <= bounds.b_max]
    if bad:
        raise ValueError(
            f"{what}: bit_set {list(out)} has {bad} outside the bitwidth bounds "
            f"[b_min={bounds.b_min:g}, b_max={bounds.b_max:g}]; drop them or change "
            "b_min/b_max in the site's bounds"
        )
    return out


def bits_interval(bits: int, levels: list[int], offset: int) -> tuple[int, int]:
    """``[n_lo, n_hi]``: the integers ``n >= 0`` charged exactly ``bits`` when the charge is
    ``min{l in levels : l >= max(bitlength(n) + offset, min(levels))}``.

    U3: ``n = k = round(x_hi / d_q)``, ``offset = [signed]``; P3: ``n = L``, ``offset = 1``
    (spec 5.2). ``n_hi = 2^(bits - offset) - 1``; ``n_lo = 2^(P - offset)`` with ``P`` the
    largest level below ``bits`` (0 when there is none).
    """
    below = [v for v in levels if v < bits]
    lo = 0 if not below else 2 ** max(max(below) - offset, 0)
    return lo, 2 ** (bits - offset) - 1


class Quantizer(nn.Module):
    """Common machinery of :class:`UniformQuantizer` and :class:`Pow2Quantizer`.

    Attributes:
        kind: ``"uniform"`` or ``"pow2"``.
        parametrization: e.g. ``"d_qmax"``.
        signed: weights/biases (True) or activations after a ReLU (False).
        bounds: ranges of the raw parameters (spec 1.4, 2.3).
        numel: elements the quantized tensor holds (per sample for activations); set by
            ``mixq.quantize_model`` and used by the memory model. ``None`` until known.
        bit_set: the bitwidths this site may take (e.g. ``(4, 8)`` for an int4/int8 target),
            or None for every integer in ``[b_min, b_max]``. U1/U2/P1/P2 use the member
            nearest to ``clip(b)`` (ties to the smaller); U3/P3 are charged the smallest
            member at least their range's bitwidth, and the projection keeps that range
            within the largest member.
        frozen_bits: set by :meth:`freeze_bits_`: the projection then keeps the bitwidth
            at this value while the step size trains (see :meth:`freeze_bits_`).
    """

    kind: str = ""

    def __init__(
        self,
        parametrization: str,
        signed: bool,
        bounds: Bounds,
        values: dict[str, float | None],
        learnable: bool = True,
        bit_set: tuple[int, ...] | list[int] | None = None,
    ) -> None:
        super().__init__()
        self.param_names = check_parametrization(self.kind, parametrization)
        self.parametrization = parametrization
        self.signed = bool(signed)
        self.bounds = bounds
        self.learnable = learnable
        self.numel: int | None = None
        self.bit_set = check_bit_set(bit_set, bounds, f"{self.kind}/{parametrization}")
        #: the bitwidth held by the projection after :meth:`freeze_bits_` (None: learned)
        self.frozen_bits: int | None = None
        #: U3/P3 frozen: the held step ``d_q`` / smallest magnitude ``x_min``
        self.held_scale: float | None = None
        given = {k: v for k, v in values.items() if v is not None}
        extra = sorted(set(given) - set(self.param_names))
        if extra:
            raise ValueError(
                f"{self.kind}/{parametrization} takes parameters {list(self.param_names)}; "
                f"got superfluous {extra}"
            )
        for name in self.param_names:
            self.register_parameter(name, nn.Parameter(torch.tensor(1.0), requires_grad=learnable))
        if not given:
            self.reset_parameters()
            return
        missing = [n for n in self.param_names if n not in given]
        if missing:
            raise ValueError(
                f"{self.kind}/{parametrization} needs both {list(self.param_names)}; "
                f"missing {missing} (or give none for the default initialisation)"
            )
        for name, v in given.items():
            lo, hi = bounds.range(name)
            if not (math.isfinite(v) and lo <= v <= hi):
                raise ValueError(
                    f"{name}={v} is out of bounds [{lo}, {hi}] for {self.kind}/{parametrization}"
                    f"; pass {name}_min/{name}_max to change the bounds"
                )
            getattr(self, name).data.fill_(float(v))

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name != "training":  # train()/eval() sets it on every module; it changes no formula
            global _config_version
            _config_version += 1

    # -- to be provided by subclasses ------------------------------------------------------
    def derived(self) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def bitwidth(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def bitwidth_surrogate(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_from_range(self, b: int, q_max: float, d: float) -> None:  # pragma: no cover
        """Set the raw parameters from an initial bitwidth ``b``, range ``q_max`` and step ``d``."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self, b: int = 4, d: float = 2.0**-3) -> None:
        """The data-free initialisation (spec section 6 and decision 8).

        ``d0 = 2^-3``; ``q_max0 = d0 * (2^(b-1) - 1)`` when signed, ``d0 * (2^b - 1)`` when
        unsigned (1.875 for the 4-bit activations of the paper); pow-2 as in ``init_from_tensor``.
        """
        levels = (2 ** (b - 1) - 1) if self.signed else (2**b - 1)
        self.set_from_range(b, d * levels, d)
        self.constrain_()

    # -- bit sets and frozen bits -----------------------------------------------------------
    def levels_allowed(self) -> list[int]:
        """The bitwidths this quantizer can be charged: ``bit_set``, else the integers of
        ``[b_min, b_max]`` (for U3/P3 the range can exceed ``b_max``; the repair step and
        freezing only choose among these)."""
        if self.bit_set is not None:
            return list(self.bit_set)
        return list(range(math.ceil(self.bounds.b_min), math.floor(self.bounds.b_max) + 1))

    @property
    def min_bits(self) -> int:
        """The smallest bitwidth the bounds and ``bit_set`` allow."""
        return self.levels_allowed()[0]

    def _bits_from_b(self) -> Tensor:
        """``n_q``: ``round(clip(b))``, or with a ``bit_set`` the member nearest to ``clip(b)``
        (ties to the smaller); identity gradient (STE) inside the bounds."""
        raw = self._clip("b")
        if self.bit_set is None:
            return ste_round(raw)
        allowed = torch.tensor(self.bit_set, dtype=raw.dtype, device=raw.device)
        nearest = allowed[(raw.detach() - allowed).abs().argmin()]  # first min: the smaller
        return raw + (nearest - raw).detach()

    def _charge(self, exact: Tensor) -> Tensor:
        """The bitwidth charged for a range needing ``exact`` bits (already >= ``b_min``):
        the smallest ``bit_set`` member ``>= exact``; ``exact`` itself without a set or
        above the set (never less than the codes need)."""
        if self.bit_set is None:
            return exact
        allowed = torch.tensor(self.bit_set, dtype=exact.dtype, device=exact.device)
        idx = torch.searchsorted(allowed, exact.reshape(1)).clamp(max=len(self.bit_set) - 1)
        return torch.where(exact > allowed[-1], exact, allowed[idx].reshape(()))

    def _project_bits_(self) -> None:
        """Keep the bitwidth at ``frozen_bits`` (or within ``bit_set``): subclasses."""

    @torch.no_grad()
    def freeze_bits_(self, bits: int | None = None) -> None:
        """Hold the bitwidth at ``bits`` (default: the current one) from now on.

        Per parametrization, what still trains (the projection :meth:`constrain_` holds the
        rest): U1 ``b_d``: ``d``; U2 ``b_qmax``: ``q_max`` (the step follows); P1 ``b_qmin``:
        ``q_min``; P2 ``b_qmax``: ``q_max`` (``b`` is reset to ``bits`` after every step).
        U3 ``d_qmax``: the step ``d_q`` is held (``d`` stays inside its power-of-two rounding
        interval) and ``q_max`` trains within the levels ``k = round(q_max / d_q)`` that give
        ``bits``; P3 ``qmin_qmax``: ``x_min`` is held the same way and ``q_max`` trains within
        the exponent spans ``L`` that give ``bits``. (Holding the step: with the bits fixed, a
        halved ``d_q`` would force a halved range, a jump the task gradient cannot see.)

        Raises:
            ValueError: ``bits`` is not an allowed bitwidth (``levels_allowed``).
        """
        bits = self.bitwidth if bits is None else int(bits)
        if bits not in self.levels_allowed():
            raise ValueError(
                f"cannot freeze {self.kind}/{self.parametrization} at {bits} bits: allowed "
                f"{self.levels_allowed()}"
            )
        self.frozen_bits = bits
        if "b" not in self.param_names:
            with torch.no_grad():
                self.held_scale = float(self.derived()[0])
        self.constrain_()
        if self.bitwidth != bits:  # the parameter bounds leave no value with that bitwidth
            self.frozen_bits = self.held_scale = None
            raise ValueError(
                f"cannot hold {self.kind}/{self.parametrization} at {bits} bits within its "
                f"parameter bounds {self.bounds}"
            )

    def unfreeze_bits_(self) -> None:
        """Let the bitwidth be learned again."""
        self.frozen_bits = self.held_scale = None

    def _hold_scale_(self, name: str, pow2: bool) -> None:
        """Keep ``derived()[0]`` at ``held_scale``: the raw ``name`` inside the interval that
        rounds to it (power of two: ``[s 2^-1/2, s 2^1/2)``), else equal to it."""
        if self.held_scale is None:
            return
        p, s = getattr(self, name), self.held_scale
        lo, hi = self.bounds.range(name)
        if pow2:
            p.clamp_(min=s * 2**-0.5 * (1 + 1e-4), max=s * 2**0.5 * (1 - 1e-4))
        else:
            p.fill_(s)
        p.clamp_(min=lo + MARGIN, max=hi - MARGIN)

    # -- shared ----------------------------------------------------------------------------
    def forward_derived(self) -> tuple[Tensor, Tensor]:
        """``derived()`` for the forward: the batch's values when a model forward handed them
        over (:func:`mixq.quant.group.share_derived`; equal bit for bit), else computed here.

        Values derived without gradients serve only a forward without gradients.
        """
        shared = self.__dict__.get(SHARED)
        if shared is not None and (shared[2] or not torch.is_grad_enabled()):
            return shared[0], shared[1]
        return self.derived()

    def _clip(self, name: str) -> Tensor:
        lo, hi = self.bounds.range(name)
        return clip_scalar(getattr(self, name), lo, hi)

    def _set(self, name: str, value: float) -> None:
        if name in self.param_names:
            getattr(self, name).data.fill_(float(value))

    @torch.no_grad()
    def init_from_tensor(self, w: Tensor, b: int = 4) -> None:
        """Initialise from a float tensor (spec section 6, the weight rule).

        ``d0 = 2^floor(log2(max|w| / (2^(b-1) - 1)))`` for ``b <= 4`` (``ceil`` above),
        ``q_max0 = d0 * (2^(b-1) - 1)``, bitwidth parameter ``b``. For unsigned quantizers the
        level count ``2^b - 1`` replaces ``2^(b-1) - 1``. Pow-2 quantizers then round ``q_max0``
        to a power of two and set ``q_min0 = q_max0 / 2^(2^(b-1) - 1)``.
        """
        if w.numel() == 0:
            raise ValueError("init_from_tensor: empty tensor")
        levels = (2 ** (b - 1) - 1) if self.signed else (2**b - 1)
        m = float(w.detach().abs().max()) + float(torch.finfo(torch.float32).eps)
        e = math.log2(m / levels)
        d0 = 2.0 ** (math.floor(e) if b <= 4 else math.ceil(e))
        self.set_from_range(b, d0 * levels, d0)
        self.constrain_()

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project the raw parameters into their bounds (spec 1.5, ``clip_quant_vals``).

        ``v <- min(max(v, lo + 1e-5), hi - 1e-5)`` for each parameter; for ``d_qmax`` and
        ``qmin_qmax`` first ``small <- min(small, large - 1e-5)``, ``large <- max(small_old +
        1e-5, large)`` (which swaps the two if they crossed). Idempotent; leaves in-bounds
        values unchanged.
        """
        names = self.param_names
        if names in (("d", "q_max"), ("q_min", "q_max")):
            small, large = getattr(self, names[0]), getattr(self, names[1])
            s_old, l_old = small.clone(), large.clone()
            small.copy_(torch.minimum(s_old, l_old - MARGIN))
            large.copy_(torch.maximum(s_old + MARGIN, l_old))
        if self.frozen_bits is not None and "b" in names:
            self.b.fill_(float(self.frozen_bits))
        for name in names:
            p = getattr(self, name)
            lo, hi = self.bounds.range(name)
            p.copy_(p.clamp(min=lo + MARGIN).clamp(max=hi - MARGIN))
        if "b" not in names and (self.frozen_bits is not None or self.bit_set is not None):
            self._project_bits_()

    @torch.no_grad()
    def clip_grad_(self) -> None:
        """Clip the parameter gradients as the reference code does under a memory target (3.6).

        ``d_qmax``: ``grad_d, grad_q_max <- clip(., -d, d)``; ``qmin_qmax``: ``grad_q_min,
        grad_q_max <- clip(., -q_min, q_min)`` (raw ``d`` / ``q_min``). Other parametrizations:
        unchanged.
        """
        names = self.param_names
        if names not in (("d", "q_max"), ("q_min", "q_max")):
            return
        bound = getattr(self, names[0]).detach().abs()
        for name in names:
            g = getattr(self, name).grad
            if g is not None:
                torch.clamp(g, -bound, bound, out=g)

    def extra_repr(self) -> str:
        vals = ", ".join(f"{n}={float(getattr(self, n).detach()):.6g}" for n in self.param_names)
        sign = "signed" if self.signed else "unsigned"
        extra = f", bit_set={list(self.bit_set)}" if self.bit_set else ""
        extra += f", frozen at {self.frozen_bits} bits" if self.frozen_bits is not None else ""
        return f"{self.parametrization}, {sign}, {vals}, bitwidth={self.bitwidth}{extra}"
