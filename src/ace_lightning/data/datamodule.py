"""ACEDataModule: one LightningDataModule for every registered dataset.

Besides the usual train/val/test loaders it offers ``train_eval_dataloader()``: the *un-augmented*
training images in a fixed order, with exactly the training indices. The gate stage labels
these images (cert-net certified correct or not); the reference implementation labelled
augmented images by mistake (docs/METHOD.md section 6).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import numbers
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ace_lightning.data.registry import DatasetInfo, get_dataset_info, target_dataset_info
from ace_lightning.errors import ConfigError, did_you_mean


def _seeded_perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class ACEDataModule(L.LightningDataModule):
    """Splits: ``val_size`` images carved from the training set with ``seed``; ``subset`` caps
    train, val and test at that many images (a seeded random choice, so class-sorted folder
    datasets still give every class) for quick runs. The val split is the same images whatever
    ``subset`` is, and never overlaps train; a dataset whose files hold a val split of their own
    (image_folder with a val/ folder) uses that instead.

    ``_target_``: a user's dataset class instead of a registered ``name`` (called like the
    registered ones: ``cls(data_dir, train=..., transform=..., download=..., **dataset_kwargs)``,
    yielding (image, label)); ``input_shape`` / ``num_classes`` say its shape and classes (null:
    read from its first image and its ``classes``). ``mean`` / ``std``: the nets' per-channel
    normalisation instead of the dataset's (null: the registry's; 0.5 / 0.25 for a folder or a
    ``_target_`` dataset)."""

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
        _target_: Optional[str] = None,
        input_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if _target_:
            self.base_info = target_dataset_info(name, _target_, input_shape, num_classes)
        else:
            if input_shape is not None or num_classes is not None:
                raise ConfigError(f"data.input_shape / data.num_classes describe a _target_ dataset; dataset "
                                  f"'{name}' has its own (synthetic: data.dataset_kwargs.input_shape)")
            self.base_info = get_dataset_info(name)
        for what, value in (("batch_size", batch_size), ("val_size", val_size), ("subset", subset)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ConfigError(f"data.{what} must be a whole number, got {value!r}")
        if val_size < 0 or (subset is not None and subset <= 0):
            raise ConfigError(f"val_size must be >= 0 and subset > 0, got val_size={val_size}, subset={subset}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        self.check_dataset_kwargs(dict(dataset_kwargs or {}))
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self._info: Optional[DatasetInfo] = None
        self.name, self.data_dir = name, str(data_dir) if data_dir is not None else f"data/{name}"
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.download = num_workers, download
        self.val_size, self.subset, self.seed = int(val_size), subset, int(seed)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.save_hyperparameters()
        self._ready = False

    def check_dataset_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        """``dataset_kwargs`` are keyword arguments of the dataset class (unless it takes **kwargs)."""
        cls = getattr(self.base_info.dataset_cls, "cls", self.base_info.dataset_cls)  # a _target_'s class
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):  # no signature to check against
            return
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return
        known = [k for k in params if k not in ("self", "root", "train", "transform", "download")]
        for key in kwargs:
            if key not in known:
                raise ConfigError(f"unknown knob 'dataset_kwargs.{key}' for dataset '{self.base_info.name}'"
                                  f"{did_you_mean(key, known, 'dataset_kwargs.')}")

    @property
    def info(self) -> DatasetInfo:
        """Shape, classes and mean/std of this (possibly specialised) dataset."""
        if self._info is None:
            info = self.base_info.configured(self.data_dir, self.dataset_kwargs)
            changes = {k: v for k, v in (("mean", self.mean), ("std", self.std)) if v is not None}
            for k, v in changes.items():
                if len(v) != info.input_shape[0]:
                    raise ConfigError(f"data.{k} needs one value per channel ({info.input_shape[0]}), got {list(v)}")
            if self.std is not None and min(self.std) <= 0:
                raise ConfigError(f"data.std must be positive, got {list(self.std)}")
            self._info = dataclasses.replace(info, **changes) if changes else info
        return self._info

    def _build(self, train: bool, download: bool, **extra: Any) -> Dataset:
        return self.base_info.build(self.data_dir, train=train, augment=False, download=download,
                                    **self.dataset_kwargs, **extra)

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
        own_val = self.base_info.own_val is not None and self.base_info.own_val(self.data_dir)
        val = self._build(False, self.download, split="val") if own_val else train_plain
        train_aug = copy.copy(train_plain)  # shares the data, differs only in the transform
        train_aug.transform = self.base_info.train_transform()
        n = len(train_plain)
        if own_val:  # the files' own val split: all of train trains
            val_idx, train_idx = _seeded_perm(len(val), self.seed + 2), _seeded_perm(n, self.seed)
        else:
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
        self.val_set = Subset(val, self.val_indices)
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


def check_data_config(data: Any) -> ACEDataModule:
    """A data config (conf/data/<name>.yaml with its overrides) checked before any run starts: its
    keys are ACEDataModule's arguments (a typo is named with the closest one), its dataset is
    registered (or its ``_target_`` imports), its split sizes and ``dataset_kwargs`` are valid.
    Reads no file. Returns the (unprepared) datamodule."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"data must be a data config (conf/data/<name>.yaml), got {data!r}")
    known = [k for k in inspect.signature(ACEDataModule).parameters]
    name = data.get("name", data.get("_target_"))
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown knob '{key}' for data '{name}'{did_you_mean(str(key), known)}")
    return ACEDataModule(**dict(data))
