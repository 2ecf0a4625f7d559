"""Building blocks of a training run: data, budget, optimizer, schedule, RNG state, logging.

Kept apart from the loop in :mod:`mixq.train` so that the loop stays readable in one sitting.
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mixq.convert import quantizer_parameters
from mixq.cost import Budget, float_sites_warning, scaled_lambda
from mixq.data import get_dataset, resolve_data_dir
from mixq.data.shards import STREAMING_DATASETS
from mixq.run_config import TrainConfig


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU runs are then repeatable)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: TrainConfig, data_dir: str | None = None) -> Any:
    """The dataset of ``cfg.data`` (the CLI's ``--data-dir`` wins over the config): a
    :class:`~mixq.data.DatasetArrays`, or for ``imagefolder`` / ``imagenet_shards`` a streaming
    dataset (``mixq.data.imagefolder`` / ``mixq.data.shards``) read from the folder."""
    name = cfg.data.name
    if name in STREAMING_DATASETS:
        return STREAMING_DATASETS[name](resolve_data_dir(data_dir, cfg.data.dir), cfg.data)
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
    budget = Budget.parse(b.weight, b.activation_sum, b.activation_max, lam,
                          activation_peak=b.activation_peak)  # fmt: skip
    if budget.active:
        budget.check_feasible(model)
        msg = float_sites_warning(model, budget)
        if msg:  # before training: a budget "met" would not bound what the network stores
            warnings.warn(msg, stacklevel=2)
    return budget


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, lr: float | None = None
) -> torch.optim.Optimizer:
    """One optimizer for all parameters (decision 6). Model weights get weight decay from the
    optimizer; quantizer parameters get the same decay added explicitly *before* their gradient
    clipping, as the reference code orders it (spec 3.6). ``lr``: default ``optim.lr``.

    With ``optim.decay_norm_and_bias: false`` the model parameters with ``ndim <= 1``
    (batch-norm scales and shifts, biases) form a group of their own with no weight decay."""
    o = cfg.optim
    lr = o.lr if lr is None else lr
    qp = {id(p) for p in quantizer_parameters(model)}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in qp]
    if o.decay_norm_and_bias:
        groups = [{"params": weights, "weight_decay": o.weight_decay}]
    else:
        groups = [
            {"params": [p for p in weights if p.ndim > 1], "weight_decay": o.weight_decay},
            {"params": [p for p in weights if p.ndim <= 1], "weight_decay": 0.0},
        ]
    if qp:
        groups.append({"params": quantizer_parameters(model), "weight_decay": 0.0})
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step LR schedule: step (milestones in epochs), one-cycle, cosine or constant."""
    o = cfg.optim
    total = o.epochs * steps_per_epoch
    if o.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=opt.param_groups[0]["lr"],
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


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def log_epoch(m: dict[str, Any], enabled: bool) -> None:
    if not enabled:
        return
    if "train_loss" not in m:  # eval_only
        print(f"evaluation: test acc {100 * m['test_acc']:.2f}%  loss {m['test_loss']:.4f}")
        return
    print(
        f"epoch {m['epoch']:>3}  loss {m['train_loss']:.4f}  pen {m['penalty']:.3g}  "
        f"test acc {100 * m['test_acc']:.2f}%"
        + (f" (trained {100 * m['test_acc_trained']:.2f}%)" if "test_acc_trained" in m else "")
        + f"  W {m['weight_kib']:.1f} KiB  "
        f"A sum/max {m['act_sum_kib']:.1f}/{m['act_max_kib']:.1f} KiB  "
        f"budget {'met' if m['budget_met'] else 'NOT met'}  {m['images_per_s']:.0f} img/s",
        flush=True,
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
