"""CIFAR-10 ResNets (He et al., 2016) as used by Uhlich et al. (ICLR 2020).

The network is ``conv3x3(3->16) -> BN -> ReLU``, three stages of ``n`` basic blocks with
widths 16/32/64 and strides 1/2/2, global average pooling and a linear classifier, where
``depth = 6n + 2``. Shortcuts use the parameter-free "option A": spatial subsampling and
zero-padding of the channels.

Every ReLU is a distinct :class:`torch.nn.ReLU` module so that a model-surgery pass can
replace each of them with its own activation quantizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlockA",
    "CifarResNet",
    "ShortcutA",
    "resnet20",
    "resnet32",
    "resnet56",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut.

    Subsamples spatially by ``stride`` (``x[:, :, ::s, ::s]``) and zero-pads the channel
    dimension equally on both sides from ``in_planes`` to ``out_planes``.

    Args:
        in_planes: Number of input channels.
        out_planes: Number of output channels (``>= in_planes``).
        stride: Spatial subsampling factor.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"out_planes ({out_planes}) must be >= in_planes ({in_planes})")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_front or self.pad_back:
            x = F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back), "constant", 0.0)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class BasicBlockA(nn.Module):
    """Basic residual block ``conv-BN-ReLU-conv-BN (+ shortcut) -> ReLU``.

    Args:
        in_planes: Number of input channels.
        planes: Number of output channels.
        stride: Stride of the first convolution.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``depth = 6n + 2`` layers.

    Args:
        depth: Network depth (20, 32, 44, 56, 110, ...); must satisfy ``(depth - 2) % 6 == 0``.
        num_classes: Number of output classes.
        zero_init_residual: initialise the last batch-norm scale (``bn2.weight``) of every
            residual block to 0, so that each block starts as its shortcut (Goyal et al.,
            2017). Off by default: the paper's networks use the standard initialisation.
    """

    default_input_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self, depth: int = 20, num_classes: int = 10, zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.in_planes = 16
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlockA):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlockA(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, zero_init_residual: bool = False) -> CifarResNet:
    """ResNet-20 for CIFAR (268,346 conv + FC parameters for 10 classes).

    Args:
        num_classes: Number of output classes.
        zero_init_residual: see :class:`CifarResNet`.

    Returns:
        The freshly initialised network.
    """
    return CifarResNet(20, num_classes, zero_init_residual)


def resnet32(num_classes: int = 10, zero_init_residual: bool = False) -> CifarResNet:
    """ResNet-32 for CIFAR.

    Args:
        num_classes: Number of output classes.
        zero_init_residual: see :class:`CifarResNet`.

    Returns:
        The freshly initialised network.
    """
    return CifarResNet(32, num_classes, zero_init_residual)


def resnet56(num_classes: int = 10, zero_init_residual: bool = False) -> CifarResNet:
    """ResNet-56 for CIFAR.

    Args:
        num_classes: Number of output classes.
        zero_init_residual: see :class:`CifarResNet`.

    Returns:
        The freshly initialised network.
    """
    return CifarResNet(56, num_classes, zero_init_residual)
