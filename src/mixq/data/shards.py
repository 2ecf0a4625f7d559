"""ImageNet decoded once into memory-mapped uint8 shards, so JPEG decoding no longer bounds
training throughput (``mixq prepare-imagenet SRC DST --size S``).

Format (folder ``DST``):

* ``val_x.npy``: uint8 ``[N_val, 3, S, S]``, exactly the validation transform of
  :mod:`mixq.data.imagefolder` (shorter side resized to ``R = round(S * 256 / 224)``, centre
  crop ``S``);
* ``train_x.npy``: uint8 ``[N_train, 3, R, R]`` (shorter side resized to ``R``, centre crop
  ``R``), so that training still draws random crops of ``S`` from a larger image;
* ``train_y.npy`` / ``val_y.npy``: int64 labels;
* ``index.json``: format tag, ``size`` ``S``, ``train_size`` ``R``, class names, per-split count,
  shape, images per class and a SHA-256 of the split's image and label bytes. It is written
  last: a folder without it is an interrupted preparation.

The ``.npy`` files are opened with ``numpy.load(mmap_mode="r")``: workers read whole batches
(sorted rows) from the page cache and the GPU does the augmentation on uint8 batches:
random-resized crop (scale ``(0.08, 1)``, ratio ``(3/4, 4/3)`` of the stored ``R x R`` image,
bilinear, one ``grid_sample`` per batch) or, with ``random_resized_crop: false``, a plain
random ``S x S`` crop; then a horizontal flip with probability 0.5. The random draws come from
``(seed, epoch)``, as in :class:`~mixq.data.TensorLoader`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mixq.data.errors import DataError
from mixq.data.imagefolder import (
    DeviceLoader,
    centre_crop_transform,
    default_resize,
    device_loader_options,
    scan_imagefolder,
)
from mixq.data.loader import epoch_generator
from mixq.data.protocol import LoaderSpec
from mixq.data.sharding import GlobalBatchSampler, eval_batches
from mixq.progress import progress_bar

__all__ = [
    "ShardData",
    "open_shards",
    "prepare_shards",
    "verify_shards",
]

FORMAT, VERSION = "mixq-imagenet-shards", 1
_AUG_STREAM = 1


def _store(path_label: tuple[str, int], resize: int, crop: int) -> np.ndarray:
    return centre_crop_transform(path_label[0], resize, crop).numpy()


def prepare_shards(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    size: int = 224,
    *,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode the image folder ``src`` into shards in ``dst`` (see the module docstring).

    Args:
        size: the training and validation crop ``S``.
        workers: decoding processes (0: this process).
        overwrite: replace an existing, complete ``dst``.

    Returns:
        The index (also written to ``dst/index.json``).
    """
    dst = Path(dst).expanduser()
    if (dst / "index.json").exists() and not overwrite:
        raise DataError(f"{str(dst)!r} already holds prepared shards (pass --overwrite)")
    folder = scan_imagefolder(src)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "index.json").unlink(missing_ok=True)
    resize = default_resize(size)
    index: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "size": size, "train_size": resize,
        "classes": list(folder.classes), "source": str(folder.root), "splits": {},
    }  # fmt: skip
    pool = None
    if workers > 0:
        import multiprocessing as mp

        pool = mp.get_context("fork" if os.name == "posix" else "spawn").Pool(workers)
    try:
        for split, samples, side in (("train", folder.train, resize), ("val", folder.val, size)):
            shape = (len(samples), 3, side, side)
            x = np.lib.format.open_memmap(dst / f"{split}_x.npy", "w+", np.uint8, shape)
            fn = partial(_store, resize=resize, crop=side)
            it = pool.imap(fn, samples, chunksize=32) if pool else map(fn, samples)
            digest = hashlib.sha256()
            bar = _bar(len(samples), f"{split} {side}px", progress)
            for i, arr in enumerate(it):
                x[i] = arr
                digest.update(arr.tobytes())
                bar.update(1)
            bar.close()
            x.flush()
            del x
            y = np.asarray([label for _, label in samples], dtype=np.int64)
            np.save(dst / f"{split}_y.npy", y)
            digest.update(y.tobytes())
            index["splits"][split] = {
                "count": len(samples), "shape": list(shape), "sha256": digest.hexdigest(),
                "per_class": np.bincount(y, minlength=len(folder.classes)).tolist(),
            }  # fmt: skip
    finally:
        if pool is not None:
            pool.terminate()
    tmp = dst / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, dst / "index.json")
    return index


