"""Name -> loader registry: every loader returns :class:`DatasetArrays`."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixq.data.arrays import DatasetArrays
from mixq.data.cifar10 import find_cifar10_dir, load_cifar10
from mixq.data.digits import load_digits_arrays
from mixq.data.errors import DataError
from mixq.data.paths import resolve_data_dir
from mixq.data.synthetic import synthetic_arrays

__all__ = ["DATASETS", "DatasetLoader", "get_dataset"]

DatasetLoader = Callable[..., DatasetArrays]


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
            from mixq.data.download import download_cifar10

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


#: Dataset name -> loader ``(data_dir, **kwargs) -> DatasetArrays``.
DATASETS: dict[str, DatasetLoader] = {
    "cifar10": _cifar10,
    "digits": _digits,
    "synthetic": _synthetic,
}


def get_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> DatasetArrays:
    """Load a dataset by name.

    Args:
        name: One of ``DATASETS`` (case-insensitive).
        data_dir: Data directory (only ``cifar10`` uses it; falls back to ``$MIXQ_DATA``).
        **kwargs: Passed to the loader (e.g. ``download=True``, ``verify_md5=False`` for
            CIFAR-10; ``n_train=`` for synthetic).

    Returns:
        The dataset as ``DatasetArrays``.

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
