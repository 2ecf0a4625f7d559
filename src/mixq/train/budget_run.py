"""Budget control inside a training run: the dual controller, the freeze and its repair.

:class:`BudgetRun` is what the trainer calls at its hook points (all cheap when unused):

* ``after_step()`` after every optimizer step: one dual-ascent step (``budget.mode: dual``,
  :mod:`mixq.budget_control`) while the bits are learned;
* ``maybe_freeze(epochs_done, ...)`` before each epoch: at ``budget.freeze_at`` the learned
  bits are checked against every budget; if one is exceeded, :func:`mixq.repair.repair`
  lowers bitwidths where it costs least; then every quantizer's bits are frozen
  (:meth:`~mixq.quant.base.Quantizer.freeze_bits_`), the penalty is switched off and batch
  norm is re-estimated;
* ``eligible``: whether a check may give ``best.pt`` (with ``freeze_at``: only after the
  freeze, so the delivered model has the frozen, budget-meeting bits);
* ``state_dict()``/``load_state_dict()`` in ``last.pt`` (the multipliers, the frozen bits and
  the repair record), so a resumed run continues exactly;
* ``summary()`` for ``summary.json`` and the report: how the budget was met (learned or
  repaired, which sites by how many bits).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.budget_control import DualController
from mixq.convert import quantizers
from mixq.cost import Budget
from mixq.qat import QATStep
from mixq.repair import capture_inputs, repair
from mixq.train.config import TrainConfig

#: Budget field -> the ``metrics.jsonl`` field (KiB) logged at every epoch end for it (the peak
#: is not logged per epoch).
SIZE_METRICS = {"weight": "weight_kib", "activation_max": "act_max_kib",
                "activation_sum": "act_sum_kib"}  # fmt: skip


class BudgetRun:
    """The budget-control state of one run (module docstring).

    Args:
        cfg: the run's config (``cfg.budget``: mode, dual_lr, margin, freeze_at).
        model: the trained (unwrapped) model.
        budget: its :class:`~mixq.Budget`.
        qat: the run's :class:`~mixq.QATStep` (its penalty is replaced / switched off).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, budget: Budget, qat: QATStep) -> None:
        bc = cfg.budget
        self.model, self.budget, self.qat = model, budget, qat
        self.mode = bc.mode
        self.freeze_epoch = bc.freeze_epoch(cfg.optim.epochs) if budget.active else None
        self.controller: DualController | None = None
        if bc.mode == "dual" and budget.active:
            self.controller = DualController(budget, bc.dual_lr, bc.margin)
            device = next(model.parameters()).device
            self.controller.lam = self.controller.lam.to(device)
            qat.penalty_fn = lambda: self.controller.penalty(model)
        self.frozen: dict[str, int] | None = None  # quantizer name -> bits, once frozen
        self.record: dict[str, Any] | None = None  # what the freeze did

    # -- hooks ------------------------------------------------------------------------------
    def after_step(self) -> None:
        """One dual step while the bits are learned (no-op in fixed mode)."""
        if self.controller is not None and self.frozen is None:
            self.controller.update()

    @property
    def eligible(self) -> bool:
        """Whether a check may give ``best.pt``: always without ``freeze_at``, else only
        once the bits are frozen."""
        return self.freeze_epoch is None or self.frozen is not None

    def maybe_freeze(
        self,
        epochs_done: int,
        others: list[nn.Module],
        calibration_batch: Callable[[], torch.Tensor],
        recalibrate: Callable[[nn.Module], None],
        log: Callable[[str], None] = print,
        sync: Callable[[nn.Module], None] | None = None,
    ) -> bool:
        """Freeze (and repair) when ``epochs_done`` reaches the freeze point; True if it did.

        ``others``: models holding copies of the quantizers (an EMA) that get the repaired
        parameters and the same frozen bits; ``calibration_batch()``: inputs for the
        activation errors of the repair; ``recalibrate(model)``: batch-norm re-estimation;
        ``sync(model)``: under DDP, rank 0's parameters to every rank after the repair (the
        ranks' calibration batches differ).
        """
        if self.freeze_epoch is None or self.frozen is not None or epochs_done != self.freeze_epoch:
            return False
        met = self.budget.satisfied(self.model)
        changes = []
        if not all(met.values()):
            inputs = capture_inputs(self.model, calibration_batch())
            changes = [c.to_dict() for c in repair(self.model, self.budget, inputs)]
        if sync is not None:
            sync(self.model)
        named = dict(quantizers(self.model))
        for q in named.values():
            allowed = [b for b in q.levels_allowed() if b <= q.bitwidth]
            # a U3/P3 range above b_max (not clipped, spec 5.2) is frozen at b_max: never more
            q.freeze_bits_(q.bitwidth if q.bitwidth in allowed else max(allowed, default=None))
        for other in others:
            for name, q in quantizers(other):
                for p in q.param_names:
                    getattr(q, p).data.copy_(getattr(named[name], p).data)
                q.freeze_bits_(named[name].bitwidth)
        self.frozen = {n: q.bitwidth for n, q in named.items()}
        self.qat.penalty_enabled = False
        for m in [self.model, *others]:
            recalibrate(m)
        self.record = {
            "epoch": epochs_done,
            "how": "repaired" if changes else "learned",
            "over_before": sorted(k for k, ok in met.items() if not ok),
            "changes": changes,
            "multipliers": self.controller.multipliers() if self.controller else None,
        }
        log(self.describe())
        return True

    def describe(self) -> str:
        """One line: how the frozen bits meet the budget."""
        r = self.record
        if r is None:
            return "bits not frozen"
        head = f"bits frozen after epoch {r['epoch']}: "
        if r["how"] == "learned":
            return head + "every budget met by the learned bitwidths"
        sites = ", ".join(f"{c['site']} {c['from_bits']}->{c['to_bits']}" for c in r["changes"])
        return (head + f"over {', '.join(r['over_before'])}: repaired by lowering {sites} "
                "bits; batch norm re-estimated")  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        """Per-epoch log fields: the multipliers (dual mode) and whether the bits are frozen."""
        out: dict[str, Any] = {"bits_frozen": self.frozen is not None}
        if self.controller is not None:
            out.update({f"lambda_{k}": v for k, v in self.controller.multipliers().items()})
        return out

    def summary(self) -> dict[str, Any]:
        """For ``summary.json``: mode, freeze point, and the freeze record."""
        return {"mode": self.mode, "freeze_epoch": self.freeze_epoch, "freeze": self.record}

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Multipliers, frozen bits and the freeze record."""
        return {
            "controller": self.controller.state_dict() if self.controller else None,
            "frozen": dict(self.frozen) if self.frozen is not None else None,
            "record": self.record,
        }

    def load_state_dict(self, state: dict[str, Any] | None, others: list[nn.Module]) -> None:
        """Restore :meth:`state_dict` (None: a checkpoint from before budget control: nothing
        to restore); re-applies the frozen bits to ``model`` and ``others``."""
        if not state:
            return
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
            self.controller.lam = self.controller.lam.to(next(self.model.parameters()).device)
        self.record = state.get("record")
        self.frozen = state.get("frozen")
        if self.frozen is not None:
            for m in [self.model, *others]:
                for name, q in quantizers(m):  # the loaded parameters already hold these bits
                    q.freeze_bits_(self.frozen[name])
            self.qat.penalty_enabled = False


def plot_sizes(run_dir: Path, budget: Budget, freeze_epoch: int | None) -> Path | None:
    """``budget_sizes.png``: each constrained size per epoch (from ``metrics.jsonl``) against
    its budget, with the freeze; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"note: no budget_sizes.png ({e}; pip install matplotlib)")
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]  # fmt: skip
    rows = [r for r in rows if "weight_kib" in r and r.get("epoch", 0) > 0]
    series = [(key.replace("_", " "), field, getattr(budget, key))
              for key, field in SIZE_METRICS.items()]  # fmt: skip
    series = [s for s in series if s[2] is not None]
    if not rows or not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for ax, (label, key, target) in zip(axes[0], series, strict=True):
        ax.plot(epochs, [r[key] for r in rows], marker="o", ms=3, label=f"{label} (KiB)")
        ax.axhline(target / 1024, color="k", ls="--", lw=1, label="budget")
        if freeze_epoch is not None:
            ax.axvline(freeze_epoch + 0.5, color="tab:red", lw=1, label="bits frozen")
        ax.set_xlabel("epoch")
        ax.set_ylabel("KiB")
        ax.set_title(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = run_dir / "budget_sizes.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["BudgetRun", "plot_sizes"]
