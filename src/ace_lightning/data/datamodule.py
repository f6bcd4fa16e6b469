"""ACEDataModule: one LightningDataModule for every registered dataset.

Besides the usual train/val/test loaders it offers ``train_eval_dataloader()``: the *un-augmented*
training images in a fixed order, with exactly the training indices. The gate stage labels
these images (cert-net certified correct or not); the reference implementation labelled
augmented images by mistake (docs/METHOD.md section 6).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ace_lightning.data.registry import DatasetInfo, get_dataset_info
from ace_lightning.errors import ConfigError


def _seeded_perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class ACEDataModule(L.LightningDataModule):
    """Splits: ``val_size`` images carved from the training set with ``seed``; ``subset`` caps
    train, val and test at that many images (a seeded random choice, so class-sorted folder
    datasets still give every class) for quick runs. The val split is the same images whatever
    ``subset`` is, and never overlaps train."""

    def __init__(
        self,
        name: str = "cifar10",
        data_dir: Optional[str] = None,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        download: bool = True,
        val_size: int = 0,
        subset: Optional[int] = None,
        seed: int = 0,
        pin_memory: Optional[bool] = None,
        dataset_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.base_info = get_dataset_info(name)
        if val_size < 0 or (subset is not None and subset <= 0):
            raise ConfigError(f"val_size must be >= 0 and subset > 0, got val_size={val_size}, subset={subset}")
        self.name, self.data_dir = name, str(data_dir) if data_dir is not None else f"data/{name}"
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.download = num_workers, download
        self.val_size, self.subset, self.seed = int(val_size), subset, int(seed)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.save_hyperparameters()
        self._ready = False

    @property
    def info(self) -> DatasetInfo:
        """Shape, classes and mean/std of this (possibly specialised) dataset."""
        return self.base_info.specialise(**self.dataset_kwargs)

    def _build(self, train: bool, download: bool) -> Dataset:
        return self.base_info.build(self.data_dir, train=train, augment=False, download=download, **self.dataset_kwargs)

    def prepare_data(self) -> None:
        """Runs on one process only: fetch the files if allowed (no state is kept)."""
        if self.download:
            self._build(True, True)
            self._build(False, True)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._ready:
            return
        train_plain = self._build(True, self.download)
        test = self._build(False, self.download)
        train_aug = copy.copy(train_plain)  # shares the data, differs only in the transform
        train_aug.transform = self.base_info.train_transform()
        n = len(train_plain)
        if self.val_size >= n:
            raise ConfigError(f"val_size={self.val_size} leaves no training images ({self.name} has {n})")
        perm = _seeded_perm(n, self.seed)
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size:]
        test_idx = torch.arange(len(test))
        if self.subset is not None:
            train_idx, val_idx = train_idx[: self.subset], val_idx[: self.subset]
            test_idx = _seeded_perm(len(test), self.seed + 1)[: self.subset]
        self.train_indices = sorted(train_idx.tolist())
        self.val_indices = sorted(val_idx.tolist())
        self.test_indices = sorted(test_idx.tolist())
        self.train_set = Subset(train_aug, self.train_indices)
        self.train_eval_set = Subset(train_plain, self.train_indices)
        self.val_set = Subset(train_plain, self.val_indices)
        self.test_set = Subset(test, self.test_indices)
        self._ready = True

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def train_eval_dataloader(self) -> DataLoader:
        """Un-augmented training images, same indices as ``train_dataloader``, fixed order."""
        return self._loader(self.train_eval_set, False, self.eval_batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, False, self.eval_batch_size) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)
