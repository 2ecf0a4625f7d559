"""Small hand-written models with the features real networks have (tests/test_sites.py)."""

import torch
import torch.nn.functional as F
from torch import nn


class Functional(nn.Module):
    """conv -> F.relu -> conv -> F.silu -> x.view(x.size(0), -1) -> linear -> F.gelu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.silu(self.conv2(x))
        x = F.gelu(self.fc1(x.view(x.size(0), -1)))
        return self.fc2(x)


class SE(nn.Module):
    """padding="same" conv, hard-swish, squeeze-excitation with an nn.Sigmoid gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding="same")
        self.act = nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.gate = nn.Sigmoid()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.act(self.conv(x))
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        x = x * s
        return self.head(x.mean((2, 3)))


class Residual(nn.Module):
    """torchvision-style basic block: one nn.ReLU called twice, an in-place residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Branches(nn.Module):
    """chunk into two halves, a conv branch on one, torch.cat, split, two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 6, 1)
        self.head_a = nn.Linear(3 * 16, 2)
        self.head_b = nn.Linear(3 * 16, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, torch.tanh(self.branch(b))], dim=1)
        p, q = torch.split(self.mix(x), 3, dim=1)
        return self.head_a(p.flatten(1)) + self.head_b(q.flatten(1))


class MLPBlock(nn.Module):
    """Transformer MLP block on tokens: x + fc2(gelu(fc1(LayerNorm(x)))), then a head."""

    def __init__(self, d: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


class TwoBranch(nn.Module):
    """A stem feeding two branches of different sizes, concatenated into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv_a = nn.Conv2d(2, 3, 3, padding=1)
        self.relu_a = nn.ReLU()
        self.conv_b = nn.Conv2d(2, 5, 3, stride=2, padding=1)
        self.relu_b = nn.ReLU()
        self.fc = nn.Linear(3 * 16 + 5 * 4, 2)

    def forward(self, x):
        s = self.relu0(self.stem(x))
        a = self.relu_a(self.conv_a(s))
        b = self.relu_b(self.conv_b(s))
        return self.fc(torch.cat([a.flatten(1), b.flatten(1)], 1))


#: model class -> per-sample input shape of the dry forward
SHAPES = {Functional: (3, 8, 8), SE: (3, 6, 6), Residual: (4, 5, 5), Branches: (3, 4, 4),
          MLPBlock: (5, 8), TwoBranch: (1, 4, 4)}  # fmt: skip
