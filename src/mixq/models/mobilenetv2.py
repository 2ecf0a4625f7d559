"""MobileNetV2 (Sandler et al., 2018) with torchvision's architecture and key names.

The module structure mirrors ``torchvision.models.mobilenet_v2`` so that a torchvision
state dict loads with ``strict=True``; every ReLU6 is a distinct :class:`torch.nn.ReLU6`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "_make_divisible", "mobilenet_v2"]

# t (expansion), c (output channels), n (repeats), s (first stride)
_INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without dropping more than 10%.

    Identical to torchvision's helper (from the original TensorFlow implementation).

    Args:
        v: Value to round.
        divisor: The result is a multiple of this.
        min_value: Lower bound of the result (defaults to ``divisor``).

    Returns:
        The rounded channel count.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU6`` (torchvision ``Conv2dNormActivation``).

    Args:
        in_planes: Number of input channels.
        out_planes: Number of output channels.
        kernel_size: Square kernel size; padding is ``(kernel_size - 1) // 2``.
        stride: Convolution stride.
        groups: Convolution groups (``in_planes`` for a depthwise convolution).
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    """Inverted residual block with linear bottleneck.

    Args:
        inp: Number of input channels.
        oup: Number of output channels.
        stride: Stride of the depthwise convolution (1 or 2).
        expand_ratio: Expansion factor of the hidden layer.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone and classifier (torchvision layout).

    Args:
        num_classes: Number of output classes.
        width_mult: Channel multiplier.
        round_nearest: Round every layer's channel count to a multiple of this.
        dropout: Dropout probability before the classifier.
    """

    default_input_shape: tuple[int, int, int] = (3, 224, 224)

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(
                    InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t)
                )
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (3,470,760 conv + FC parameters for 1000 classes, ``width_mult=1``).

    Args:
        num_classes: Number of output classes.
        width_mult: Channel multiplier.

    Returns:
        The freshly initialised network.
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)
