"""Data-parallel training under ``torchrun``: process group, rank-sharded loaders, replica checks.

``mixq train`` runs unchanged under ``torchrun --nproc_per_node N``: :func:`setup` reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, binds rank ``r`` to ``cuda:LOCAL_RANK`` and joins a
NCCL (CUDA) or gloo (CPU) process group. Without those variables everything here is a no-op
and a run is a plain single-process one.

Sharding contract (every loader kind): a *global* batch holds ``batch_size * world`` samples of
the epoch permutation (drawn from ``(seed, epoch)`` only, identical on every rank) and rank
``r`` takes the ``r``-th contiguous ``batch_size`` of it, so the ranks see disjoint samples and
a resumed run sees the same batches as an uninterrupted one. The test set is split into
``world`` contiguous, disjoint, unpadded parts; accuracy and loss are summed over ranks with
``all_reduce`` (exact, no sample counted twice).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mixq.config import ConfigError
from mixq.convert import quantizer_parameters
from mixq.cost import Budget
from mixq.data.arrays import DatasetArrays
from mixq.data.augment import batch_crop, batch_flip
from mixq.data.loader import TensorLoader, epoch_generator
from mixq.run_config import TrainConfig

__all__ = [
    "DistContext",
    "GlobalBatchSampler",
    "RankTensorLoader",
    "all_reduce_sum",
    "broadcast_buffers",
    "broadcast_module_state",
    "build_loaders",
    "check_replicas",
    "cleanup",
    "epoch_seed",
    "eval_batches",
    "eval_shard",
    "scaled_lr",
    "select_device",
    "setup",
    "wrap_model",
]

_PERM_STREAM, _ITEM_SEED_STREAM = 0, 2
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly trivial) data-parallel run.

    Attributes:
        rank: global rank (0 for a single process).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: this process's device.
        owns_group: True when :func:`setup` created the process group (and
            :func:`cleanup` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run directory."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.enabled:
            dist.barrier()


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device_name: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Args:
        device_name: the config's ``device``: ``auto`` (CUDA when available), ``cuda``,
            ``cpu``, or ``cuda:N`` / ``cpu`` for a single process. Under DDP rank ``r`` uses
            ``cuda:LOCAL_RANK`` (or the CPU).

    Returns:
        The context; a single-process one when ``WORLD_SIZE`` is unset or 1 and no group exists.
    """
    kind = device_name.split(":")[0]
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.is_available() and dist.is_initialized():  # set up by the caller (e.g. a test)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        return DistContext(rank, world, local, _device(kind, local, world), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(device=select_device(device_name))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = _device(kind, local, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return DistContext(rank, world, local, device, owns_group=True)


def _device(kind: str, local_rank: int, world: int) -> torch.device:
    if kind != "cuda":
        return torch.device(kind)
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but only {n} CUDA device(s): start torchrun with "
            f"--nproc_per_node <= {n}"
        )
    return torch.device("cuda", local_rank)


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives ---------------------------------------------------------------------------------


def _state_tensors(module: nn.Module, buffers_only: bool = False) -> list[torch.Tensor]:
    tensors = [] if buffers_only else [p.data for p in module.parameters()]
    return tensors + [b for b in module.buffers()]


