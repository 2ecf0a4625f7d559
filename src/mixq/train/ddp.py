"""Data-parallel training under ``torchrun``: process group, collectives, replica checks.

``mixq train`` runs unchanged under ``torchrun --nproc_per_node N``: :func:`setup` reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, binds rank ``r`` to ``cuda:LOCAL_RANK`` and joins a
NCCL (CUDA) or gloo (CPU) process group. Without those variables everything here is a no-op
and a run is a plain single-process one.

How the data is sharded is the loaders' business (:mod:`mixq.data.sharding`); accuracy and
loss are summed over ranks with ``all_reduce`` (exact, no sample counted twice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mixq.config import ConfigError
from mixq.convert import quantizer_parameters
from mixq.cost import Budget
from mixq.train.config import TrainConfig

__all__ = [
    "DistContext",
    "all_reduce_sum",
    "broadcast_buffers",
    "broadcast_module_state",
    "check_replicas",
    "cleanup",
    "epoch_seed",
    "scaled_lr",
    "select_device",
    "setup",
    "wrap_model",
]

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
    try:
        device = torch.device(name)
    except RuntimeError:
        msg = f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N"
        raise ValueError(msg) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available here (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}): use "
                             "device=auto or device=cpu")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")  # fmt: skip
    return device


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
