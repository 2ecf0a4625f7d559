"""Sharding of every loader kind for data-parallel runs (see :mod:`mixq.data.protocol`).

Sharding contract: a *global* batch holds ``batch_size * world`` samples of the epoch
permutation (drawn from ``(seed, epoch)`` only, identical on every rank) and rank ``r`` takes
the ``r``-th contiguous ``batch_size`` of it, so the ranks see disjoint samples and a resumed
run sees the same batches as an uninterrupted one. The test set is split into ``world``
contiguous, disjoint, unpadded parts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mixq.data.loader import epoch_generator

__all__ = ["GlobalBatchSampler", "eval_batches", "eval_shard"]

_PERM_STREAM, _ITEM_SEED_STREAM = 0, 2


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