def _bar(total: int, desc: str, enabled: bool) -> Any:
    return progress_bar(total, desc, enabled)


def _read_index(root: Path) -> dict[str, Any]:
    path = root / "index.json"
    if not path.is_file():
        raise DataError(
            f"no {str(path)!r}: not a prepared shard folder, or the preparation was interrupted; "
            "run: mixq prepare-imagenet SRC DST --size 224"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{str(path)!r} is corrupt ({e}); prepare the shards again") from None
    if index.get("format") != FORMAT or index.get("version", 0) > VERSION:
        raise DataError(f"{str(path)!r} is not a mixq shard index (format {FORMAT} v{VERSION})")
    return index


def _open_split(root: Path, index: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    meta = index["splits"][split]
    try:
        x = np.load(root / f"{split}_x.npy", mmap_mode="r")
        y = np.load(root / f"{split}_y.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{str(root)!r}: cannot open the {split} shards ({e})") from None
    if x.dtype != np.uint8 or list(x.shape) != meta["shape"] or y.shape != (meta["count"],):
        raise DataError(
            f"{str(root)!r}: {split} shards have shape {list(x.shape)} / {list(y.shape)}, the "
            f"index says {meta['shape']}: the folder is inconsistent, prepare it again"
        )
    return x, y


def verify_shards(root: str | os.PathLike[str], chunk: int = 1024) -> dict[str, Any]:
    """Recompute every split's SHA-256; :class:`DataError` on a mismatch. Returns the index."""
    root = Path(root).expanduser()
    index = _read_index(root)
    for split, meta in index["splits"].items():
        x, y = _open_split(root, index, split)
        digest = hashlib.sha256()
        for i in range(0, x.shape[0], chunk):
            digest.update(np.ascontiguousarray(x[i : i + chunk]).tobytes())
        digest.update(np.ascontiguousarray(y).tobytes())
        if digest.hexdigest() != meta["sha256"]:
            raise DataError(f"{str(root)!r}: the {split} shards fail their checksum")
    return index


class ShardBatches(torch.utils.data.Dataset):
    """Reads a whole batch ``[i0, i1, ...]`` from the memory-mapped split (opened per process)."""

    def __init__(self, x_path: Path, y_path: Path) -> None:
        self.x_path, self.y_path = x_path, y_path
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def __getitem__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x is None:
            self._x = np.load(self.x_path, mmap_mode="r")
            self._y = np.load(self.y_path, mmap_mode="r")
        idx = np.asarray(batch, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), *self._x.shape[1:]), np.uint8)
        out[order] = self._x[idx[order]]  # sorted reads: sequential on disk
        return torch.from_numpy(out), torch.from_numpy(np.asarray(self._y[idx]))

    def __len__(self) -> int:
        return int(np.load(self.y_path, mmap_mode="r").shape[0])


def _rrc_boxes(n: int, side: int, g: torch.Generator) -> torch.Tensor:
    """``[n, 4]`` float ``(top, left, h, w)`` random-resized-crop boxes in a ``side`` square,
    ten tries per sample as torchvision, else the whole image."""
    area = float(side * side)
    scale = torch.empty(n, 10).uniform_(0.08, 1.0, generator=g) * area
    logr = torch.empty(n, 10).uniform_(float(np.log(3 / 4)), float(np.log(4 / 3)), generator=g)
    w = torch.sqrt(scale * logr.exp()).round()
    h = torch.sqrt(scale / logr.exp()).round()
    ok = (w <= side) & (h <= side) & (w > 0) & (h > 0)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0).view(n, 1)
    w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.full((n,), float(side)))
    h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.full((n,), float(side)))
    u = torch.rand(n, 2, generator=g)
    top = torch.floor(u[:, 0] * (side - h + 1))
    left = torch.floor(u[:, 1] * (side - w + 1))
    return torch.stack([top, left, h, w], 1)


