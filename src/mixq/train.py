"""Training: ``fit(cfg, run_dir)`` runs one experiment and writes its run directory.

One flat loop (spec 3.6 order, decision 6): forward; cross-entropy + memory penalty; backward;
weight decay added to the quantizer gradients; quantizer gradient clipping (when a budget is
set); optimizer step; projection ``constrain_()``. Every epoch: evaluation, metrics appended to
``metrics.jsonl``, ``last.pt`` written atomically, ``best.pt`` when the accuracy improves among
the epochs that meet every budget. ``--resume`` restarts from ``last.pt`` exactly: the data
order and augmentation depend only on (seed, epoch) and the RNG, optimizer and scheduler
states are restored.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixq.build import build_model
from mixq.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from mixq.convert import quantizer_parameters, quantizers
from mixq.cost import BITS_PER_KIB, Budget, activation_bits, scaled_lambda, weight_bits
from mixq.data import DatasetArrays, TensorLoader, get_dataset, resolve_data_dir
from mixq.run_config import TrainConfig


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU runs are then repeatable)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: TrainConfig, data_dir: str | None = None) -> DatasetArrays:
    """The dataset of ``cfg.data`` (the CLI's ``--data-dir`` wins over the config)."""
    name = cfg.data.name
    if name == "cifar10":
        root = resolve_data_dir(data_dir, cfg.data.dir)
        return get_dataset(name, root, download=cfg.data.download)
    if name == "synthetic":
        return get_dataset(
            name,
            None,
            n_train=cfg.data.synthetic_train,
            n_test=cfg.data.synthetic_test,
            seed=cfg.seed,
        )
    return get_dataset(name, None)


def build_budget(cfg: TrainConfig, model: nn.Module) -> Budget:
    """The :class:`Budget` of ``cfg.budget``; lambda scaled by decision 7 when asked."""
    b = cfg.budget
    lam = scaled_lambda(model, b.lam) if b.scale_lambda else b.lam
    budget = Budget.parse(b.weight, b.activation_sum, b.activation_max, lam)
    if budget.active:
        budget.check_feasible(model)
    return budget


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """One optimizer for all parameters (decision 6). Model weights get weight decay from the
    optimizer; quantizer parameters get the same decay added explicitly *before* their gradient
    clipping, as the reference code orders it (spec 3.6)."""
    o = cfg.optim
    qp = {id(p) for p in quantizer_parameters(model)}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in qp]
    groups = [{"params": weights, "weight_decay": o.weight_decay}]
    if qp:
        groups.append({"params": quantizer_parameters(model), "weight_decay": 0.0})
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step LR schedule: step (milestones in epochs), one-cycle, cosine or constant."""
    o = cfg.optim
    total = o.epochs * steps_per_epoch
    if o.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=o.lr,
            total_steps=total,
            pct_start=o.pct_start,
            anneal_strategy="linear",
            cycle_momentum=False,
        )
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if o.schedule == "step":
        miles = [m * steps_per_epoch for m in o.milestones]
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: o.gamma ** sum(s >= m for m in miles)
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on ``loader``."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in loader:
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += y.numel()
    return {"acc": correct / max(n, 1), "loss": loss / max(n, 1)}


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


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Holds the objects of one run; ``fit`` is ``run()``."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        data: DatasetArrays,
        progress: bool = True,
        is_main: bool = True,
    ) -> None:
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), data
        self.progress, self.is_main = progress, is_main
        self.device = select_device(cfg.device)
        seed_everything(cfg.seed)
        self.model = build_model(cfg, input_shape=data.input_shape, num_classes=data.num_classes)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.budget = build_budget(cfg, self.model)
        clip = cfg.optim.clip_quant_grads
        self.clip_quant_grads = self.budget.active if clip is None else clip
        self.quantizers = [q for _, q in quantizers(self.model)]
        self.qparams = [p for q in self.quantizers for p in q.parameters() if p.requires_grad]
        d = cfg.data
        common = {"device": self.device, "channels_last": cfg.channels_last, "seed": cfg.seed}
        augment = d.augment and data.input_shape[-1] >= 16
        self.train_loader = TensorLoader(
            data.x_train,
            data.y_train,
            d.batch_size,
            train=True,
            augment=augment,
            drop_last=True,
            **common,
        )
        self.test_loader = TensorLoader(
            data.x_test, data.y_test, d.eval_batch_size, train=False, **common
        )
        steps = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.opt = build_optimizer(cfg, self.model)
        self.sched = build_scheduler(cfg, self.opt, steps)
        self.epoch = 0
        self.best: dict[str, Any] = {"acc": -1.0, "epoch": None}

    # -- one training step (the hot path) -------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss + penalty, backward, decay + clip quantizer grads, update, project."""
        out = self.model(x)
        loss = F.cross_entropy(out, y, label_smoothing=self.cfg.optim.label_smoothing)
        penalty = self.budget.penalty(self.model) if self.budget.active else loss.new_zeros(())
        self.opt.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        wd = self.cfg.optim.weight_decay
        if wd and self.qparams:
            grads = [p.grad for p in self.qparams if p.grad is not None]
            params = [p.detach() for p in self.qparams if p.grad is not None]
            torch._foreach_add_(grads, params, alpha=wd)
        if self.clip_quant_grads:
            for q in self.quantizers:
                q.clip_grad_()
        self.opt.step()
        self.sched.step()
        for q in self.quantizers:
            q.constrain_()
        return loss.detach(), penalty.detach()

    def train_one_epoch(self) -> dict[str, float]:
        """One epoch; returns mean loss, penalty, train accuracy and images/s."""
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        bar = _progress(
            self.steps_per_epoch,
            f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}",
            self.progress and self.is_main,
        )
        tot_loss = tot_pen = torch.zeros((), device=self.device)
        n, t0 = 0, time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch:
                break
            loss, pen = self.step(x, y)
            tot_loss, tot_pen = tot_loss + loss * y.numel(), tot_pen + pen * y.numel()
            n += y.numel()
            bar.update(1)
            every = self.cfg.select_every
            if every and (i + 1) % every == 0 and self.budget.active:
                self.select_step(step=i + 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        bar.close()
        return {
            "train_loss": float(tot_loss) / max(n, 1),
            "penalty": float(tot_pen) / max(n, 1),
            "images_per_s": n / dt if dt > 0 else 0.0,
            "epoch_time_s": dt,
        }

    def select_step(self, step: int) -> None:
        """Mid-epoch model selection: evaluate when every budget is met; keep the best."""
        if not all(self.budget.satisfied(self.model).values()):
            return
        acc = evaluate(self.model, self.test_loader)["acc"]
        self.model.train()
        if acc > self.best["acc"]:
            m = memory_stats(self.model)
            self.best = {
                "acc": acc,
                "epoch": self.epoch + 1,
                "step": step,
                **{k: m[k] for k in ("weight_kib", "act_sum_kib", "act_max_kib")},
            }
            if self.is_main:
                save_checkpoint(self.run_dir / "best.pt", self._payload({"test_acc": acc}))

    # -- checkpoints ----------------------------------------------------------------------------
    def _payload(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.epoch,
            "best": dict(self.best),
            "rng": _rng_state(),
            "metrics": metrics,
            "input_shape": list(self.data.input_shape),
            "num_classes": self.data.num_classes,
        }

    def resume(self) -> None:
        """Restore model, optimizer, scheduler, RNG, epoch and best from ``last.pt``."""
        path = self.run_dir / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {str(path)!r} does not exist")
        ckpt = load_checkpoint(path, self.device)
        if ckpt["config"] != self.cfg.to_dict():
            raise CheckpointError(
                f"cannot resume {str(self.run_dir)!r}: its config differs from this one; "
                "resume with the same config, or start a new run directory"
            )
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        self.epoch, self.best = ckpt["epoch"], ckpt["best"]

    def run(self) -> dict[str, Any]:
        """Train until ``cfg.optim.epochs``; returns the final summary."""
        metrics: dict[str, Any] = {}
        while self.epoch < self.cfg.optim.epochs:
            lr = self.sched.get_last_lr()[0]
            metrics = {"epoch": self.epoch + 1, "lr": lr, **self.train_one_epoch()}
            metrics.update(
                {f"test_{k}": v for k, v in evaluate(self.model, self.test_loader).items()}
            )
            metrics.update(memory_stats(self.model))
            met = self.budget.satisfied(self.model) if self.budget.active else {}
            metrics["budget_met"] = all(met.values())
            self.epoch += 1
            if metrics["budget_met"] and metrics["test_acc"] > self.best["acc"]:
                self.best = {
                    "acc": metrics["test_acc"],
                    "epoch": self.epoch,
                    **{k: metrics[k] for k in ("weight_kib", "act_sum_kib", "act_max_kib")},
                }
                if self.is_main:
                    save_checkpoint(self.run_dir / "best.pt", self._payload(metrics))
            if self.is_main:
                save_checkpoint(self.run_dir / "last.pt", self._payload(metrics))
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                _log_epoch(metrics, self.progress)
        return {"final": metrics, "best": self.best}


def _log_epoch(m: dict[str, Any], enabled: bool) -> None:
    if not enabled:
        return
    print(
        f"epoch {m['epoch']:>3}  loss {m['train_loss']:.4f}  pen {m['penalty']:.3g}  "
        f"test acc {100 * m['test_acc']:.2f}%  W {m['weight_kib']:.1f} KiB  "
        f"A sum/max {m['act_sum_kib']:.1f}/{m['act_max_kib']:.1f} KiB  "
        f"budget {'met' if m['budget_met'] else 'NOT met'}  {m['images_per_s']:.0f} img/s",
        flush=True,
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def fit(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    data: DatasetArrays | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the experiment ``cfg`` into ``run_dir`` (see the module docstring).

    Writes ``config.yaml`` (resolved), ``metrics.jsonl``, ``last.pt``, ``best.pt`` (when any
    epoch met every budget), ``summary.json`` and the report (``report.txt``, ``.json``,
    ``.csv``, ``.png``) of ``best.pt`` (of ``last.pt`` when no epoch met every budget).
    """
    import yaml

    run_dir = Path(run_dir)
    if not resume and (run_dir / "last.pt").exists():
        raise FileExistsError(
            f"run directory {str(run_dir)!r} already holds a run: pass --resume to continue it, "
            "or choose another --run-dir"
        )
    data = data if data is not None else load_data(cfg, data_dir)
    trainer = Trainer(cfg, run_dir, data, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
    )
    if resume:
        trainer.resume()
    summary = trainer.run()
    # The deliverable is the best model among the epochs that met every budget; report it.
    summary["report_of"] = "last.pt"
    if trainer.is_main and (run_dir / "best.pt").is_file():
        trainer.model.load_state_dict(load_checkpoint(run_dir / "best.pt", trainer.device)["model"])
        summary["report_of"] = "best.pt"
    write_report(trainer.model, trainer.budget, run_dir)
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def write_report(model: nn.Module, budget: Budget, run_dir: Path) -> None:
    """``report.txt``, ``report.json``, ``report.csv`` and ``report.png`` for ``model``."""
    from mixq.report import report

    rep = report(model, budget if budget.active else None)
    atomic_write_bytes(run_dir / "report.txt", rep.to_text().encode())
    atomic_write_bytes(run_dir / "report.json", rep.to_json().encode())
    atomic_write_bytes(run_dir / "report.csv", rep.to_csv().encode())
    try:
        rep.plot(run_dir / "report.png")
    except ImportError as e:
        print(f"note: no report.png ({e})")
