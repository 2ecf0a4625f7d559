"""The one dataset registry: name -> opener; every dataset follows :mod:`mixq.data.protocol`.

In-memory datasets (:class:`DatasetArrays`: ``cifar10``, ``digits``, ``synthetic``) and the
streaming ones read from a folder while training (``imagefolder``, ``imagenet_shards``, too
large for memory; :data:`STREAMING_DATASETS`) are opened the same way, by
:func:`get_dataset`."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixq.data.arrays import DatasetArrays
from mixq.data.cifar10 import find_cifar10_dir, load_cifar10
from mixq.data.digits import load_digits_arrays
from mixq.data.download import download_cifar10
from mixq.data.errors import DataError
from mixq.data.imagefolder import open_imagefolder
from mixq.data.paths import resolve_data_dir
from mixq.data.protocol import Dataset
from mixq.data.shards import open_shards
from mixq.data.synthetic import synthetic_arrays

__all__ = ["DATASETS", "STREAMING_DATASETS", "DatasetLoader", "get_dataset"]

DatasetLoader = Callable[..., Dataset]


def _cifar10(
    data_dir: Path | None,
    *,
    download: bool = False,
    verify_md5: bool | None = None,
    expected_sizes: tuple[int, int] | None = (50000, 10000),
) -> DatasetArrays:
    """CIFAR-10 from ``data_dir`` (else ``$MIXQ_DATA``); ``download=True`` fetches it if absent."""
    root = resolve_data_dir(data_dir, None)
    if download:
        try:
            find_cifar10_dir(root)
        except DataError:
            download_cifar10(root)
    return load_cifar10(root, verify_md5=verify_md5, expected_sizes=expected_sizes)


def _digits(data_dir: Path | None, **kwargs: Any) -> DatasetArrays:
    """scikit-learn digits; ``data_dir`` is ignored (the data ships with scikit-learn)."""
    del data_dir
    return load_digits_arrays(**kwargs)


def _synthetic(
    data_dir: Path | None,
    *,
    n_train: int = 1024,
    n_test: int = 256,
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> DatasetArrays:
    """Synthetic images; ``data_dir`` is ignored."""
    del data_dir
    return synthetic_arrays(n_train, n_test, tuple(shape), num_classes, seed)


def _imagefolder(
    data_dir: Path | None, *, image_size: int | None = None, resize_size: int | None = None
) -> Dataset:
    """An ImageNet-style folder (``train/<class>/*``, ``val/<class>/*``), streamed."""
    root = resolve_data_dir(data_dir, None)
    return open_imagefolder(root, image_size=image_size, resize_size=resize_size)


def _imagenet_shards(data_dir: Path | None, *, image_size: int | None = None) -> Dataset:
    """Shards written by ``mixq prepare-imagenet`` (their resize was fixed then), streamed."""
    return open_shards(resolve_data_dir(data_dir, None), image_size=image_size)


#: Dataset name -> opener ``(data_dir, **options) -> Dataset``.
DATASETS: dict[str, DatasetLoader] = {
    "cifar10": _cifar10,
    "digits": _digits,
    "synthetic": _synthetic,
    "imagefolder": _imagefolder,
    "imagenet_shards": _imagenet_shards,
}

#: The datasets read from disk while training (no in-memory crop/flip options).
STREAMING_DATASETS = frozenset({"imagefolder", "imagenet_shards"})


def get_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> Dataset:
    """Open a dataset by name: the one entry point of :mod:`mixq.data`.

    Args:
        name: One of ``DATASETS`` (case-insensitive).
        data_dir: Data directory (``cifar10`` and the streaming datasets; falls back to
            ``$MIXQ_DATA``; the others ignore it).
        **kwargs: Passed to the opener (e.g. ``download=True``, ``verify_md5=False`` for
            CIFAR-10; ``n_train=`` for synthetic; ``image_size=`` for the streaming ones).

    Returns:
        The dataset: :class:`DatasetArrays`, or a streaming dataset with the same protocol.

    Raises:
        ValueError: For an unknown name (lists the valid ones and a close match).
        DataError: If the data is missing or malformed.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        valid = ", ".join(sorted(DATASETS))
        close = difflib.get_close_matches(key, DATASETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown dataset '{name}' (valid: {valid}){hint}")
    return DATASETS[key](None if data_dir is None else Path(data_dir), **kwargs)
