"""Deterministic, learnable random images for tests and smoke runs."""

from __future__ import annotations

import numpy as np
import torch

from mixq.data.arrays import DatasetArrays

__all__ = ["synthetic_arrays"]


def synthetic_arrays(
    n_train: int,
    n_test: int,
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> DatasetArrays:
    """Random uint8 images whose class is visible in their colour and coarse layout.

    Each class has a random template (a 4x4 grid of random colours, upsampled to ``H x W``);
    an image is ``0.5 * template + 64`` plus Gaussian noise (std 24), clipped to 0..255.
    Labels are balanced (``i % num_classes``) and shuffled. Same arguments, same arrays.

    Args:
        n_train: Number of training images.
        n_test: Number of test images.
        shape: ``(C, H, W)`` of one image.
        num_classes: Number of classes.
        seed: Seed of everything.

    Returns:
        ``DatasetArrays`` named ``"synthetic"``.
    """
    if n_train < 1 or n_test < 0 or num_classes < 2:
        raise ValueError("need n_train >= 1, n_test >= 0 and num_classes >= 2")
    C, H, W = shape
    rng = np.random.default_rng(seed)
    grid = rng.uniform(0, 255, size=(num_classes, C, 4, 4))
    rows, cols = np.arange(H) * 4 // H, np.arange(W) * 4 // W
    templates = grid[:, :, rows][:, :, :, cols]
    n = n_train + n_test
    labels = rng.permutation(np.arange(n) % num_classes)
    noise = rng.normal(0.0, 24.0, size=(n, C, H, W))
    x = np.clip(np.rint(0.5 * templates[labels] + 64 + noise), 0, 255).astype(np.uint8)
    y = labels.astype(np.int64)
    return DatasetArrays(
        x_train=torch.from_numpy(x[:n_train]),
        y_train=torch.from_numpy(y[:n_train]),
        x_test=torch.from_numpy(x[n_train:]),
        y_test=torch.from_numpy(y[n_train:]),
        num_classes=num_classes,
        input_shape=(C, H, W),
        name="synthetic",
    )
