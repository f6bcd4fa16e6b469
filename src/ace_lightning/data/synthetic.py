"""A deterministic, learnable toy dataset of any shape and class count, for fast tests.

Each class has a smooth random prototype image; samples are the prototype plus pixel noise,
clipped to [0, 1] and quantised to 8 bits like real images. Train and test share prototypes and
differ in their noise, so a small net learns it in a few steps.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ace_lightning.data.info import register_dataset
from ace_lightning.data.transforms import to_float_tensor
from ace_lightning.errors import ConfigError


@register_dataset("synthetic", (3, 32, 32), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                  overridable=("input_shape", "num_classes"))
class SyntheticDataset(Dataset):
    """Class-dependent smooth patterns + Gaussian noise; identical for identical arguments."""

    def __init__(
        self,
        root: str = "",
        train: bool = True,
        transform: Optional[Callable] = None,
        download: bool = False,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        train_size: int = 1024,
        test_size: int = 256,
        noise: float = 0.15,
        seed: int = 0,
    ) -> None:
        c, h, w = (int(v) for v in input_shape)
        if num_classes < 2:
            raise ConfigError(f"synthetic: num_classes must be >= 2, got {num_classes}")
        self.train, self.transform = train, transform
        self.classes = [f"class_{i}" for i in range(num_classes)]
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(num_classes, c, 4, 4, generator=g)
        protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        protos = 0.2 + 0.6 * protos  # keep away from the box edges so noise stays visible
        n = train_size if train else test_size
        g_split = torch.Generator().manual_seed(seed * 1000 + (1 if train else 2))
        self.targets = torch.arange(n) % num_classes
        self.targets = self.targets[torch.randperm(n, generator=g_split)]
        x = protos[self.targets] + noise * torch.randn(n, c, h, w, generator=g_split)
        self.data = (x.clamp(0, 1) * 255).round().to(torch.uint8)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.data[index].float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return to_float_tensor(img), int(self.targets[index])
