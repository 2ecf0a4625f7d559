"""Training: ``fit(cfg, run_dir)`` runs one experiment and writes its run directory.

One flat loop (spec 3.6 order, decision 6): forward; cross-entropy + memory penalty; backward;
weight decay added to the quantizer gradients; quantizer gradient clipping (when a budget is
set); optimizer step; projection ``constrain_()``. Every epoch: evaluation, metrics appended to
``metrics.jsonl``, ``last.pt`` written atomically, ``best.pt`` when the accuracy improves among
the epochs that meet every budget. ``--resume`` restarts from ``last.pt`` exactly: the data
order and augmentation depend only on (seed, epoch) and the RNG, optimizer and scheduler
states are restored.

Under ``torchrun`` (see :mod:`mixq.train.ddp`) the model is wrapped in
``DistributedDataParallel`` after rank 0's parameters and buffers were broadcast; every rank
trains on its disjoint part of each global batch, evaluates its part of the test set (sums
all-reduced), and only rank 0 writes the run directory. Checkpoints hold the unwrapped model's
state dict, so they are the same as a single-process run's.

With ``optim.ema_decay`` > 0 an exponential moving average of the model (parameters and
buffers) is updated after every step (:mod:`mixq.train.ema`); the average is the model that is
evaluated, selected and saved as ``model`` (``best.pt``, ``last.pt``); ``last.pt`` also holds
the trained weights (``train_model``) and the average's step count, so a resumed run
continues both exactly.

The run folder cannot be corrupted (docs/training.md, "Run folder guarantees"): one process
holds it (:mod:`mixq.train.runlock`); each epoch writes ``best.pt`` (when improved), then
``last.pt`` (which carries every metrics row so far), then ``metrics.jsonl`` (rewritten
atomically from those rows); a kill between any two writes leaves a folder that ``--resume``
completes exactly. No non-finite parameter is ever checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mixq.config import ConfigError
from mixq.convert import quantizers
from mixq.cost import BITS_PER_KIB, Budget, activation_bits, weight_bits
from mixq.data import Loader
from mixq.progress import progress_bar
from mixq.qat import QATStep
from mixq.report import report
from mixq.train import ddp as D
from mixq.train import faults
from mixq.train.budget_run import BudgetRun, plot_sizes
from mixq.train.build import build_model
from mixq.train.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)
from mixq.train.config import TrainConfig
from mixq.train.ddp import select_device
from mixq.train.ema import model_average
from mixq.train.runlock import RunLock
from mixq.train.setup import (
    build_budget,
    build_loaders,
    build_optimizer,
    build_scheduler,
    load_data,
    log_epoch,
    rng_state,
    seed_everything,
    set_rng_state,
)

__all__ = [
    "NonFiniteError",
    "Trainer",
    "build_budget",
    "evaluate",
    "fit",
    "load_data",
    "memory_stats",
    "select_device",
    "write_report",
]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Loader, ctx: D.DistContext | None = None
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on ``loader``.

    Under DDP (``ctx``) each rank passes its part of the test set; the sums of correct
    predictions, losses and samples are all-reduced, so every rank returns the whole test
    set's numbers.
    """
    model.eval()
    correct = loss = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    n = 0
    for x, y in loader:
        out = model(x)
        loss = loss + F.cross_entropy(out, y, reduction="sum").double()
        correct = correct + (out.argmax(1) == y).sum()
        n += y.numel()
    correct, loss, n = D.all_reduce_sum([float(correct), float(loss), n], ctx or D.DistContext())
    return {"acc": correct / max(n, 1), "loss": loss / max(n, 1)}


#: The recalibration loader's epoch: its own fixed order, apart from the training epochs, and
#: the same for every call, so the statistics do not depend on how often this process
#: recalibrated before (a resumed run gets exactly the uninterrupted run's batches).
RECALIBRATION_EPOCH = 10**6


class NonFiniteError(RuntimeError):
    """The loss or a parameter became inf/NaN; nothing of that state was checkpointed."""


