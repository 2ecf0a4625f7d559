"""Uniform (fixed-point) quantizer with the parametrizations U1 ``b_d``, U2 ``b_qmax`` and
U3 ``d_qmax`` (docs/method.md sections 1 and 3.2-3.4).

Derived quantities (spec 1.3), with ``n_q = round(clip(b))`` and ``n_eff = n_q - [signed]``:

* ``b_d``:    ``d_q = pow2round(clip(d))``, ``x_hi = d_q * (2^n_eff - 1)``
* ``b_qmax``: ``x_hi = clip(q_max)``, ``d_q = pow2round(x_hi / (2^n_eff - 1))``
* ``d_qmax``: ``d_q = pow2round(clip(d))``, ``x_hi = clip(q_max)``

and ``y = d_q * round(clip(x, x_lo, x_hi) / d_q)``. Bitwidth (spec 5.2): ``round(clip(b))`` for
U1/U2; for U3 with ``k = round(x_hi / d_q)``: ``max(ceil(log2(k + 1) + 1), b_min)`` signed,
``max(ceil(log2(k + 1)), b_min)`` unsigned (not clipped to ``b_max``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixq.quant.base import Quantizer, bits_interval
from mixq.quant.bounds import MARGIN, default_bounds
from mixq.quant.functional import fake_quant_uniform
from mixq.quant.ste import pow2round, ste_round


class UniformQuantizer(Quantizer):
    """Learned uniform quantizer ``Q_U(x; theta)`` (paper Eq. 1, reference-code semantics).

    Args:
        parametrization: ``"b_d"`` (U1), ``"b_qmax"`` (U2) or ``"d_qmax"`` (U3, the paper's).
        signed: True for weights and biases (``x_lo = -x_hi``, ``b`` counts the sign bit);
            False for activations (``x_lo = 0``: the quantizer replaces the ReLU).
        b, d, q_max: initial values of the parametrization's two parameters; give both or
            none (none: the data-free initialisation at 4 bits, ``d = 2^-3``).
        pow2_step: round the step size to a power of two (default, decision 2).
        learnable: False freezes the parameters (the "Fixed" baselines).
        bit_set: the bitwidths allowed (e.g. ``(4, 8)``), see :class:`Quantizer`.
        **bounds: ``b_min``, ``b_max``, ``d_min``, ``d_max``, ``q_max_min``, ``q_max_max``.

    Example:
        >>> q = UniformQuantizer("d_qmax", d=0.25, q_max=0.75)
        >>> q(torch.tensor([0.3, -1.0, 0.1])), q.bitwidth
        (tensor([ 0.2500, -0.7500,  0.0000], grad_fn=<_FakeQuantUniformBackward>), 3)
    """

    kind = "uniform"

    def __init__(
        self,
        parametrization: str,
        *,
        signed: bool = True,
        b: float | None = None,
        d: float | None = None,
        q_max: float | None = None,
        pow2_step: bool = True,
        learnable: bool = True,
        bit_set: tuple[int, ...] | list[int] | None = None,
        **bounds: float,
    ) -> None:
        self.pow2_step = pow2_step
        super().__init__(
            parametrization,
            signed,
            default_bounds("uniform", signed, **bounds),
            {"b": b, "d": d, "q_max": q_max},
            learnable,
            bit_set,
        )

    def _step(self, v: Tensor) -> Tensor:
        return pow2round(v) if self.pow2_step else v

    def _n_eff(self) -> Tensor:
        return self._bits_from_b() - (1.0 if self.signed else 0.0)

    def derived(self) -> tuple[Tensor, Tensor]:
        """``(d_q, x_hi)``: the step and the clip bound, differentiable w.r.t. the parameters."""
        p = self.parametrization
        if p == "d_qmax":
            return self._step(self._clip("d")), self._clip("q_max")
        levels = torch.exp2(self._n_eff()) - 1.0
        if p == "b_d":
            d_q = self._step(self._clip("d"))
            return d_q, d_q * levels
        x_hi = self._clip("q_max")
        return self._step(x_hi / levels), x_hi

    def forward(self, x: Tensor, cap: float | None = None) -> Tensor:
        """Fake-quantize ``x`` (any shape): ``d_q * round(clip(x, x_lo, x_hi) / d_q)``; of
        ``min(x, cap)`` when ``cap`` is given (a replaced ReLU6, fused into the kernel)."""
        d_q, x_hi = self.forward_derived()
        if d_q.dtype != x.dtype:
            d_q, x_hi = d_q.to(x.dtype), x_hi.to(x.dtype)
        return fake_quant_uniform(x, d_q, x_hi, self.signed, cap)

    # -- derived quantities, read-only --------------------------------------------------------
    @property
    def step(self) -> float:
        """``d_q``: the (power-of-two) step size used in the forward pass."""
        with torch.no_grad():
            return float(self.derived()[0])

    @property
    def clip_bound(self) -> float:
        """``x_hi``: the float clip bound (not necessarily a multiple of ``d_q``)."""
        with torch.no_grad():
            return float(self.derived()[1])

    @property
    def levels(self) -> int:
        """``k = round(x_hi / d_q)``: the largest level index; outputs are ``d_q * {-k..k}``."""
        with torch.no_grad():
            d_q, x_hi = self.derived()
            return int(ste_round(x_hi / d_q))

    @property
    def q_max_effective(self) -> float:
        """The largest output magnitude ``k * d_q`` (may differ from ``x_hi`` by < d_q/2)."""
        return self.levels * self.step

    @property
    def bitwidth(self) -> int:
        """The integer bitwidth of spec 5.2 (sign bit included when signed).

        U2 caveat (spec 1.3): ``round(x_hi / d_q)`` can reach ``2^n_eff`` when the step is
        rounded down; the reference code still charges ``b`` bits, and so does this value.
        """
        with torch.no_grad():
            return int(self.bitwidth_surrogate())

    def bitwidth_surrogate(self) -> Tensor:
        """Differentiable bitwidth whose value equals :attr:`bitwidth` (spec 5.2).

        U1/U2: ``round(clip(b))`` with STE (``db/db = 1`` inside the bounds). U3: the STE view
        of ``max(ceil(log2(round(x_hi/d_q) + 1) + 1), b_min)`` (no ``+1`` when unsigned), giving
        ``db/dq_max = 1/(ln2 (r+1) d_q)``, ``db/dd = -x_hi/(ln2 (r+1) d_q^2) * d_q/d``; zero
        gradient at the ``b_min`` floor. No host sync: ``ceil(log2(k+1))`` is the exponent of
        ``frexp(k)`` (the bit length of the integer ``k``), exact in floating point.
        With a ``bit_set`` the value is the smallest member at least that bitwidth (U3) or
        the member nearest to ``clip(b)`` (U1/U2), with the same gradients.
        """
        if self.parametrization != "d_qmax":
            return self._bits_from_b()
        d_q, x_hi = self.derived()
        r = ste_round(x_hi / d_q)
        sign_bit = 1.0 if self.signed else 0.0
        exact = torch.frexp(r.detach()).exponent.to(r.dtype) + sign_bit
        smooth = torch.log2(r + 1.0) + sign_bit
        b_min = self.bounds.b_min
        charged = self._charge(exact.clamp(min=b_min))
        return torch.where(exact > b_min, smooth - smooth.detach() + charged, charged)

    def _project_bits_(self) -> None:
        """U3: clamp ``q_max`` so that ``k = round(q_max / d_q)`` lies in the levels of
        ``frozen_bits`` (:func:`~mixq.quant.base.bits_interval`), or at most those of the
        largest ``bit_set`` member; frozen, the step ``d_q`` is held first."""
        if self.frozen_bits is not None:
            self._hold_scale_("d", self.pow2_step)
        bits = self.frozen_bits if self.frozen_bits is not None else max(self.bit_set)
        lo_k, hi_k = bits_interval(bits, self.levels_allowed(), int(self.signed))
        if self.frozen_bits is None:
            lo_k = 0
        d_q = self.derived()[0]
        # round_half_away(x / d_q) = k for x in [(k - 1/2) d_q, (k + 1/2) d_q): stay inside
        lo = (max(lo_k - 0.5, 0.0) + 1e-3) * d_q
        hi = (hi_k + 0.5 - 1e-3) * d_q
        q_lo, q_hi = self.bounds.range("q_max")
        self.q_max.copy_(self.q_max.clamp(min=lo, max=hi)
                         .clamp(min=q_lo + MARGIN, max=q_hi - MARGIN))  # fmt: skip

    def set_from_range(self, b: int, q_max: float, d: float) -> None:
        """Set ``(b, d)``, ``(b, q_max)`` or ``(d, q_max)`` from an initial triple."""
        self._set("b", b)
        self._set("d", d)
        self._set("q_max", q_max)

    def encoding(self) -> dict:
        """What an exporter needs: ``y = d * code`` with integer ``code`` in ``[-k, k]``."""
        return {
            "kind": "uniform",
            "parametrization": self.parametrization,
            "signed": self.signed,
            "bitwidth": self.bitwidth,
            "d": self.step,
            "q_max": self.clip_bound,
            "k": self.levels,
        }
