"""ImageNet-style image folders, decoded with Pillow in DataLoader workers (no torchvision).

Layout: ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>``, the same class
folders in both splits (sorted names give the labels ``0..K-1``, as torchvision's
``ImageFolder``). Transforms follow the standard ImageNet recipe, with torchvision's
arithmetic on PIL images:

* training: random-resized crop (area scale ``(0.08, 1)``, aspect ratio ``(3/4, 4/3)``, ten
  tries then a centre crop) resized to ``image_size`` (bilinear), horizontal flip with
  probability 0.5;
* validation: shorter side resized to ``resize_size`` (default ``round(image_size * 256 /
  224)``, 256 for 224), centre crop ``image_size``.

Workers return uint8 tensors; the loader moves whole batches to the device and normalises them
there with the ImageNet mean and std (``(x / 255 - mean) / std``). Each sample's augmentation
is seeded from ``(seed, epoch, position)`` by the batch sampler, so batches do not depend on
worker scheduling and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixq.data.errors import DataError
from mixq.data.protocol import LoaderSpec
from mixq.data.sharding import GlobalBatchSampler, eval_batches

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DeviceLoader",
    "FolderIndex",
    "ImageFolderData",
    "ImageFolderDataset",
    "centre_crop_transform",
    "default_resize",
    "load_rgb",
    "open_imagefolder",
    "scan_imagefolder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SCALE, _RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def default_resize(image_size: int) -> int:
    """The validation resize for a crop of ``image_size``: ``round(image_size * 256 / 224)``."""
    return round(image_size * 256 / 224)


# -- scanning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderIndex:
    """The samples of an image folder: class names and ``(path, label)`` per split."""

    root: Path
    classes: tuple[str, ...]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]


def _list_images(folder: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                raise DataError(
                    f"{path!r} is not an image file (extensions {', '.join(IMAGE_EXTENSIONS)}): "
                    "move it out of the class folder"
                )
            files.append(path)
    if not files:
        raise DataError(f"class folder {str(folder)!r} holds no images")
    return files


def _scan_split(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    if not folder.is_dir():
        raise DataError(
            f"no folder {str(folder)!r}: an image folder needs train/ and val/, each with one "
            "sub-folder of images per class (e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG; "
            "sort the flat ImageNet val/ into class folders first)"
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name[0] != ".")
    if not classes:
        raise DataError(f"{str(folder)!r} holds no class folders (one folder per class)")
    with ThreadPoolExecutor(max_workers=8) as pool:  # os.walk releases the GIL: fast on NFS
        files = list(pool.map(_list_images, [folder / c for c in classes]))
    return classes, [(p, label) for label, fs in enumerate(files) for p in fs]


def scan_imagefolder(root: str | os.PathLike[str]) -> FolderIndex:
    """List ``root/train`` and ``root/val``; :class:`DataError` for a missing, empty or
    inconsistent folder (class lists that differ, a class folder without images, a file that
    is not an image)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    train_classes, train = _scan_split(root / "train")
    val_classes, val = _scan_split(root / "val")
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"{str(root)!r}: train/ and val/ have different class folders (only in train: "
            f"{only_t[:5]}{' ...' if len(only_t) > 5 else ''}; only in val: {only_v[:5]}"
            f"{' ...' if len(only_v) > 5 else ''}); both need the same classes"
        )
    return FolderIndex(root, tuple(train_classes), train, val)


# -- decoding and transforms ---------------------------------------------------------------------


