"""CIFAR-10 through torchvision's own reader (python pickle batches).

torchvision checks the md5 of every batch file; we only require the files to exist (their
content is validated by unpickling), so hand-made or re-packed copies in the exact format load
through the same code path. Downloads still verify the archive checksum.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torchvision.datasets as tvd

from ace_lightning.data.download import download_into
from ace_lightning.data import transforms as T
from ace_lightning.data.errors import DatasetNotFoundError
from ace_lightning.data.info import register_dataset
from ace_lightning.data.transforms import to_float_tensor

HOW_TO_GET = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there "
    "(it creates cifar-10-batches-py/), or rerun with download=true and network access"
)


@register_dataset("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                  train_transform=T.cifar_train, augmentation="random crop 32 (padding 4) + horizontal flip")
class CIFAR10(tvd.CIFAR10):
    """CIFAR-10 (50000 train / 10000 test, 3x32x32, 10 classes); yields float tensors in [0, 1]."""

    def __init__(
        self,
        root: str,
        train: bool = True,
        transform: Optional[Callable] = None,
        download: bool = False,
    ) -> None:
        # Class attributes shadowed per instance: presence check only (md5=None).
        self.train_list = [[name, None] for name, _ in tvd.CIFAR10.train_list]
        self.test_list = [[name, None] for name, _ in tvd.CIFAR10.test_list]
        self.meta = {**tvd.CIFAR10.meta, "md5": None}
        root = os.path.expanduser(str(root))
        folder = os.path.join(root, self.base_folder)
        reason = "download=False"
        if download:
            def fetch(tmp: str) -> list[str]:  # into a temporary folder: a failed download leaves no root behind
                self.root = tmp
                self.download()
                return [self.base_folder]

            try:
                download_into(root, fetch)
            except Exception as exc:  # no network / HTTP error / bad archive
                reason = f"download failed ({type(exc).__name__}: {exc})"
            download = False
        missing = [n for n, _ in self.train_list + self.test_list + [[self.meta["filename"], None]]
                   if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise DatasetNotFoundError(
                f"CIFAR-10 not found: {folder} lacks {', '.join(missing)} and {reason}; {HOW_TO_GET}"
            )
        try:
            super().__init__(root, train=train, transform=transform, download=False)
        except Exception as exc:  # pickle errors, wrong array sizes
            raise DatasetNotFoundError(
                f"CIFAR-10 files in {folder} are not in the CIFAR-10 python format "
                f"({type(exc).__name__}: {exc}); {HOW_TO_GET}"
            ) from exc
        if len(self.targets) != len(self.data):
            raise DatasetNotFoundError(f"CIFAR-10 in {folder}: {len(self.targets)} labels for {len(self.data)} images")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = super().__getitem__(index)
        return to_float_tensor(img), int(target)
