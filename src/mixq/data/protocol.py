"""The one loader protocol that every dataset implements, in memory or streaming.

A *dataset* (:class:`Dataset`) is what :func:`mixq.data.get_dataset` returns: it knows its
``name``, ``num_classes`` and per-sample ``input_shape`` and makes this process's two loaders
from a :class:`LoaderSpec`::

    data = get_dataset("cifar10", "~/data")
    train, test = data.loaders(LoaderSpec(batch_size=128, eval_batch_size=500, seed=0))
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train: ...   # float32 [B, C, H, W] and int64 [B], on spec.device

Guarantees of every implementation (the resume-equality and DDP tests check them):

* epoch ``e`` of the training loader is a function of ``(seed, e)`` alone (permutation and
  augmentation), so ``set_epoch(e)`` in a new process replays it exactly;
* under data parallelism (``world > 1``) rank ``r`` yields its part of each *global* batch
  of ``batch_size * world`` samples (:mod:`mixq.data.sharding`); incomplete global batches
  are dropped; the test loader yields this rank's contiguous, disjoint part of the test set.

Implementations: :class:`~mixq.data.DatasetArrays` (whole dataset in device tensors: CIFAR-10,
digits, synthetic), :class:`~mixq.data.imagefolder.ImageFolderData` and
:class:`~mixq.data.shards.ShardData` (read from disk by worker processes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = ["Dataset", "Loader", "LoaderSpec"]


@dataclass(frozen=True)
class LoaderSpec:
    """What a dataset needs to know to build this process's loaders.

    Attributes:
        batch_size: training images per step on this rank.
        eval_batch_size: images per test batch.
        seed: base seed of the permutation and augmentation draws.
        device: where batches are delivered.
        channels_last: deliver images in ``torch.channels_last`` memory format.
        rank: this process's rank; ``world``: the number of processes.
        augment: training augmentation (crop + flip in memory; random-resized crop + flip
            when streaming): True on, False off, None (default) on where it applies (in
            memory: images of at least 16 px). True where it cannot apply is an error.
        flip: ``"random"`` or ``"alternating"`` (in-memory datasets only).
        crop_pad: padding of the random crop (in-memory datasets only; 0: no crop).
        random_resized_crop: streaming datasets' training crop (False: resize + centre crop).
        workers: loader worker processes (streaming datasets only).
    """

    batch_size: int
    eval_batch_size: int
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    rank: int = 0
    world: int = 1
    augment: bool | None = None
    flip: Literal["random", "alternating"] = "random"
    crop_pad: int = 4
    random_resized_crop: bool = True
    workers: int = 0


@runtime_checkable
class Loader(Protocol):
    """An iterable of ``(x, y)`` batches whose epoch is set explicitly."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@runtime_checkable
class Dataset(Protocol):
    """A dataset: its shape facts and :meth:`loaders`."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]

    def loaders(self, spec: LoaderSpec) -> tuple[Loader, Loader]: ...
