"""The training configuration: frozen dataclasses, validated on construction.

Loaded from YAML (``TrainConfig.load``) or a preset (``mixq.train.presets``), edited with dotted
``--set key=value`` overrides, and dumped resolved into the run directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixq.config import (
    ConfigError,
    QuantConfig,
    apply_overrides,
    check_range,
    from_dict,
    load_yaml,
    to_dict,
)
from mixq.cost import parse_size
from mixq.data.registry import STREAMING_DATASETS


@dataclass(frozen=True)
class ModelConfig:
    """``name`` from ``mixq.models.MODELS``; ``kwargs`` go to its constructor."""

    name: str = "resnet20"
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"model.num_classes={self.num_classes} must be >= 1 (or null: "
                              "the dataset's number of classes)")  # fmt: skip


@dataclass(frozen=True)
class DataConfig:
    """Dataset and batching. ``dir``: the data folder (else ``--data-dir`` or ``MIXQ_DATA``).

    ``batch_size`` is per process: under ``torchrun`` the global batch is ``batch_size *
    world_size``. The streaming datasets (``imagefolder``, ``imagenet_shards``) also use:
    ``workers`` (DataLoader worker processes per rank), ``image_size`` (the crop fed to the
    model; default 224 for ``imagefolder``, the prepared size for ``imagenet_shards``),
    ``resize_size`` (``imagefolder`` validation: shorter side before the centre crop; default
    ``round(image_size * 256 / 224)``) and ``random_resized_crop`` (``imagenet_shards``
    training: scale/aspect random-resized crop on the GPU; False: a plain random crop).

    ``flip`` (in-memory datasets such as CIFAR-10): ``"random"`` mirrors each training image
    with probability 0.5 every epoch; ``"alternating"`` mirrors each image in every other
    epoch (random for the first, then alternating; see :class:`~mixq.data.TensorLoader`).
    """

    name: str = "cifar10"
    dir: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 500
    augment: bool = True
    download: bool = False
    synthetic_train: int = 512
    synthetic_test: int = 256
    workers: int = 8
    image_size: int | None = None
    resize_size: int | None = None
    random_resized_crop: bool = True
    flip: Literal["random", "alternating"] = "random"
    crop_pad: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
        if self.crop_pad < 0:
            raise ConfigError(f"data.crop_pad={self.crop_pad} must be >= 0 (0: no random crop)")
        if self.workers < 0:
            raise ConfigError("data.workers must be >= 0")
        for name in ("synthetic_train", "synthetic_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        for name in ("image_size", "resize_size"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ConfigError(f"data.{name}={value} must be >= 8 (or null)")
        if self.flip != "random" and self.name in STREAMING_DATASETS:
            raise ConfigError(
                f"data.flip={self.flip!r} works only with in-memory datasets (cifar10, digits, "
                f"synthetic), not {self.name!r}: remove the key or set data.flip=random"
            )
        if self.crop_pad != 4 and self.name in STREAMING_DATASETS:
            raise ConfigError(
                f"data.crop_pad={self.crop_pad} works only with in-memory datasets (cifar10, "
                f"digits, synthetic), not {self.name!r}: remove the key (the streaming datasets "
                "use data.random_resized_crop)"
            )


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule. The paper's recipe (spec 7.1, decision 6): SGD momentum 0.9,
    weight decay 2e-4 on every parameter (quantizer parameters included), 160 epochs with the
    learning rate divided by 10 after epochs 80 and 120, batch 128.

    ``clip_quant_grads``: clip quantizer gradients to +-d (+-q_min) as the reference code does
    when a memory target is set (spec 3.6); None means "exactly when a budget is set".

    ``decay_norm_and_bias``: False exempts every model parameter with at most one dimension
    (batch-norm scales and shifts, biases) from weight decay, as in Goyal et al. (2017) and
    "Bag of Tricks" (He et al., 2019); True (default, the paper's recipe) decays them all.

    ``ema_decay``: keep an exponential moving average of the model (parameters and batch-norm
    buffers, ``torch.optim.swa_utils.AveragedModel``), updated after every optimizer step:
    ``W_ema <- ema_decay * W_ema + (1 - ema_decay) * W`` (Polyak averaging). The average is
    what is evaluated, selected, checkpointed as ``model`` and reported; 0 (default, the
    paper's recipe): off.

    ``lr_reference_batch``: the linear scaling rule, opt in: the learning rate used is
    ``lr * global_batch / lr_reference_batch`` (``global_batch = data.batch_size *
    world_size``); None (default) uses ``lr`` as given, whatever the number of processes.
    """

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    decay_norm_and_bias: bool = True
    schedule: Literal["step", "onecycle", "cosine", "constant"] = "step"
    milestones: tuple[float, ...] = (80, 120)
    gamma: float = 0.1
    epochs: int = 160
    pct_start: float = 0.25
    label_smoothing: float = 0.0
    clip_quant_grads: bool | None = None
    lr_reference_batch: int | None = None
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(
                f"optim.ema_decay={self.ema_decay} must be in [0, 1) (0: no moving average; "
                "typical: 0.999)"
            )
        if self.lr_reference_batch is not None and self.lr_reference_batch < 1:
            raise ConfigError("optim.lr_reference_batch must be >= 1 (or null)")
        check_range("optim.lr", self.lr, 0.0, lo_open=True)
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs={self.epochs} must be >= 1")
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        check_range("optim.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("optim.gamma", self.gamma, 0.0, lo_open=True, hint="the step schedule's "
                    "learning-rate factor at each milestone")  # fmt: skip
        check_range("optim.pct_start", self.pct_start, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("optim.label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        for i, m in enumerate(self.milestones):
            check_range(f"optim.milestones[{i}]", m, 0.0, hint="an epoch")


@dataclass(frozen=True)
class BudgetConfig:
    """Memory targets as sizes (``"70KB"``, ``"5.4MB"``; 1 KB = 1024 bytes) and ``lam``.

    ``scale_lambda``: multiply ``lam`` by ``(S_float(ResNet-20) / S_float(model))^2``
    (decision 7), for models of another size than the paper's CIFAR-10 ResNet-20.

    ``mode``: ``"fixed"`` (the paper's penalty ``lam * relu(S - S_0)^2``, Eq. 10) or ``"dual"``
    (no ``lam``: one multiplier per constraint by projected dual ascent, driving each size to
    ``(1 - margin) * S_0``; :mod:`mixq.budget_control`), with ``dual_lr`` (per step, on the
    relative violation ``S / S_0 - (1 - margin)``) and ``margin``.

    ``freeze_at``: when the bitwidths stop being learned: a fraction of the run in (0, 1)
    (e.g. 0.7: after ``round(0.7 * epochs)`` epochs) or a number of epochs (an integer >= 1).
    Then every budget the learned bits exceed is repaired (:mod:`mixq.repair`), the bits are
    frozen, batch norm is re-estimated, and only the checks after it may give ``best.pt``,
    so the delivered model meets every budget. None: the bits are learned to the end.
    """

    weight: str | None = None
    activation_sum: str | None = None
    activation_max: str | None = None
    lam: float = 0.1
    scale_lambda: bool = False
    activation_peak: str | None = None
    mode: Literal["fixed", "dual"] = "fixed"
    dual_lr: float = 0.01
    margin: float = 0.02
    freeze_at: float | None = None

    @property
    def any_target(self) -> bool:
        """True when at least one size target is set."""
        names = ("weight", "activation_sum", "activation_max", "activation_peak")
        return any(getattr(self, k) is not None for k in names)

    def freeze_epoch(self, epochs: int) -> int | None:
        """Epochs done when the bits freeze (``freeze_at`` resolved for a run of ``epochs``)."""
        if self.freeze_at is None:
            return None
        f = self.freeze_at
        return math.floor(f * epochs + 0.5) if f < 1 else int(f)

    def __post_init__(self) -> None:
        for name in ("weight", "activation_sum", "activation_max", "activation_peak"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_size(value)
                except ValueError as e:
                    raise ConfigError(f"budget.{name}: {e}") from None
        check_range("budget.lam", self.lam, 0.0, hint="the penalty weight; typical: 0.1")
        if self.mode not in ("fixed", "dual"):
            raise ConfigError(f"budget.mode={self.mode!r}: use 'fixed' (the paper's lam) or 'dual'")
        check_range("budget.dual_lr", self.dual_lr, 0.0, lo_open=True, hint="default 0.01")
        check_range("budget.margin", self.margin, 0.0, 1.0, hi_open=True, hint="default 0.02")
        f = self.freeze_at
        if f is not None and not (0 < f < 1 or (f >= 1 and float(f).is_integer())):
            raise ConfigError(
                f"budget.freeze_at={f}: give a fraction of the run in (0, 1), e.g. 0.7, or a "
                "whole number of epochs >= 1"
            )
        if not self.any_target and (self.mode == "dual" or f is not None):
            raise ConfigError(
                "budget.mode=dual and budget.freeze_at need a size target: set budget.weight, "
                "activation_sum, activation_max or activation_peak"
            )


@dataclass(frozen=True)
class TrainConfig:
    """A whole experiment. ``quant: null`` trains the float model.

    Attributes:
        init: a float checkpoint to start from (mixq checkpoint or plain state dict).
        logit_scale: a learnable scalar on the logits (the reference code's pow-2 ``scale_layer``).
        max_steps_per_epoch: cap for smoke tests, >= 1 (None: the whole epoch).
        select_every: also check the budgets every this many steps and, when all are met,
            evaluate and keep ``best.pt`` if better (the reference code does it after every
            iteration, spec 5.2); 0: only at the end of each epoch.
        bn_recalibrate: before every evaluation, re-estimate the batch-norm statistics of a
            quantized model from this many training batches (0: off, as the reference code).
            Bitwidths and steps that flip during training leave the running statistics of
            the float layers stale (Nagel et al. 2022, "Overcoming oscillations in QAT");
            measured here: 46.9% -> 82.2% test accuracy on a ResNet-20 fine-tune checkpoint.
        sync_bn: under ``torchrun``, batch-norm statistics over the global batch
            (``nn.SyncBatchNorm``; CUDA/NCCL only, PyTorch has no CPU implementation).
        compile: ``torch.compile`` the training forward/backward, the memory penalty and the
            quantizer updates (``mixq.qat``). On a GPU this fuses the many tiny per-quantizer
            operations into a few kernels; the first steps compile (tens of seconds). Evaluation
            and checkpoints use the uncompiled model.
        eval_only: no training: evaluate the built model (e.g. a float ``init``) once and
            write the run directory (``metrics.jsonl`` with ``epoch: 0``, ``last.pt``, report).
    """

    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig | None = None
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: str | None = None
    logit_scale: bool = False
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    max_steps_per_epoch: int | None = None
    select_every: int = 0
    description: str = ""
    sync_bn: bool = False
    eval_only: bool = False
    bn_recalibrate: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        has_budget = any(
            v is not None
            for v in (
                self.budget.weight,
                self.budget.activation_sum,
                self.budget.activation_max,
                self.budget.activation_peak,
            )
        )
        if has_budget and self.quant is None:
            raise ConfigError("a memory budget needs a quantized model: set quant (not null)")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch={self.max_steps_per_epoch} must be >= 1 "
                              "(or null: the whole epoch)")  # fmt: skip
        for name in ("select_every", "bn_recalibrate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0: off)")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed={self.seed} must be in [0, 2^63)")
        k = self.budget.freeze_epoch(self.optim.epochs)
        if k is not None and not 1 <= k < self.optim.epochs:
            raise ConfigError(
                f"budget.freeze_at={self.budget.freeze_at} freezes the bits after {k} of "
                f"{self.optim.epochs} epochs: it must leave at least one epoch before and after"
            )

    @classmethod
    def from_data(cls, data: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
        """Validate plain data (after applying ``key=value`` overrides)."""
        return from_dict(cls, apply_overrides(data, overrides or []))

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Load a YAML file."""
        return cls.from_data(load_yaml(path), overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for the resolved ``config.yaml`` and checkpoints."""
        return to_dict(self)
