"""The repair step: lower bitwidths where it costs least until every budget holds.

Used once, when the bits are frozen (``budget.freeze_at``): if the learned configuration is
over a budget, :func:`repair` lowers one site at a time by one allowed level (its ``bit_set``
or the integers of ``[b_min, b_max]``), greedily by the sensitivity

    cost(site) = (E_b' - E_b) / sum_{k violated} (S_k - S'_k) / S_0,k

with ``E_b = ||Q_b(x) - x||^2 / ||x||^2`` the relative quantization error of the site's tensor
``x`` (the weight, or the activation on a calibration batch) at ``b`` bits, and ``S_k - S'_k``
the memory the step saves in each violated budget ``k`` (relative to the budget, so weight and
activation budgets add up). The error is the quantization noise power relative to the signal
(1 / SQNR): under the usual model of quantization as independent additive noise, the loss
increase is about a layer's Hessian times its noise energy (the quantity HAWQ-V3 weighs with
the Hessian trace, Dong et al. 2020); without second-order information the relative form
compares layers of different scales. Memory saved per unit of that error is what a knapsack
relaxation ranks by (Dantzig's greedy rule). A step that completes the repair (every budget
then holds) is chosen by its absolute error instead, the cheapest finisher, so that the last
step does not overshoot (the usual fix of the ratio rule at the end of a knapsack).

Each lowering sets the parameters as the parametrization allows and keeps the alternative with
the smaller error: U3 ``d_qmax``: the step ``d`` kept and the range cut, or the range kept and
the step doubled; P3 ``qmin_qmax``: ``q_min`` kept and ``q_max`` cut, or ``q_max`` kept and
``q_min`` raised; U1/U2/P1/P2: ``b`` lowered (its partner parameter kept). A last pass gives back
levels (most recently lowered first) while every budget still holds, so no site ends lower than
it needs to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mixq.convert import quantizers
from mixq.cost import BITS_PER_KIB, Budget
from mixq.quant.base import Quantizer


@dataclass(frozen=True)
class Change:
    """One site of a repair: ``site`` went from ``from_bits`` to ``to_bits`` bits.

    ``error`` is the relative quantization error ``E`` after the change (before: ``error0``).
    """

    site: str
    from_bits: int
    to_bits: int
    error0: float
    error: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data for logs and ``summary.json``."""
        return asdict(self)


@torch.no_grad()
def capture_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``{quantizer name: the tensor it quantized}`` in one eval forward of batch ``x``
    (weights, biases and activations alike; a shared quantizer keeps its first input)."""
    seen: dict[str, Tensor] = {}
    hooks = []
    for name, q in quantizers(model):
        def hook(_m, args, kwargs, name=name):
            x, cap = args[0], kwargs.get("cap")  # QuantAct's ReLU6 cap is the quantizer's
            x = x if cap is None else x.clamp(max=cap)
            seen.setdefault(name, x.detach().float().clone())
        hooks.append(q.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


@torch.no_grad()
def relative_error(q: Quantizer, x: Tensor) -> float:
    """``E = ||Q(x) - x||^2 / ||x||^2`` at ``q``'s current parameters."""
    den = float((x * x).sum())
    return float(((q(x) - x) ** 2).sum()) / max(den, 1e-30)


def _snapshot(q: Quantizer) -> dict[str, Tensor]:
    return {n: getattr(q, n).detach().clone() for n in q.param_names}


def _restore(q: Quantizer, snap: dict[str, Tensor]) -> None:
    for n, v in snap.items():
        getattr(q, n).data.copy_(v)


def _alternatives(q: Quantizer, bits: int) -> list[dict[str, Tensor]]:
    """Parameter settings of ``q`` at exactly ``bits`` bits (see the module docstring)."""
    start = _snapshot(q)
    out = []
    names = q.param_names
    if "b" in names:
        q.b.data.fill_(float(bits))
        q.constrain_()
        if q.bitwidth == bits:
            out.append(_snapshot(q))
        _restore(q, start)
        return out
    # the range cut at the same step / smallest magnitude: the frozen-bits projection
    q.frozen_bits = bits
    q.constrain_()
    q.frozen_bits = None
    if q.bitwidth == bits:
        out.append(_snapshot(q))
    _restore(q, start)
    # the range kept: the step (U3) / smallest magnitude (P3) doubled until the bits fit
    small = names[0]  # "d" or "q_min"
    hi = q.bounds.range(small)[1]
    p = getattr(q, small)
    for _ in range(64):
        if q.bitwidth <= bits or float(p) * 2 >= hi:
            break
        p.data.mul_(2.0)
        q.constrain_()
    if q.bitwidth == bits:
        out.append(_snapshot(q))
    _restore(q, start)
    return out


