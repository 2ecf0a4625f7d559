"""scikit-learn's bundled 8x8 handwritten digits (no download needed)."""

from __future__ import annotations

import numpy as np
import torch

from mixq.data.arrays import DatasetArrays

__all__ = ["DIGITS_TEST_SIZE", "load_digits_arrays", "stratified_split"]

#: Test images in the fixed split (1797 images: 1437 train / 360 test).
DIGITS_TEST_SIZE = 360


def stratified_split(
    labels: np.ndarray, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split keeping class proportions (largest-remainder rounding).

    Args:
        labels: Integer labels ``[N]``.
        test_size: Exact number of test indices.
        seed: Seed of the shuffle inside each class.

    Returns:
        ``(train_idx, test_idx)``, each sorted.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * test_size / len(labels)
    n_test = np.floor(quota).astype(int)
    leftover = test_size - int(n_test.sum())
    n_test[np.argsort(-(quota - n_test), kind="stable")[:leftover]] += 1
    test = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, n_test, strict=True)
    ]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def load_digits_arrays(*, seed: int = 0, test_size: int = DIGITS_TEST_SIZE) -> DatasetArrays:
    """Load the 8x8 digits as uint8 ``[N, 1, 8, 8]`` images with a fixed stratified split.

    Pixel values 0..16 are scaled to 0..255. Use with ``TensorLoader(..., augment=False)``
    (or ``crop_pad=0``): the 4-pixel padded crop is meant for 32x32 images.

    Args:
        seed: Seed of the split (the default gives the documented 1437/360 split).
        test_size: Number of test images.

    Returns:
        ``DatasetArrays`` named ``"digits"`` with 10 classes.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the 'digits' dataset needs scikit-learn: pip install 'mixq[digits]'"
        ) from exc
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    x = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, test_size, seed)
    return DatasetArrays(
        x_train=torch.from_numpy(x[train_idx]),
        y_train=torch.from_numpy(y[train_idx]),
        x_test=torch.from_numpy(x[test_idx]),
        y_test=torch.from_numpy(y[test_idx]),
        num_classes=10,
        input_shape=(1, 8, 8),
        name="digits",
        classes=tuple(str(c) for c in range(10)),
    )