@torch.no_grad()
def broadcast_module_state(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers into every rank (after building the model).

    The float init and the data-dependent quantizer initialisation are computed identically
    on every rank (same seed, same file), but this makes it a fact rather than an assumption.
    """
    if ctx.enabled:
        for t in _state_tensors(module):
            dist.broadcast(t, src=0)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) into every rank.

    DDP broadcasts them at the start of every training forward, but the last training step
    updates each rank's statistics from its own shard; this makes the evaluated (and saved)
    model the same on every rank.
    """
    if ctx.enabled:
        for t in _state_tensors(module, buffers_only=True):
            dist.broadcast(t, src=0)


def all_reduce_sum(values: list[float], ctx: DistContext, op: str = "sum") -> list[float]:
    """Sum (or ``op="max"``) a few numbers over the ranks (float64; identity for one rank)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def check_replicas(model: nn.Module, budget: Budget, ctx: DistContext) -> None:
    """Raise ``RuntimeError`` on every rank unless the quantizer parameters and the memory
    penalty are bitwise equal on all ranks (the trainer checks once per epoch).

    They must be: DDP averages the gradients, the optimizer step is the same computation on
    every rank, and the penalty is a function of the (synchronised) quantizer parameters only.
    """
    if not ctx.enabled:
        return
    tensors = [p.reshape(-1) for p in quantizer_parameters(model)]
    if budget.active:
        tensors.append(budget.penalty(model).reshape(-1))
    what = "quantizer parameters / memory penalty"
    if not tensors:
        return
    local = torch.cat([t.detach().double() for t in tensors]).to(ctx.device)
    ref = local.clone()
    dist.broadcast(ref, src=0)
    bad = torch.tensor([float(not torch.equal(local, ref))], device=ctx.device)
    dist.all_reduce(bad)
    if bad.item():
        raise RuntimeError(
            f"{what} differ between ranks ({int(bad.item())} of {ctx.world_size} differ from "
            "rank 0): the replicas are out of sync"
        )


def wrap_model(model: nn.Module, ctx: DistContext, sync_bn: bool = False) -> nn.Module:
    """Under DDP: broadcast rank 0's state, optionally convert to SyncBN, wrap in DDP.

    Returns ``model`` itself for a single process. Quantizer parameters are ordinary
    parameters: DDP averages their gradients like the weights'.
    """
    if not ctx.enabled:
        return model
    if sync_bn and ctx.device.type != "cuda":
        raise ConfigError(
            "sync_bn: true needs CUDA (NCCL): PyTorch's SyncBatchNorm has no CPU/gloo "
            "implementation; set sync_bn: false"
        )
    broadcast_module_state(model, ctx)  # identical init on every rank, explicitly
    if sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def scaled_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """``optim.lr``, times ``global batch / optim.lr_reference_batch`` when that is set (the
    linear scaling rule, opt in; ``global batch = data.batch_size * world_size``)."""
    o = cfg.optim
    if o.lr_reference_batch is None:
        return o.lr
    return o.lr * cfg.data.batch_size * world_size / o.lr_reference_batch


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A per-(seed, epoch, rank) seed for the global RNG (dropout) under DDP."""
    state = np.random.SeedSequence([seed % 2**63, epoch, 1000 + rank]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


# -- sharding ------------------------------------------------------------------------------------


def eval_shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: rank ``rank``'s contiguous part of ``n`` samples (sizes differ by <= 1)."""
    return rank * n // world, (rank + 1) * n // world


def eval_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's test indices in order, cut into batches of ``batch_size`` (a batch sampler)."""
    lo, hi = eval_shard(n, rank, world)
    return [list(range(i, min(i + batch_size, hi))) for i in range(lo, hi, batch_size)]


class GlobalBatchSampler:
    """A batch sampler (for ``DataLoader(batch_sampler=...)``) that shards every global batch.

    Epoch ``e``'s permutation is drawn from ``(seed, e)`` alone; global batch ``i`` is
    ``perm[i*B*W : (i+1)*B*W]`` and rank ``r`` yields its ``r``-th ``B`` slice. Incomplete
    global batches are dropped (every rank takes the same number of steps). With
    ``item_seeds`` each index comes paired with a per-(seed, epoch, position) integer that
    seeds that sample's augmentation in a worker process, so augmentation does not depend on
    worker scheduling either.

    Args:
        n: dataset size.
        batch_size: per-rank batch size ``B``.
        rank: this rank.
        world: number of ranks ``W``.
        seed: base seed.
        item_seeds: yield ``(index, seed)`` pairs instead of indices.
    """

    def __init__(
        self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
        item_seeds: bool = False,
    ) -> None:  # fmt: skip
        if n < batch_size * world:
            raise ValueError(
                f"{n} training samples are fewer than one global batch ({batch_size} x {world} "
                "ranks): lower data.batch_size"
            )
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.item_seeds, self.epoch = seed, item_seeds, 0

    def set_epoch(self, epoch: int) -> None:
        """Produce epoch ``epoch`` next."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world)

    def positions(self, i: int) -> slice:
        """The epoch positions of this rank's part of global batch ``i``."""
        start = i * self.batch_size * self.world + self.rank * self.batch_size
        return slice(start, start + self.batch_size)

    def __iter__(self) -> Iterator[list]:
        g = epoch_generator(self.seed, self.epoch, _PERM_STREAM)
        perm = torch.randperm(self.n, generator=g)
        seeds = None
        if self.item_seeds:
            g = epoch_generator(self.seed, self.epoch, _ITEM_SEED_STREAM)
            seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        for i in range(len(self)):
            sl = self.positions(i)
            idx = perm[sl].tolist()
            yield list(zip(idx, seeds[sl].tolist(), strict=True)) if seeds is not None else idx


class RankTensorLoader(TensorLoader):
    """:class:`~mixq.data.TensorLoader` that yields rank ``rank``'s part of each global batch.

    Permutation and augmentation draws are the single-process loader's (from ``(seed,
    epoch)``), so the union of the ranks' batches is the global batch of a
    ``batch_size * world`` loader. Incomplete global batches are dropped.
    """

    def __init__(self, *args, rank: int, world: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.world = int(rank), int(world)
        if self.num_samples < self.batch_size * self.world:
            raise ValueError(
                f"{self.num_samples} samples are fewer than one global batch "
                f"({self.batch_size} x {self.world} ranks): lower data.batch_size"
            )

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world)

    def _batches(self, p: dict[str, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b, gb = self.batch_size, self.batch_size * self.world
        for i in range(len(self)):
            sl = slice(i * gb + self.rank * b, i * gb + (self.rank + 1) * b)
            idx = p["perm"][sl] if "perm" in p else torch.arange(sl.start, sl.stop)
            xb, yb = self.x[idx.to(self.device)], self.y[idx.to(self.device)]
            if "dy" in p:
                xb = batch_crop(xb, p["dy"][sl], p["dx"][sl], self.crop_pad)
                if self.flip:
                    xb = batch_flip(xb, p["flip"][sl])
            yield self._prepare(xb), yb


def build_loaders(cfg: TrainConfig, data: Any, ctx: DistContext) -> tuple[Any, Any]:
    """The training and test loaders of ``data`` for this rank.

    ``data`` is a :class:`~mixq.data.DatasetArrays` (device-resident :class:`TensorLoader`;
    :class:`RankTensorLoader` under DDP) or a streaming dataset (``imagefolder``,
    ``imagenet_shards``) with a ``loaders(...)`` method. Training loaders drop incomplete
    (global) batches; test loaders cover this rank's :func:`eval_shard`.
    """
    d = cfg.data
    common = {"device": ctx.device, "channels_last": cfg.channels_last, "seed": cfg.seed}
    if not isinstance(data, DatasetArrays):
        return data.loaders(
            batch_size=d.batch_size,
            eval_batch_size=d.eval_batch_size,
            rank=ctx.rank,
            world=ctx.world_size,
            workers=d.workers,
            augment=d.augment,
            random_resized_crop=d.random_resized_crop,
            **common,
        )
    augment = d.augment and data.input_shape[-1] >= 16
    args = (data.x_train, data.y_train, d.batch_size)
    kw = {
        "train": True,
        "augment": augment,
        "drop_last": True,
        "flip_mode": d.flip,
        "crop_pad": d.crop_pad,
        **common,
    }
    if not ctx.enabled:
        train = TensorLoader(*args, **kw)
        xt, yt = data.x_test, data.y_test
        return train, TensorLoader(xt, yt, d.eval_batch_size, train=False, **common)
    train = RankTensorLoader(*args, rank=ctx.rank, world=ctx.world_size, **kw)
    lo, hi = eval_shard(data.y_test.shape[0], ctx.rank, ctx.world_size)
    xt, yt = data.x_test[lo:hi], data.y_test[lo:hi]
    return train, TensorLoader(xt, yt, d.eval_batch_size, train=False, **common)
