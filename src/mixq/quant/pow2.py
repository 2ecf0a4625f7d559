"""Power-of-two quantizer with the parametrizations P2 ``b_qmax``, P1 ``b_qmin`` and
P3 ``qmin_qmax`` (docs/method.md sections 2 and 3.5).

Derived quantities (spec 2.3), ``n_eff = round(clip(b)) - [signed] - [with_zero]``:

* ``qmin_qmax``: ``x_min = pow2round(clip(q_min))``, ``x_max = pow2round(clip(q_max))``
* ``b_qmax``:    ``x_max = pow2round(clip(q_max))``, ``x_min = 2^(-2^n_eff + 1) * x_max``
* ``b_qmin``:    ``x_min = pow2round(clip(q_min))``, ``x_max = x_min * 2^(2^n_eff - 1)``

Bitwidth (spec 5.2): ``round(clip(b))`` for P1/P2; for P3 with ``L = log2(x_max / x_min)``:
``max(ceil(log2(L + 1) + 1), b_min)`` for weights and activations alike (for activations the
``+1`` is the zero code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mixq.quant.base import Quantizer, bits_interval
from mixq.quant.bounds import MARGIN, default_bounds
from mixq.quant.functional import fake_quant_pow2
from mixq.quant.ste import pow2round


class Pow2Quantizer(Quantizer):
    """Learned power-of-two quantizer ``Q_P(x; theta)`` (paper Eq. 4, reference semantics).

    Args:
        parametrization: ``"b_qmax"`` (P2), ``"b_qmin"`` (P1) or ``"qmin_qmax"`` (P3).
        signed: True for weights (magnitudes ``{q_min, ..., q_max}`` with a sign, no zero);
            False for activations (a ReLU first, then ``{0} U {q_min, ..., q_max}``).
        b, q_min, q_max: initial values of the two parameters; both or none (none: the
            data-free initialisation at 4 bits).
        with_zero: whether 0 is representable (default: ``not signed``, as the paper).
        learnable: False freezes the parameters (the "Fixed" baselines).
        bit_set: the bitwidths allowed (e.g. ``(4, 8)``), see :class:`Quantizer`.
        **bounds: ``b_min``, ``b_max``, ``q_min_min``, ``q_min_max``, ``q_max_min``,
            ``q_max_max``.

    Example:
        >>> q = Pow2Quantizer("qmin_qmax", q_min=0.125, q_max=1.0)
        >>> q(torch.tensor([0.3, -4.0, 0.0])), q.bitwidth
        (tensor([ 0.2500, -1.0000,  0.1250], grad_fn=<_FakeQuantPow2Backward>), 3)
    """

    kind = "pow2"

    def __init__(
        self,
        parametrization: str,
        *,
        signed: bool = True,
        b: float | None = None,
        q_min: float | None = None,
        q_max: float | None = None,
        with_zero: bool | None = None,
        learnable: bool = True,
        bit_set: tuple[int, ...] | list[int] | None = None,
        **bounds: float,
    ) -> None:
        self.with_zero = (not signed) if with_zero is None else bool(with_zero)
        super().__init__(
            parametrization,
            signed,
            default_bounds("pow2", signed, **bounds),
            {"b": b, "q_min": q_min, "q_max": q_max},
            learnable,
            bit_set,
        )

    def derived(self) -> tuple[Tensor, Tensor]:
        """``(x_min, x_max)``: the smallest and largest magnitudes, both powers of two."""
        p = self.parametrization
        if p == "qmin_qmax":
            return pow2round(self._clip("q_min")), pow2round(self._clip("q_max"))
        n_eff = self._bits_from_b() - float(self.signed) - float(self.with_zero)
        span = torch.exp2(torch.exp2(n_eff) - 1.0)  # x_max / x_min = 2^(2^n_eff - 1)
        if p == "b_qmax":
            x_max = pow2round(self._clip("q_max"))
            return x_max / span, x_max
        x_min = pow2round(self._clip("q_min"))
        return x_min, x_min * span

    def forward(self, x: Tensor, cap: float | None = None) -> Tensor:
        """Fake-quantize ``x``: ``sign(x) * clip(2^round(log2|x|), x_min, x_max)``; of
        ``min(x, cap)`` when ``cap`` is given (a replaced ReLU6, fused into the kernel)."""
        x_min, x_max = self.forward_derived()
        if x_min.dtype != x.dtype:
            x_min, x_max = x_min.to(x.dtype), x_max.to(x.dtype)
        return fake_quant_pow2(x, x_min, x_max, self.signed, self.with_zero, cap)

    @property
    def q_min_effective(self) -> float:
        """``x_min``: the smallest non-zero output magnitude."""
        with torch.no_grad():
            return float(self.derived()[0])

    @property
    def q_max_effective(self) -> float:
        """``x_max``: the largest output magnitude."""
        with torch.no_grad():
            return float(self.derived()[1])

    @property
    def exponent_span(self) -> int:
        """``L = log2(x_max / x_min)``: the outputs use ``L + 1`` magnitudes."""
        return round(math.log2(self.q_max_effective / self.q_min_effective))

    @property
    def bitwidth(self) -> int:
        """The integer bitwidth of spec 5.2."""
        with torch.no_grad():
            return int(self.bitwidth_surrogate())

    def bitwidth_surrogate(self) -> Tensor:
        """Differentiable bitwidth whose value equals :attr:`bitwidth` (spec 5.2).

        P1/P2: ``round(clip(b))`` with STE. P3: STE view of ``max(ceil(log2(L + 1) + 1), b_min)``
        with ``L = log2(x_max / x_min)``, giving ``db/dq_max = 1/((ln2)^2 (L+1) q_max)``,
        ``db/dq_min = -1/((ln2)^2 (L+1) q_min)`` (raw parameters); zero gradient at the
        ``b_min`` floor. Exact without host sync: ``L`` and ``ceil(log2(L + 1))`` come from
        ``frexp`` exponents (``x_max / x_min`` is an exact power of two). With a ``bit_set``
        the value is the smallest member at least that bitwidth (P3) or the member nearest to
        ``clip(b)`` (P1/P2), with the same gradients.
        """
        if self.parametrization != "qmin_qmax":
            return self._bits_from_b()
        x_min, x_max = self.derived()
        ratio = x_max / x_min
        L = (torch.frexp(ratio.detach()).exponent - 1).to(ratio.dtype)
        exact = torch.frexp(L).exponent.to(ratio.dtype) + 1.0
        smooth = torch.log2(torch.log2(ratio) + 1.0) + 1.0
        b_min = self.bounds.b_min
        charged = self._charge(exact.clamp(min=b_min))
        return torch.where(exact > b_min, smooth - smooth.detach() + charged, charged)

    def _project_bits_(self) -> None:
        """P3: clamp ``q_max`` so that ``L = log2(x_max / x_min)`` lies in the spans of
        ``frozen_bits`` (:func:`~mixq.quant.base.bits_interval`, offset 1), or at most those
        of the largest ``bit_set`` member; frozen, ``x_min`` is held first."""
        if self.frozen_bits is not None:
            self._hold_scale_("q_min", True)
        bits = self.frozen_bits if self.frozen_bits is not None else max(self.bit_set)
        lo_l, hi_l = bits_interval(bits, self.levels_allowed(), 1)
        if self.frozen_bits is None:
            lo_l = 0
        # x_max = 2^round_half_away(log2 q_max): exponents in [e_min + lo_l, e_min + hi_l]
        e_min = torch.log2(self.derived()[0])
        lo = torch.exp2(e_min + max(lo_l - 0.5, 0.0) + 1e-3)
        hi = torch.exp2(e_min + hi_l + 0.5 - 1e-3)
        q_lo, q_hi = self.bounds.range("q_max")
        lo = torch.maximum(lo, self.q_min + MARGIN)
        self.q_max.copy_(self.q_max.clamp(min=lo, max=hi)
                         .clamp(min=q_lo + MARGIN, max=q_hi - MARGIN))  # fmt: skip

    def set_from_range(self, b: int, q_max: float, d: float) -> None:
        """Pow-2 init from the uniform one (spec 6): ``q_max0 = 2^round(log2 q_max)``,
        ``q_min0 = q_max0 / 2^(2^(b-1) - 1)``."""
        del d
        x_max = 2.0 ** round(math.log2(q_max))
        x_min = x_max / 2.0 ** (2 ** (b - 1) - 1)
        self._set("b", b)
        self._set("q_min", x_min)
        self._set("q_max", x_max)

    def encoding(self) -> dict:
        """What an exporter needs: ``y = s * q_min * 2^e``, ``e`` in ``[0, L]`` (or zero)."""
        return {
            "kind": "pow2",
            "parametrization": self.parametrization,
            "signed": self.signed,
            "with_zero": self.with_zero,
            "bitwidth": self.bitwidth,
            "q_min": self.q_min_effective,
            "q_max": self.q_max_effective,
            "L": self.exponent_span,
        }