class _TrainAugment:
    """Per-batch GPU augmentation of uint8 ``R x R`` shards to ``S x S`` (from (seed, epoch))."""

    def __init__(self, sampler: Any, n: int, stored: int, size: int, seed: int, rrc: bool) -> None:
        self.sampler, self.n, self.stored, self.size = sampler, n, stored, size
        self.seed, self.rrc = seed, rrc
        self._epoch, self._params = -1, None

    def _draw(self, epoch: int) -> dict[str, torch.Tensor]:
        g = epoch_generator(self.seed, epoch, _AUG_STREAM)
        n, slack = self.n, self.stored - self.size
        p = {"flip": torch.rand(n, generator=g) < 0.5}
        if self.rrc:
            p["box"] = _rrc_boxes(n, self.stored, g)
        else:
            p["dy"] = torch.randint(0, slack + 1, (n,), generator=g)
            p["dx"] = torch.randint(0, slack + 1, (n,), generator=g)
        return p

    def __call__(self, x: torch.Tensor, i: int, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch, self._params = epoch, self._draw(epoch)
        sl = self.sampler.positions(i)
        p = {k: v[sl].to(x.device) for k, v in self._params.items()}
        B, S, R = x.shape[0], self.size, self.stored
        if not self.rrc:
            rows = (p["dy"].view(B, 1) + torch.arange(S, device=x.device)).view(B, 1, S, 1)
            x = x.gather(2, rows.expand(B, 3, S, R))
            cols = (p["dx"].view(B, 1) + torch.arange(S, device=x.device)).view(B, 1, 1, S)
            x = x.gather(3, cols.expand(B, 3, S, S))
            return torch.where(p["flip"].view(B, 1, 1, 1), x.flip(3), x)
        top, left, h, w = p["box"].unbind(1)
        sign = 1.0 - 2.0 * p["flip"].float()
        theta = torch.zeros(B, 2, 3, device=x.device)
        theta[:, 0, 0] = sign * w / R
        theta[:, 0, 2] = (2 * left + w) / R - 1
        theta[:, 1, 1] = h / R
        theta[:, 1, 2] = (2 * top + h) / R - 1
        grid = F.affine_grid(theta, [B, 3, S, S], align_corners=False)
        out = F.grid_sample(x.float(), grid, "bilinear", "border", align_corners=False)
        return out.round_().clamp_(0, 255)


def _centre(x: torch.Tensor, i: int, epoch: int, size: int) -> torch.Tensor:
    off = (x.shape[-1] - size) // 2
    return x[:, :, off : off + size, off : off + size]


@dataclass
class ShardData:
    """Opened shards: ``input_shape``, ``num_classes``, ``classes`` and ``loaders(...)``."""

    root: Path
    index: dict[str, Any]
    name: str = "imagenet_shards"

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in label order."""
        return tuple(self.index["classes"])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.index["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, S, S)``."""
        return (3, self.index["size"], self.index["size"])

    def loaders(self, spec: LoaderSpec) -> tuple[DeviceLoader, DeviceLoader]:
        """Training loader (rank-sharded global batches) and test loader (this rank's part)."""
        common = device_loader_options(spec)
        r, ix = self.root, self.index
        n, n_val = ix["splits"]["train"]["count"], ix["splits"]["val"]["count"]
        sampler = GlobalBatchSampler(n, spec.batch_size, spec.rank, spec.world, spec.seed)
        stored, size = ix["train_size"], ix["size"]
        aug: Any = _TrainAugment(sampler, n, stored, size, spec.seed, spec.random_resized_crop)
        if spec.augment is False:  # None: on (it always applies here)
            aug = partial(_centre, size=size)
        train_ds = ShardBatches(r / "train_x.npy", r / "train_y.npy")
        train = DeviceLoader(train_ds, sampler, whole_batches=True, transform=aug, **common)
        val_ds = ShardBatches(r / "val_x.npy", r / "val_y.npy")
        test = eval_batches(n_val, spec.eval_batch_size, spec.rank, spec.world)
        return train, DeviceLoader(val_ds, test, whole_batches=True, **common)


def open_shards(root: str | os.PathLike[str], *, image_size: int | None = None) -> ShardData:
    """Open prepared shards; :class:`DataError` for a missing, incomplete or inconsistent folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"shard folder {str(root)!r} does not exist")
    index = _read_index(root)
    if image_size is not None and image_size != index["size"]:
        raise DataError(
            f"{str(root)!r} holds {index['size']}px shards but data.image_size={image_size}; "
            f"prepare them with --size {image_size} or set data.image_size={index['size']}"
        )
    for split in ("train", "val"):
        _, y = _open_split(root, index, split)
        if y.shape[0] and (int(y.min()) < 0 or int(y.max()) >= len(index["classes"])):
            raise DataError(f"{str(root)!r}: {split} labels out of range; prepare it again")
    return ShardData(root, index)