def memory_stats(model: nn.Module) -> dict[str, float]:
    """Weight and activation memory (KiB) and mean bitwidths, for the metrics log."""
    with torch.no_grad():
        qs = [q for _, q in quantizers(model)]
        w_bits = [q.bitwidth for q in qs if q.signed]
        a_bits = [q.bitwidth for q in qs if not q.signed]
        return {
            "weight_kib": float(weight_bits(model)) / BITS_PER_KIB,
            "act_sum_kib": float(activation_bits(model, "sum")) / BITS_PER_KIB,
            "act_max_kib": float(activation_bits(model, "max")) / BITS_PER_KIB,
            "mean_w_bits": float(np.mean(w_bits)) if w_bits else 32.0,
            "mean_a_bits": float(np.mean(a_bits)) if a_bits else 32.0,
        }


class Trainer:
    """Holds the objects of one run; ``fit`` is ``run()``.

    ``ctx``: this process's place in a ``torchrun`` job (default: a single process on
    ``cfg.device``). ``self.model`` is always the unwrapped model (memory model, checkpoints,
    evaluation); ``self.net`` is what the training forward calls (the DDP wrapper under DDP).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        data: Any,
        progress: bool = True,
        is_main: bool = True,
        ctx: D.DistContext | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), data
        self.ctx = ctx or D.DistContext(device=select_device(cfg.device))
        self.progress, self.is_main = progress, is_main and self.ctx.is_main
        self.device = self.ctx.device
        seed_everything(cfg.seed)
        self.model = build_model(cfg, input_shape=data.input_shape, num_classes=data.num_classes)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net = D.wrap_model(self.model, self.ctx, sync_bn=cfg.sync_bn)
        self.budget = build_budget(cfg, self.model)
        clip = cfg.optim.clip_quant_grads
        self.clip_quant_grads = self.budget.active if clip is None else clip
        self.quantizers = [q for _, q in quantizers(self.model)]
        self.average = model_average(self.model, cfg.optim.ema_decay)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.train_loader, self.test_loader = build_loaders(cfg, data, self.ctx)
        steps = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.opt = build_optimizer(cfg, self.model, D.scaled_lr(cfg, self.ctx.world_size))
        self.qat = QATStep(
            self.model, self.opt, self.budget, cfg.optim.weight_decay, self.clip_quant_grads,
            cfg.compile,
        )
        self.sched = build_scheduler(cfg, self.opt, steps)
        # budget.mode dual (the multipliers), budget.freeze_at (repair + frozen bits)
        self.budget_run = BudgetRun(cfg, self.model, self.budget, self.qat)
        self.epoch = 0
        self.best: dict[str, Any] = {"acc": -1.0, "epoch": None}
        self._recal_loader: Any = None
        self.last_metrics: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []  # every epoch's metrics row, carried by last.pt
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

    @property
    def eval_model(self) -> nn.Module:
        """The model that is evaluated, selected and saved: the moving average when
        ``optim.ema_decay`` is set, else the trained model itself."""
        return self.average.model

    # -- one training step (the hot path) -------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss + penalty, backward, decay + clip quantizer grads, update, project.

        Under DDP the backward all-reduces (averages) every gradient, the penalty's included:
        the penalty depends only on the quantizer parameters, which are equal on every rank.
        """
        out = self.net(x)
        loss = F.cross_entropy(out, y, label_smoothing=self.cfg.optim.label_smoothing)
        loss, penalty = self.qat(loss)  # penalty, backward, decay + clip, update, projection
        self.budget_run.after_step()  # dual ascent on the budget multipliers
        self.sched.step()
        self.average.update()
        return loss, penalty

    def train_one_epoch(self) -> dict[str, float]:
        """One epoch; returns mean loss, penalty (over all ranks), train images/s."""
        self.net.train()
        self.train_loader.set_epoch(self.epoch)
        if self.ctx.enabled:  # dropout: a per-(epoch, rank) stream, so resuming is exact
            torch.manual_seed(D.epoch_seed(self.cfg.seed, self.epoch, self.ctx.rank))
        bar = progress_bar(
            self.steps_per_epoch,
            f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}",
            self.progress and self.is_main,
        )
        tot_loss = tot_pen = torch.zeros((), device=self.device)
        self._first_bad.fill_(-1)
        n, t0 = 0, time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch:
                break
            loss, pen = self.step(x, y)
            # The first step with a non-finite loss, without a device sync per step; checked
            # before anything is written (_check_finite).
            bad = ~torch.isfinite(loss.detach()) & (self._first_bad < 0)
            self._first_bad = torch.where(bad, i + 1, self._first_bad)
            tot_loss, tot_pen = tot_loss + loss * y.numel(), tot_pen + pen * y.numel()
            n += y.numel()
            bar.update(1)
            faults.boundary("step")
            every = self.cfg.select_every
            if every and (i + 1) % every == 0 and self.budget.active:
                self.select_step(step=i + 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        bar.close()
        tot_loss, tot_pen, n = D.all_reduce_sum([float(tot_loss), float(tot_pen), n], self.ctx)
        (dt,) = D.all_reduce_sum([dt], self.ctx, op="max")
        return {
            "train_loss": tot_loss / max(n, 1),
            "penalty": tot_pen / max(n, 1),
            "images_per_s": n / dt if dt > 0 else 0.0,
            "epoch_time_s": dt,
        }

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Test metrics of the whole test set (rank 0's batch-norm statistics on every rank)
        for ``model`` (default: ``eval_model``)."""
        model = self.eval_model if model is None else model
        self.recalibrate_bn(model)
        D.broadcast_buffers(model, self.ctx)
        return evaluate(model, self.test_loader, self.ctx)

    @torch.no_grad()
    def recalibrate_bn(self, model: nn.Module | None = None, n: int | None = None) -> None:
        """Re-estimate the batch-norm running statistics of ``model`` (default: ``eval_model``)
        from ``n`` (default ``cfg.bn_recalibrate``) training batches (cumulative average,
        fixed data order), for quantized models only."""
        model = self.eval_model if model is None else model
        n = self.cfg.bn_recalibrate if n is None else n
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not n or not self.quantizers or not bns:
            return
        if self._recal_loader is None:
            self._recal_loader = build_loaders(self.cfg, self.data, self.ctx)[0]
        # Every call: iterating a loader advances its epoch, so without this the batches
        # would depend on the number of calls made in this process (and resume would differ).
        self._recal_loader.set_epoch(RECALIBRATION_EPOCH)
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        was_training = model.training
        model.train()
        for i, (x, _) in enumerate(self._recal_loader):
            if i >= n:
                break
            model(x)
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)

    def select_step(self, step: int) -> None:
        """Mid-epoch model selection: evaluate when every budget is met; keep the best."""
        if not self.budget_run.eligible or not all(self.budget.satisfied(self.eval_model).values()):
            return
        acc = self.evaluate()["acc"]
        self.net.train()
        metrics = {"epoch": self.epoch + 1, "step": step, "test_acc": acc,
                   **memory_stats(self.eval_model)}  # fmt: skip
        self._consider_best(acc, metrics, step)

    def _consider_best(self, acc: float, metrics: dict[str, Any], step: int | None) -> None:
        """Keep ``best.pt``: the model that meets every budget (the callers check) with the
        highest test accuracy. ``step``: the step within epoch ``metrics["epoch"]`` of a
        mid-epoch selection (``select_every``), None at the end of an epoch."""
        self._check_finite(metrics["epoch"], step)
        if not acc > self.best["acc"]:
            return
        self.best = {
            "acc": acc,
            "epoch": metrics["epoch"],
            **({} if step is None else {"step": step}),
            **{k: metrics[k] for k in ("weight_kib", "act_sum_kib", "act_max_kib")},
        }
        if self.is_main:
            save_checkpoint(self.run_dir / "best.pt", self._payload(metrics))
            faults.boundary("best.pt")

    def _check_finite(self, epoch: int, step: int | None = None) -> None:
        """Raise :class:`NonFiniteError` (naming epoch ``epoch`` and the step) when a loss of
        this epoch or a parameter/buffer of the model is not finite; called before every
        checkpoint write, so none ever holds a non-finite tensor."""
        (bad,) = D.all_reduce_sum([float(self._first_bad)], self.ctx, op="max")
        keep = (f"last.pt and best.pt keep the last finite state (epoch {max(epoch - 1, 0)}); "
                "lower optim.lr or check the data and the config")  # fmt: skip
        if bad >= 0:
            raise NonFiniteError(f"the training loss became non-finite at epoch {epoch} step "
                                 f"{int(bad)}; the run stopped: {keep}")  # fmt: skip
        at = f"epoch {epoch}" + ("" if step is None else f" step {step}")
        for which, model in (("model", self.model), ("evaluated model", self.eval_model)):
            named = [(n, t) for n, t in model.state_dict().items() if t.is_floating_point()]
            finite = torch.stack([torch.isfinite(t).all() for _, t in named])  # one sync
            if not bool(finite.all()):
                name = named[int((~finite).nonzero()[0])][0]
                raise NonFiniteError(f"{which} tensor {name!r} became non-finite by {at}; "
                                     f"the run stopped: {keep}")  # fmt: skip

    # -- checkpoints ----------------------------------------------------------------------------
    def _payload(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            # the unwrapped model (no "module." prefix); the moving average when there is one
            "model": self.eval_model.state_dict(),
            **self.average.checkpoint(),  # what resuming the average needs besides ``model``
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.epoch,
            "best": dict(self.best),
            "budget_control": self.budget_run.state_dict(),
            # Under DDP the global RNG is reseeded per (epoch, rank) and nothing touches the
            # other GPUs (get_rng_state_all would create a context on each of them).
            "rng": rng_state() if not self.ctx.enabled else {"torch": torch.get_rng_state()},
            "metrics": metrics,
            # every epoch's row: --resume rewrites metrics.jsonl from them (nothing is lost
            # when a kill comes between last.pt and the metrics file)
            "metrics_rows": list(self.rows),
            "input_shape": list(self.data.input_shape),
            "num_classes": self.data.num_classes,
            "world_size": self.ctx.world_size,
        }

    def resume(self) -> None:
        """Restore model, optimizer, scheduler, RNG, epoch and best from ``last.pt``.

        Every rank reads the same file (on several nodes the run directory must be shared).
        """
        path = self.run_dir / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {str(path)!r} does not exist")
        ckpt = load_checkpoint(path, self.device)
        try:  # fill in fields added since the checkpoint was written
            saved = TrainConfig.from_data(ckpt["config"]).to_dict()
        except ConfigError:
            saved = ckpt["config"]
        if saved != self.cfg.to_dict():
            raise CheckpointError(
                f"cannot resume {str(self.run_dir)!r}: its config differs from this one; "
                "resume with the same config (or with `mixq train --resume --run-dir DIR` "
                "alone, which uses the run's saved config.yaml), or start a new run directory"
            )
        if ckpt.get("world_size", 1) != self.ctx.world_size and self.is_main:
            print(f"note: {str(path)!r} was written by another number of processes")
        for key in ("model", "optimizer", "scheduler", "epoch", "best"):
            if key not in ckpt:
                raise CheckpointError(f"cannot resume: {str(path)!r} has no {key!r} entry "
                                      "(not a last.pt written by mixq train)")  # fmt: skip
        self.average.load(ckpt)
        self.budget_run.load_state_dict(ckpt.get("budget_control"), self._copies())
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if not self.ctx.enabled:
            set_rng_state(ckpt["rng"])
        self.epoch, self.best = ckpt["epoch"], ckpt["best"]
        self.last_metrics = dict(ckpt.get("metrics") or {})
        rows = ckpt.get("metrics_rows")
        if rows is None:  # written before last.pt carried the rows: keep the file's
            rows = _read_rows(self.run_dir / "metrics.jsonl", self.epoch)
        self.rows = [dict(r) for r in rows]
        if self.is_main:  # drop rows of an epoch that was interrupted, add a lost one
            _write_rows(self.run_dir / "metrics.jsonl", self.rows)

    def run(self) -> dict[str, Any]:
        """Train until ``cfg.optim.epochs``; returns the final summary.

        With ``cfg.eval_only`` (and nothing done yet) the model is evaluated once, as epoch 0.
        """
        metrics: dict[str, Any] = self.last_metrics  # a finished run resumed: its last epoch
        if self.cfg.eval_only:
            self.rows = []  # one evaluation, also when resumed
            metrics = self._record({"epoch": 0, "lr": 0.0}, epoch_done=0)
        while not self.cfg.eval_only and self.epoch < self.cfg.optim.epochs:
            self.freeze_bits()
            lr = self.sched.get_last_lr()[0]
            metrics = {"epoch": self.epoch + 1, "lr": lr, **self.train_one_epoch()}
            D.check_replicas(self.model, self.budget, self.ctx)
            metrics = self._record(metrics, epoch_done=self.epoch + 1)
        return {"final": metrics, "best": self.best}

    # -- budget control hooks (mixq.train.budget_run) --------------------------------------------
    def _copies(self) -> list[nn.Module]:
        """Models holding copies of the quantizers: the moving average, if any."""
        return [m for m in (self.average.model,) if m is not self.model]

    def _calibration_batch(self) -> torch.Tensor:
        """Training inputs for the repair's activation errors (its own fixed order)."""
        loader = build_loaders(self.cfg, self.data, self.ctx)[0]
        loader.set_epoch(10**6 + 1)
        return next(iter(loader))[0][:64]

    def freeze_bits(self) -> None:
        """At ``budget.freeze_at``: repair what is over budget, freeze the bits, re-estimate
        batch norm (:meth:`BudgetRun.maybe_freeze`)."""
        self.budget_run.maybe_freeze(
            self.epoch, self._copies(), self._calibration_batch,
            lambda m: self.recalibrate_bn(m, n=max(self.cfg.bn_recalibrate, 20)),
            log=print if self.is_main else (lambda _s: None),
            sync=(lambda m: D.broadcast_module_state(m, self.ctx)) if self.ctx.enabled else None,
        )  # fmt: skip

    def _record(self, metrics: dict[str, Any], epoch_done: int) -> dict[str, Any]:
        """Evaluate, select, checkpoint and log the end of an epoch.

        Write order (each write atomic): ``best.pt`` (when improved), ``last.pt`` (with every
        row so far), ``metrics.jsonl`` (rewritten from those rows). A kill before ``last.pt``
        repeats the epoch on resume (the same numbers, so the same ``best.pt``); a kill after
        it loses nothing, as resume rewrites ``metrics.jsonl`` from ``last.pt``.
        """
        self._check_finite(epoch_done)
        metrics.update({f"test_{k}": v for k, v in self.evaluate().items()})
        for name, model in self.average.others().items():  # e.g. the trained weights
            metrics[f"test_acc_{name}"] = self.evaluate(model)["acc"]
        metrics.update(memory_stats(self.eval_model))
        met = self.budget.satisfied(self.eval_model) if self.budget.active else {}
        metrics["budget_met"] = all(met.values())
        metrics.update(self.budget_run.metrics())
        self.epoch = epoch_done
        if metrics["budget_met"] and self.budget_run.eligible:
            self._consider_best(metrics["test_acc"], metrics, step=None)
        self.rows.append(metrics)
        if self.is_main:
            save_checkpoint(self.run_dir / "last.pt", self._payload(metrics))
            faults.boundary("last.pt")
            _write_rows(self.run_dir / "metrics.jsonl", self.rows)
            faults.boundary("metrics")
            log_epoch(metrics, True)  # one line per epoch, with or without the progress bar
        return metrics


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON line per epoch, written atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _read_rows(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The rows of epochs ``<= epochs`` in ``path`` (the last one of each epoch), for
    checkpoints written before ``last.pt`` carried them; a torn last line is dropped."""
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= epochs:
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def clean_temp_files(run_dir: Path) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files of atomic writes that a kill interrupted (only while
    holding the run folder's lock: no other writer can be mid-write)."""
    removed = []
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def fit(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    data: Any = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the experiment ``cfg`` into ``run_dir`` (see the module docstring).

    Writes ``config.yaml`` (resolved), ``metrics.jsonl``, ``last.pt``, ``best.pt`` (when any
    epoch met every budget), ``summary.json`` and the report (``report.txt``, ``.json``,
    ``.csv``, ``.png``) of ``best.pt`` (of ``last.pt`` when no epoch met every budget).
    Under ``torchrun`` every rank calls it and only rank 0 writes; the process group is
    created from the environment and destroyed at the end (one that already exists is used
    and left alone). The summary's ``rank`` says which process returned it.
    """
    run_dir = Path(run_dir)
    faults.reset()
    # One writer per run folder: rank 0 (the only writer) locks it before reading anything.
    main = os.environ.get("RANK", "0") == "0"
    with RunLock(run_dir) if main else contextlib.nullcontext() as lock:
        if lock is not None and lock.previous:
            print(f"note: took over the lock of {run_dir} from pid {lock.previous.get('pid')}, "
                  "which ended without releasing it (killed or crashed)")  # fmt: skip
        if not resume and (run_dir / "last.pt").exists():
            raise FileExistsError(
                f"run directory {str(run_dir)!r} already holds a run: pass --resume to "
                "continue it, or choose another --run-dir"
            )
        if main:
            clean_temp_files(run_dir)
        ctx = D.setup(cfg.device)
        try:
            summary = _fit(cfg, run_dir, ctx, resume, data, data_dir, progress)
            ctx.barrier()  # the other ranks return once rank 0 has written everything
        finally:
            D.cleanup(ctx)
    return summary


def _fit(cfg, run_dir, ctx, resume, data, data_dir, progress) -> dict[str, Any]:
    data = data if data is not None else load_data(cfg, data_dir)
    trainer = Trainer(cfg, run_dir, data, progress=progress, ctx=ctx)
    if resume and not (run_dir / "last.pt").is_file():
        # Killed before the first last.pt: nothing to restore, so the run starts over (the
        # same numbers, so the same files) -- but only in a folder that holds this run.
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"cannot resume: {str(run_dir / 'last.pt')!r} does not exist "
                                  "(and no config.yaml: not a run folder)")  # fmt: skip
        if TrainConfig.from_data(yaml.safe_load(saved.read_text())).to_dict() != cfg.to_dict():
            raise CheckpointError(f"cannot resume {str(run_dir)!r}: its config.yaml differs "
                                  "from this config")  # fmt: skip
        if trainer.is_main:
            print(f"note: {str(run_dir)!r} has no last.pt yet (stopped in epoch 1): starting "
                  "over")  # fmt: skip
        resume = False
    if trainer.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
        atomic_write_bytes(run_dir / "config.yaml", config)
        if not resume:  # rows of an earlier attempt that stopped before its first last.pt
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if resume:
        trainer.resume()
    summary = trainer.run()
    summary["budget_control"] = trainer.budget_run.summary()
    # The deliverable is the best model among the epochs that met every budget; report it.
    summary["report_of"] = "last.pt"
    if trainer.is_main:
        if (run_dir / "best.pt").is_file():
            best = load_checkpoint(run_dir / "best.pt", trainer.device)["model"]
            trainer.model.load_state_dict(best)
            summary["report_of"] = "best.pt"
        write_report(trainer.model, trainer.budget, run_dir, trainer.budget_run.describe()
                     if trainer.budget_run.freeze_epoch is not None else None)  # fmt: skip
        faults.boundary("report")
        if trainer.budget.active and not cfg.eval_only:
            plot_sizes(run_dir, trainer.budget, trainer.budget_run.freeze_epoch)
        atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        faults.boundary("summary")
    return {**summary, "rank": ctx.rank, "world_size": ctx.world_size}


def write_report(model: nn.Module, budget: Budget, run_dir: Path, note: str | None = None) -> None:
    """``report.txt``, ``report.json``, ``report.csv`` and ``report.png`` for ``model``;
    ``note`` (how the budget was met) is appended to ``report.txt``."""
    rep = report(model, budget if budget.active else None)
    text = rep.to_text() + (f"\nBudget control\n  {note}\n" if note else "")
    atomic_write_bytes(run_dir / "report.txt", text.encode())
    atomic_write_bytes(run_dir / "report.json", rep.to_json().encode())
    atomic_write_bytes(run_dir / "report.csv", rep.to_csv().encode())
    try:
        rep.plot(run_dir / "report.png")
    except ImportError as e:
        print(f"note: no report.png ({e})")
