"""A tiny CNN for 8x8 grayscale digits (scikit-learn's ``load_digits``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SmallCNN", "smallcnn"]


class SmallCNN(nn.Module):
    """Three ``conv3x3-BN-ReLU`` layers, global average pooling and a linear classifier.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input channels.
        width: Channels of the first convolution (the others use ``2 * width``).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.default_input_shape: tuple[int, int, int] = (in_channels, 8, 8)
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.relu3 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def smallcnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> SmallCNN:
    """Tiny CNN for 8x8 digit images.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input channels.
        width: Base channel width.

    Returns:
        The freshly initialised network.
    """
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)