def load_rgb(path: str, draft: int | None = None) -> Any:
    """Decode ``path`` into an RGB PIL image; :class:`DataError` naming the file on failure.

    Args:
        draft: let the JPEG decoder downscale by a power of two while both sides stay >= this.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if draft is not None:
                im.draft("RGB", (draft, draft))
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path!r} ({e}); replace or remove it") from None


def _to_tensor(im: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())


def resize_shorter(im: Any, size: int) -> Any:
    """Resize so that the shorter side is ``size`` (torchvision ``Resize(size)`` on PIL)."""
    from PIL import Image

    w, h = im.size
    if min(w, h) == size:
        return im
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return im.resize((nw, nh), Image.BILINEAR)


def centre_crop(im: Any, size: int) -> Any:
    """torchvision ``CenterCrop(size)`` on a PIL image at least ``size`` on each side."""
    w, h = im.size
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return im.crop((left, top, left + size, top + size))


def centre_crop_transform(path: str, resize: int, crop: int) -> torch.Tensor:
    """Decode, resize the shorter side to ``resize``, centre-crop ``crop``: uint8 ``[3, c, c]``.

    The validation transform, and what ``mixq prepare-imagenet`` stores.
    """
    return _to_tensor(centre_crop(resize_shorter(load_rgb(path, draft=resize), resize), crop))


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of the crop."""
    area = width * height
    log_ratio = (np.log(_RATIO[0]), np.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_SCALE)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w = round(float(np.sqrt(target * aspect)))
        h = round(float(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif ratio > _RATIO[1]:
        h, w = height, round(height * _RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageFolderDataset(torch.utils.data.Dataset):
    """``(uint8 [3, S, S] tensor, label)`` per sample; items are indices or ``(index, seed)``.

    Args:
        samples: ``(path, label)`` pairs.
        image_size: the crop ``S``.
        train: random-resized crop + flip (when ``augment``) instead of resize + centre crop.
        augment: see ``train``.
        resize_size: validation resize (default :func:`default_resize`).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        image_size: int,
        train: bool,
        augment: bool = True,
        resize_size: int | None = None,
    ) -> None:
        self.samples, self.image_size = samples, int(image_size)
        self.random = bool(train and augment)
        self.resize = int(resize_size or default_resize(self.image_size))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        index, seed = item if isinstance(item, (tuple, list)) else (item, 0)
        path, label = self.samples[index]
        if not self.random:
            return centre_crop_transform(path, self.resize, self.image_size), label
        rng = np.random.default_rng(seed)
        im = load_rgb(path)
        top, left, h, w = random_resized_crop_box(im.size[0], im.size[1], rng)
        s = self.image_size
        im = im.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(im), label


# -- the loader ----------------------------------------------------------------------------------


class DeviceLoader:
    """Batches from a Dataset through DataLoader workers, normalised on ``device``.

    Args:
        dataset: yields uint8 ``[C, H, W]`` and a label per item (or, with ``whole_batches``,
            uint8 ``[B, C, H, W]`` and labels per list of indices).
        batches: a batch sampler (``set_epoch`` honoured) or a list of index lists.
        device: where batches go (pinned memory and non-blocking copies on CUDA).
        workers: DataLoader worker processes (0: load in this process).
        channels_last: yield ``torch.channels_last`` batches.
        whole_batches: hand each index list to the dataset at once (one read per batch).
        transform: ``(uint8 batch on device, batch number, epoch) -> batch`` before normalising.
    """

    def __init__(
        self,
        dataset: Any,
        batches: Any,
        *,
        device: torch.device | str,
        workers: int = 0,
        channels_last: bool = True,
        whole_batches: bool = False,
        transform: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    ) -> None:
        self.dataset, self.batches, self.device = dataset, batches, torch.device(device)
        self.workers, self.channels_last = int(workers), bool(channels_last)
        self.whole_batches, self.transform = whole_batches, transform
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def _loader(self) -> torch.utils.data.DataLoader:
        kw: dict[str, Any] = {"num_workers": self.workers, "pin_memory": self.device.type == "cuda"}
        if self.workers:
            kw["prefetch_factor"] = 4
        if self.whole_batches:
            return torch.utils.data.DataLoader(
                self.dataset, sampler=self.batches, batch_size=None, **kw
            )
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=self.batches, **kw)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)
        return self._iterate(epoch)

    def _iterate(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self._loader())
        try:
            for i, (x, y) in enumerate(batches):
                x = x.to(self.device, non_blocking=True)
                y = torch.as_tensor(y).to(self.device, torch.int64, non_blocking=True)
                if self.transform is not None:
                    x = self.transform(x, i, epoch)
                x = x.float().div_(255.0).sub_(self._mean).div_(self._std)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y
        finally:  # stop the workers now, also after an error or an early break
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def device_loader_options(spec: LoaderSpec) -> dict[str, Any]:
    """The :class:`DeviceLoader` options that come from ``spec``."""
    return {"device": spec.device, "workers": spec.workers, "channels_last": spec.channels_last}


@dataclass
class ImageFolderData:
    """An opened image folder: what the trainer needs (``input_shape``, ``num_classes``...)
    and ``loaders(...)`` for one rank."""

    index: FolderIndex
    image_size: int = 224
    resize_size: int | None = None
    name: str = "imagefolder"

    @property
    def classes(self) -> tuple[str, ...]:
        """Class folder names, in label order."""
        return self.index.classes

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.index.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, image_size, image_size)``."""
        return (3, self.image_size, self.image_size)

    def loaders(self, spec: LoaderSpec) -> tuple[DeviceLoader, DeviceLoader]:
        """Training loader (rank-sharded global batches) and test loader (this rank's part)."""
        common = device_loader_options(spec)
        idx, size, resize = self.index, self.image_size, self.resize_size
        train_ds = ImageFolderDataset(idx.train, size, True, spec.augment is not False, resize)
        val_ds = ImageFolderDataset(idx.val, size, False, False, resize)
        sampler = GlobalBatchSampler(len(idx.train), spec.batch_size, spec.rank, spec.world,
                                     spec.seed, True)  # fmt: skip
        test = eval_batches(len(idx.val), spec.eval_batch_size, spec.rank, spec.world)
        return DeviceLoader(train_ds, sampler, **common), DeviceLoader(val_ds, test, **common)


def open_imagefolder(
    root: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    resize_size: int | None = None,
) -> ImageFolderData:
    """Scan ``root`` (see :func:`scan_imagefolder`); crops of ``image_size`` (default 224)."""
    if image_size and resize_size and resize_size < image_size:
        raise DataError(f"data.resize_size={resize_size} < data.image_size={image_size}")
    return ImageFolderData(scan_imagefolder(root), int(image_size or 224), resize_size)
