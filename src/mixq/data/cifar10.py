"""Load and check a local CIFAR-10 ``cifar-10-batches-py`` folder.

md5 rule (``verify_md5``):

* ``None`` (default, "auto"): a batch file is checked against the official md5 sum only when
  it *claims to be official*, i.e. its ``batch_label`` is exactly the official string
  (``"training batch k of 5"`` / ``"testing batch 1 of 1"``). Rebuilt or re-encoded copies
  (for example the JPEG-q75 rebuild, labelled ``"... (rebuilt from JPEG q75 copy)"``) load
  without md5 errors; shapes, dtypes, label ranges and counts are checked for every folder.
* ``True``: every batch file must match its official sum (checked before unpickling).
* ``False``: never check sums.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixq.data.arrays import DatasetArrays
from mixq.data.errors import DataError
from mixq.data.paths import DATA_ENV_VAR
from mixq.data.safe_pickle import safe_load_pickle

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_FOLDER",
    "OFFICIAL_MD5",
    "OFFICIAL_TARBALL_MD5",
    "OFFICIAL_URL",
    "TEST_FILE",
    "TRAIN_FILES",
    "CifarArrays",
    "DataError",
    "find_cifar10_dir",
    "load_cifar10",
    "manual_instructions",
]

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
OFFICIAL_LABELS = {
    **{f"data_batch_{i}": f"training batch {i} of 5" for i in range(1, 6)},
    "test_batch": "testing batch 1 of 1",
}
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_PIXELS = 3 * 32 * 32

#: The same dataclass every loader returns; the name documents what ``load_cifar10`` gives.
CifarArrays = DatasetArrays


def manual_instructions(root: str | os.PathLike[str]) -> str:
    """How to put CIFAR-10 in place by hand (used in error messages)."""
    return (
        f"Put the '{CIFAR10_FOLDER}' folder from the official python tarball ({OFFICIAL_URL}, "
        f"md5 {OFFICIAL_TARBALL_MD5}) into {root} (e.g. `tar xzf cifar-10-python.tar.gz -C "
        f"{root}`), or point --data-dir / ${DATA_ENV_VAR} at the folder that contains it, or "
        "pass download=True (--download) to fetch it."
    )


def find_cifar10_dir(root: str | os.PathLike[str]) -> Path:
    """Return the ``cifar-10-batches-py`` folder given it or its parent.

    Raises:
        DataError: If neither ``root/cifar-10-batches-py`` nor ``root`` holds the batches.
    """
    root = Path(root).expanduser()
    if (root / CIFAR10_FOLDER).is_dir():
        return root / CIFAR10_FOLDER
    if root.is_dir() and (root.name == CIFAR10_FOLDER or (root / TRAIN_FILES[0]).exists()):
        return root
    where = "does not exist" if not root.exists() else f"has no '{CIFAR10_FOLDER}' folder"
    raise DataError(f"CIFAR-10 not found: {root} {where}. {manual_instructions(root)}")


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _text(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _read_batch(path: Path, verify_md5: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """Read, md5-check and validate one batch file; return ``(data [N,3072], labels [N])``."""
    fix = f"Re-extract the official tarball ({OFFICIAL_URL}) or pass download=True."
    if not path.is_file():
        raise DataError(f"CIFAR-10 file missing: {path}. The folder is incomplete. {fix}")
    raw = path.read_bytes()
    expected_md5 = OFFICIAL_MD5[path.name]
    if verify_md5 and (digest := _md5(raw)) != expected_md5:
        raise DataError(
            f"md5 mismatch for {path}: got {digest}, official is {expected_md5}. The file "
            f"is corrupt or not the official one. {fix} (verify_md5=False skips this check, "
            "e.g. for a rebuilt copy.)"
        )
    try:
        batch = {_text(k): v for k, v in safe_load_pickle(io.BytesIO(raw)).items()}
    except Exception as exc:  # a damaged pickle can fail in many ways
        raise DataError(
            f"cannot read CIFAR-10 file {path} ({type(exc).__name__}: {exc}); it is truncated "
            f"or corrupt. {fix}"
        ) from exc
    if (
        verify_md5 is None
        and _text(batch.get("batch_label")) == OFFICIAL_LABELS[path.name]
        and (digest := _md5(raw)) != expected_md5
    ):
        raise DataError(
            f"md5 mismatch for {path}: it is labelled as the official "
            f"'{OFFICIAL_LABELS[path.name]}' but its md5 is {digest}, official is "
            f"{expected_md5}; the file is corrupt. {fix} (verify_md5=False skips this check.)"
        )
    return _validate(path, batch)


def _validate(path: Path, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(
                f"CIFAR-10 file {path} has no '{key}' entry (keys: "
                f"{sorted(map(str, batch))}); it is not a CIFAR-10 batch."
            )
    data, labels = batch["data"], batch["labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _PIXELS
    ):
        desc = (
            f"{data.dtype} {list(data.shape)}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(
            f"CIFAR-10 file {path}: 'data' must be a uint8 array [N, {_PIXELS}] "
            f"(10000 per official file), got {desc}. The file is malformed."
        )
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"CIFAR-10 file {path}: 'labels' is not a list of ints") from exc
    if (
        labels.ndim != 1
        or labels.shape[0] != data.shape[0]
        or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer))
    ):
        raise DataError(
            f"CIFAR-10 file {path}: 'labels' must be {data.shape[0]} ints (one per "
            f"image), got {labels.dtype} {list(labels.shape)}. The file is malformed."
        )
    bad = (labels < 0) | (labels > 9)
    if bad.any():
        raise DataError(
            f"CIFAR-10 file {path}: {int(bad.sum())} labels outside 0..9 (e.g. "
            f"{int(labels[bad][0])}). The file is malformed."
        )
    return data, labels.astype(np.int64)


def _stack(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([y for _, y in parts])
    x = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return x, torch.from_numpy(labels)


def load_cifar10(
    root: str | os.PathLike[str],
    *,
    verify_md5: bool | None = None,
    expected_sizes: tuple[int, int] | None = (50000, 10000),
) -> DatasetArrays:
    """Load CIFAR-10 from a local ``cifar-10-batches-py`` folder (or its parent).

    Every file is read with a restricted unpickler and checked: present, readable, ``data``
    uint8 ``[N, 3072]``, one label per image, labels in ``0..9``; the totals must equal
    ``expected_sizes``. See the module docstring for the md5 rule.

    Args:
        root: The ``cifar-10-batches-py`` folder or the folder containing it.
        verify_md5: ``None`` checks md5 only for files labelled as official, ``True`` for
            every file, ``False`` never.
        expected_sizes: Required ``(n_train, n_test)``; ``None`` skips the count check
            (for tests and subsets).

    Returns:
        ``DatasetArrays`` with uint8 NCHW ``x_train [50000,3,32,32]``, int64 ``y_train``,
        ``x_test [10000,3,32,32]``, ``y_test``.

    Raises:
        DataError: With the file at fault and the fix, for any of the problems above.
    """
    folder = find_cifar10_dir(root)
    x_train, y_train = _stack([_read_batch(folder / f, verify_md5) for f in TRAIN_FILES])
    x_test, y_test = _stack([_read_batch(folder / TEST_FILE, verify_md5)])
    if expected_sizes is not None and (len(y_train), len(y_test)) != tuple(expected_sizes):
        raise DataError(
            f"CIFAR-10 in {folder} has {len(y_train)} train / {len(y_test)} test images, "
            f"expected {expected_sizes[0]} / {expected_sizes[1]}; the folder is incomplete or "
            f"not CIFAR-10. {manual_instructions(folder.parent)}"
        )
    return DatasetArrays(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        input_shape=(3, 32, 32),
        name="cifar10",
        classes=_class_names(folder),
    )


def _class_names(folder: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta`` when it is readable, else the standard ones."""
    try:
        names = safe_load_pickle(folder / "batches.meta")
        names = {_text(k): v for k, v in names.items()}["label_names"]
        names = tuple(str(_text(n)) for n in names)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError):
        return CIFAR10_CLASSES
    return names if len(names) == 10 else CIFAR10_CLASSES
