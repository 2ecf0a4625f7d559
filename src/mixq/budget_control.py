"""Budgets without a lambda to tune: one Lagrange multiplier per constraint, by dual ascent.

The paper's penalty ``lambda * relu(S - S_0)^2`` (Eq. 10, :meth:`mixq.Budget.penalty`) needs a
``lambda`` per schedule and model size, and with the reference's sign-like quantizer updates the
sizes keep crossing the budget. :class:`DualController` replaces the fixed ``lambda`` by a
multiplier ``lambda_k >= 0`` per constrained size ``k`` (weight, activation max / sum / peak),
the Lagrangian of ``min J  s.t.  g_k = S_k / S_0,k - (1 - margin) <= 0``::

    loss   = J + sum_k lambda_k * S_k / S_0,k                      (primal: SGD on the model)
    lambda_k <- max(0, lambda_k + dual_lr * (S_k / S_0,k - (1 - margin)))   (dual ascent)

one dual step after every optimizer step (simultaneous gradient descent-ascent, Arrow,
Hurwicz & Uzawa 1958; the "basic differential multiplier method" of Platt & Barr 1988,
"Constrained differential optimization", NeurIPS). A size over its target raises its
multiplier until the penalty's pull wins over the task loss; under it the multiplier decays to
0, and the size may grow back up to ``(1 - margin) * S_0``. The constraint is relative, so one
``dual_lr`` fits sizes of any magnitude (bits, KiB, MB), and ``margin`` keeps the sizes a little
under the budget so that a bitwidth flipping up at the end does not cross it.

Knobs (``BudgetConfig``): ``dual_lr`` (default 0.01 per step) and ``margin`` (0.02).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mixq.cost import Budget


class DualController:
    """Projected dual ascent on one multiplier per set constraint of ``budget`` (module doc).

    Args:
        budget: the targets (at least one set).
        dual_lr: the dual step size ``eta`` (per optimizer step, on the relative violation).
        margin: the sizes are driven to ``(1 - margin) * S_0``.

    Use: ``penalty(model)`` inside the loss (it also remembers the sizes' ratios), then
    ``update()`` after the optimizer step; ``state_dict``/``load_state_dict`` to resume.
    """

    def __init__(self, budget: Budget, dual_lr: float = 0.01, margin: float = 0.02) -> None:
        if not budget.active:
            raise ValueError("DualController needs a budget with at least one target")
        if not dual_lr > 0:
            raise ValueError(f"dual_lr={dual_lr} must be > 0 (typical: 0.01)")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin={margin} must be in [0, 1) (typical: 0.02)")
        self.budget, self.dual_lr, self.margin = budget, float(dual_lr), float(margin)
        self.names = [k for k, v in budget._targets().items() if v is not None]
        self.lam = torch.zeros(len(self.names))
        self._ratio: Tensor | None = None

    def ratios(self, model: nn.Module) -> Tensor:
        """``S_k / S_0,k`` for every constraint, differentiable (the bitwidth surrogates)."""
        terms = self.budget.terms(model)
        return torch.stack([terms[k][0] / terms[k][1] for k in self.names])

    def penalty(self, model: nn.Module) -> Tensor:
        """``sum_k lambda_k * S_k / S_0,k`` (the multipliers are constants here)."""
        ratio = self.ratios(model)
        if self.lam.device != ratio.device:
            self.lam = self.lam.to(ratio.device)
        self._ratio = ratio.detach()
        return (self.lam * ratio).sum()

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """One dual step ``lambda <- max(0, lambda + dual_lr * (ratio - (1 - margin)))`` with
        the ratios of the last :meth:`penalty` (or of ``model`` now, if given). No host sync."""
        ratio = self.ratios(model).detach() if model is not None else self._ratio
        if ratio is None:
            return
        lam = self.lam.to(ratio.device)
        self.lam = torch.clamp(lam + self.dual_lr * (ratio - (1.0 - self.margin)), min=0.0)
        self._ratio = None

    def multipliers(self) -> dict[str, float]:
        """``{constraint: lambda_k}`` (for the log)."""
        return {k: float(v) for k, v in zip(self.names, self.lam.detach().cpu(), strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """The multipliers (exact float32 values) and the constraint names."""
        return {"names": list(self.names), "lam": self.lam.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the constraints must be the same."""
        if list(state["names"]) != self.names:
            raise ValueError(
                f"controller state for constraints {state['names']} cannot be loaded into one "
                f"for {self.names}"
            )
        self.lam = state["lam"].to(self.lam.device, torch.float32).clone()
        self._ratio = None


__all__ = ["DualController"]