@torch.no_grad()
def set_bits_(q: Quantizer, bits: int, x: Tensor) -> float | None:
    """Set ``q`` to ``bits`` bits with the smallest error on ``x``; returns that error, or
    None (``q`` unchanged) when its bounds give no setting with exactly ``bits`` bits."""
    best, best_err = None, None
    start = _snapshot(q)
    for alt in _alternatives(q, bits):
        _restore(q, alt)
        err = relative_error(q, x)
        if best_err is None or err < best_err:
            best, best_err = alt, err
    _restore(q, best if best is not None else start)
    return best_err


def _sizes(budget: Budget, model: nn.Module) -> dict[str, tuple[float, float]]:
    with torch.no_grad():
        return {k: (float(s), float(t)) for k, (s, t) in budget.terms(model).items()}


def _violated(sizes: dict[str, tuple[float, float]]) -> list[str]:
    return [k for k, (s, t) in sizes.items() if s > t + 1e-6]


@torch.no_grad()
def repair(model: nn.Module, budget: Budget, inputs: dict[str, Tensor]) -> list[Change]:
    """Lower bitwidths greedily (module docstring) until every constraint of ``budget`` holds.

    Args:
        model: the quantized model, changed in place (its quantizer parameters).
        budget: the targets.
        inputs: :func:`capture_inputs` of a calibration batch: the tensor of every learnable
            quantizer that may be lowered (sites without one are not lowered).

    Returns:
        The changes, one per site lowered (its first and final bitwidth), in site order.

    Raises:
        ValueError: the budgets cannot be met by lowering the learnable sites (a float or a
            fixed site holds too much, or parameter bounds block a level).
    """
    qs = {n: q for n, q in quantizers(model) if q.learnable and n in inputs}
    first = {n: (q.bitwidth, relative_error(q, inputs[n])) for n, q in qs.items()}
    history: list[tuple[str, dict[str, Tensor]]] = []  # (site, parameters before the step)
    sizes = _sizes(budget, model)
    while violated := _violated(sizes):
        best: tuple[float, str, dict[str, Tensor]] | None = None
        last: tuple[float, str, dict[str, Tensor]] | None = None  # least error among finishers
        for name, q in qs.items():
            lower = [b for b in q.levels_allowed() if b < q.bitwidth]
            if not lower:
                continue
            start, err0 = _snapshot(q), relative_error(q, inputs[name])
            err = set_bits_(q, max(lower), inputs[name])
            if err is None:
                continue
            after = _sizes(budget, model)
            saved = sum((sizes[k][0] - after[k][0]) / sizes[k][1] for k in violated)
            trial = _snapshot(q)
            _restore(q, start)
            if saved <= 0:
                continue
            increase = max(err - err0, 0.0)
            if best is None or increase / saved < best[0]:
                best = (increase / saved, name, trial)
            if not _violated(after) and (last is None or increase < last[0]):
                last = (increase, name, trial)
        best = last or best  # a step that completes the repair: the one with the least error
        if best is None:
            over = ", ".join(f"{k} {sizes[k][0] / BITS_PER_KIB:.2f} KiB > "
                             f"{sizes[k][1] / BITS_PER_KIB:.2f} KiB" for k in violated)  # fmt: skip
            raise ValueError(
                f"cannot repair the budget ({over}): no learnable site can be lowered further; "
                "the fixed or float sites hold too much, or the bounds block lower bitwidths"
            )
        _, name, trial = best
        history.append((name, _snapshot(qs[name])))
        _restore(qs[name], trial)
        sizes = _sizes(budget, model)
    # give back: undo the latest steps first while every budget still holds (a site whose
    # latest step must stay keeps its earlier ones too)
    kept: set[str] = set()
    for name, before in reversed(history):
        if name in kept:
            continue
        now = _snapshot(qs[name])
        _restore(qs[name], before)
        if _violated(_sizes(budget, model)):
            _restore(qs[name], now)
            kept.add(name)
    changes = []
    for name, q in qs.items():
        b0, e0 = first[name]
        if q.bitwidth != b0:
            changes.append(Change(name, b0, q.bitwidth, e0, relative_error(q, inputs[name])))
    return changes


__all__ = ["Change", "capture_inputs", "relative_error", "repair", "set_bits_"]
