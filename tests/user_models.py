"""A user's own network and dataset, outside the package: configs name them by ``_target_``
(tests/test_config_errors.py builds and trains them through the real stages)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset


class TinyNet(nn.Module):
    """flatten, Linear(hidden), ReLU, Linear(num_classes): traceable by the bound layer."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FixedNet(nn.Module):
    """Takes neither num_classes nor input_shape: always 5 logits from 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyDataset(Dataset):
    """Three classes of 1x8x8 images (a bright row per class plus noise), torchvision's calling
    convention: ``TinyDataset(root, train=..., transform=..., download=..., size=...)``."""

    classes = ["top", "middle", "bottom"]

    def __init__(self, root: str, train: bool = True, transform: Optional[Callable] = None,
                 download: bool = False, size: int = 60) -> None:
        g = torch.Generator().manual_seed(0 if train else 1)
        self.targets = torch.arange(size) % 3
        x = 0.2 * torch.rand(size, 1, 8, 8, generator=g)
        for i, t in enumerate(self.targets.tolist()):
            x[i, 0, 1 + 3 * t] += 0.7
        self.data, self.transform = x.clamp(0, 1), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img = self.data[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])
