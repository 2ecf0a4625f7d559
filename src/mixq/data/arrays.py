"""The uniform in-memory form every dataset loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DatasetArrays"]


@dataclass(frozen=True)
class DatasetArrays:
    """A whole dataset as tensors.

    Attributes:
        x_train: uint8 images ``[N_train, C, H, W]`` (values 0..255).
        y_train: int64 labels ``[N_train]`` in ``0..num_classes-1``.
        x_test: uint8 images ``[N_test, C, H, W]``.
        y_test: int64 labels ``[N_test]``.
        num_classes: Number of classes.
        input_shape: ``(C, H, W)`` of one image.
        name: Dataset name (as shown in reports).
        classes: Optional class names, ``num_classes`` long.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"{self.name}: x_{split} must be uint8 [N, *{self.input_shape}], "
                    f"got {x.dtype} {list(x.shape)}"
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name}: y_{split} must be int64 [{x.shape[0]}], "
                    f"got {y.dtype} {list(y.shape)}"
                )
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes"
            )
