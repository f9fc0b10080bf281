"""The MNIST CNN of the original series, a BatchNorm variant, and whole-model quantization.

``Net``: Conv2d(1,40,3,1) -> ReLU -> MaxPool2d(2,2) -> Conv2d(40,40,3,1,groups=20) -> ReLU ->
MaxPool2d(2,2) -> flatten -> Linear(5*5*40, 10). ``NetBN`` adds BatchNorm2d after each conv.
Taught in notebook ``b_model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The original's CNN: 11,170 parameters, (N, 1, 28, 28) -> (N, 10) logits."""

    def __init__(self, num_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(num_channels, 40, 3, 1)
        self.conv2 = nn.Conv2d(40, 40, 3, 1, groups=20)
        self.fc = nn.Linear(5 * 5 * 40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        return self.fc(torch.flatten(x, 1))


class NetBN(nn.Module):
    """``Net`` with BatchNorm2d after each conv (to be folded into the conv when quantized)."""

    def __init__(self, num_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(num_channels, 40, 3, 1)
        self.bn1 = nn.BatchNorm2d(40)
        self.conv2 = nn.Conv2d(40, 40, 3, 1, groups=20)
        self.bn2 = nn.BatchNorm2d(40)
        self.fc = nn.Linear(5 * 5 * 40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2, 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2, 2)
        return self.fc(torch.flatten(x, 1))


MODELS = {"net": Net, "netbn": NetBN}
