"""The in-memory dataset: the whole dataset as tensors, and its loaders (the protocol of
:mod:`mixq.data.protocol`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.data.loader import RankTensorLoader, TensorLoader
from mixq.data.protocol import LoaderSpec
from mixq.data.sharding import eval_shard

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

    def loaders(self, spec: LoaderSpec) -> tuple[TensorLoader, TensorLoader]:
        """Device-resident training and test loaders for rank ``spec.rank``.

        The training loader drops incomplete (global) batches; under DDP it is a
        :class:`RankTensorLoader` and the test loader covers this rank's
        :func:`~mixq.data.sharding.eval_shard`. Crop and flip apply to images of at least
        16 px: ``spec.augment=True`` on smaller images (the 8x8 digits) is an error (None,
        the default: off there), as is a ``crop_pad`` not smaller than the image.
        """
        common = {"device": spec.device, "channels_last": spec.channels_last, "seed": spec.seed}
        side = min(self.input_shape[-2:])
        if spec.augment and side < 16:  # asked for (True): an error, not silently off
            raise ValueError(
                f"data.augment: the random crop and flip apply to images of at least 16 px; "
                f"{self.name} images are {self.input_shape[-2]}x{self.input_shape[-1]}: set "
                "data.augment=false"
            )
        augment = side >= 16 if spec.augment is None else spec.augment
        if augment and spec.crop_pad >= side:
            raise ValueError(
                f"data.crop_pad={spec.crop_pad} must be smaller than the {side} px images of "
                f"{self.name} (the crop would shift them out of the frame); default 4, 0: no crop"
            )
        args = (self.x_train, self.y_train, spec.batch_size)
        kw = {"train": True, "augment": augment, "drop_last": True, "flip_mode": spec.flip,
              "crop_pad": spec.crop_pad, **common}  # fmt: skip
        if spec.world == 1:
            train: TensorLoader = TensorLoader(*args, **kw)
            xt, yt = self.x_test, self.y_test
        else:
            train = RankTensorLoader(*args, rank=spec.rank, world=spec.world, **kw)
            lo, hi = eval_shard(self.y_test.shape[0], spec.rank, spec.world)
            xt, yt = self.x_test[lo:hi], self.y_test[lo:hi]
        return train, TensorLoader(xt, yt, spec.eval_batch_size, train=False, **common)
