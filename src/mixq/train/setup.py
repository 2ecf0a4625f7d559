"""Building blocks of a training run: data, budget, optimizer, schedule, RNG state, logging.

Kept apart from the loop in :mod:`mixq.train.trainer` so that the loop stays readable in one
sitting.
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

from mixq.cost import Budget, float_sites_warning, scaled_lambda
from mixq.data import LoaderSpec, get_dataset
from mixq.qat import param_groups
from mixq.train.config import TrainConfig
from mixq.train.ddp import DistContext


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU runs are then repeatable)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: Dataset name -> the options of :func:`mixq.data.get_dataset` taken from a config.
_DATASET_OPTIONS: dict[str, Any] = {
    "cifar10": lambda c: {"download": c.data.download},
    "synthetic": lambda c: {
        "n_train": c.data.synthetic_train, "n_test": c.data.synthetic_test, "seed": c.seed
    },
    "imagefolder": lambda c: {"image_size": c.data.image_size, "resize_size": c.data.resize_size},
    "imagenet_shards": lambda c: {"image_size": c.data.image_size},
}


def load_data(cfg: TrainConfig, data_dir: str | None = None) -> Any:
    """The dataset of ``cfg.data`` (:func:`mixq.data.get_dataset`; the CLI's ``--data-dir``
    wins over ``data.dir``, then ``$MIXQ_DATA``)."""
    options = _DATASET_OPTIONS.get(cfg.data.name, lambda c: {})(cfg)
    return get_dataset(cfg.data.name, data_dir or cfg.data.dir, **options)


def build_loaders(cfg: TrainConfig, data: Any, ctx: DistContext) -> tuple[Any, Any]:
    """This rank's training and test loaders of ``data`` (:mod:`mixq.data.protocol`)."""
    d = cfg.data
    spec = LoaderSpec(
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        seed=cfg.seed,
        device=ctx.device,
        channels_last=cfg.channels_last,
        rank=ctx.rank,
        world=ctx.world_size,
        augment=d.augment,
        flip=d.flip,
        crop_pad=d.crop_pad,
        random_resized_crop=d.random_resized_crop,
        workers=d.workers,
    )
    return data.loaders(spec)


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
    """One optimizer for all parameters (decision 6) on :func:`mixq.qat.param_groups`: model
    weights get weight decay from the optimizer, quantizer parameters get the same decay from
    :class:`mixq.qat.QATStep`, before their gradient clip (spec 3.6). ``lr``: default
    ``optim.lr``."""
    o = cfg.optim
    lr = o.lr if lr is None else lr
    groups = param_groups(model, o.weight_decay, o.decay_norm_and_bias)
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
        + f"  W {m['weight_kib']:.2f} KiB  "
        f"A sum/max {m['act_sum_kib']:.1f}/{m['act_max_kib']:.1f} KiB  "
        f"budget {'met' if m['budget_met'] else 'NOT met'}  {m['images_per_s']:.0f} img/s",
        flush=True,
    )
