"""One registry of datasets: name -> loader, input shape, classes, mean/std, augmentation.

Everything downstream (nets, stages, configs) asks the registry instead of hard-coding shapes, so
adding a dataset is one entry here plus one conf/data/<name>.yaml.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from torch.utils.data import Dataset

from ace_lightning.data import transforms as T
from ace_lightning.data.cifar import CIFAR10
from ace_lightning.data.mnist import MNIST, FashionMNIST
from ace_lightning.data.synthetic import SyntheticDataset
from ace_lightning.data.tinyimagenet import ImageNet200, TinyImageNet
from ace_lightning.errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; ``build`` makes the torch Dataset for one split."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W) the nets see (after crops)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset_cls: Callable[..., Dataset]
    train_transform: Callable[[], Callable] = T.no_augmentation
    eval_transform: Callable[[], Callable] = T.no_augmentation
    augmentation: str = "none"
    # dataset_kwargs that change the static facts (synthetic: any shape/classes)
    overridable: tuple[str, ...] = field(default=())

    def build(self, data_dir: str, train: bool, augment: bool = False, download: bool = False, **kwargs: Any) -> Dataset:
        """The split's Dataset; ``augment`` selects the training augmentation (train split only)."""
        tf = self.train_transform() if (train and augment) else self.eval_transform()
        return self.dataset_cls(data_dir, train=train, transform=tf, download=download, **kwargs)

    def specialise(self, **dataset_kwargs: Any) -> "DatasetInfo":
        """Info for a configured instance (only fields in ``overridable`` may change)."""
        changes = {k: dataset_kwargs[k] for k in self.overridable if dataset_kwargs.get(k) is not None}
        if "input_shape" in changes:
            changes["input_shape"] = tuple(int(v) for v in changes["input_shape"])
            c = changes["input_shape"][0]
            if len(self.mean) != c:
                changes["mean"], changes["std"] = (self.mean[0],) * c, (self.std[0],) * c
        if "num_classes" in changes:
            changes["num_classes"] = int(changes["num_classes"])
        return dataclasses.replace(self, **changes) if changes else self


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10,
        (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
        CIFAR10, T.cifar_train, T.no_augmentation, "random crop 32 (padding 4) + horizontal flip",
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), FashionMNIST,
    ),
    "mnist": DatasetInfo(
        "mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), MNIST,
    ),
    "tinyimagenet": DatasetInfo(
        "tinyimagenet", (3, 56, 56), 200,
        (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
        TinyImageNet, T.tinyimagenet_train, T.tinyimagenet_eval,
        "random crop 56 + horizontal flip (train), centre crop 56 (eval)",
    ),
    "imagenet200": DatasetInfo(
        "imagenet200", (3, 224, 224), 200,
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
        ImageNet200, T.imagenet_train, T.imagenet_eval,
        "random resized crop 224 + horizontal flip (train), resize 256 + centre crop 224 (eval)",
    ),
    "synthetic": DatasetInfo(
        "synthetic", (3, 32, 32), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), SyntheticDataset,
        overridable=("input_shape", "num_classes"),
    ),
}


def get_dataset_info(name: str) -> DatasetInfo:
    """Registry lookup with a one-line error listing the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset '{name}'; known: {', '.join(sorted(DATASETS))}") from None
