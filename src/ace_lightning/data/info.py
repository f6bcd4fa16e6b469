"""The static facts of a dataset (DatasetInfo) and the one registry of datasets.

A dataset class registers itself where it is defined, with its facts::

    @register_dataset("cifar10", (3, 32, 32), 10, mean, std, train_transform=T.cifar_train)
    class CIFAR10(...): ...

Everything downstream (nets, stages, configs) asks the registry (``get_dataset_info``, data/registry.py)
instead of hard-coding shapes, so adding a dataset is its class here plus one conf/data/<name>.yaml.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from torch.utils.data import Dataset

from ace_lightning.data import transforms as T
from ace_lightning.registries import Registry


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
    # facts of a configured instance read from its knobs and files (image_folder: the shape from
    # image_size/channels, the classes from data_dir/train/): facts(data_dir, dataset_kwargs) -> changes
    facts: Optional[Callable[[str, Mapping[str, Any]], dict]] = None
    # own_val(data_dir): the files hold a val split of their own (built with split="val"); the
    # datamodule then uses it instead of carving val_size images from train
    own_val: Optional[Callable[[str], bool]] = None

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

    def configured(self, data_dir: str, dataset_kwargs: Mapping[str, Any]) -> "DatasetInfo":
        """Info for a configured instance on ``data_dir``: ``specialise``, then ``facts``."""
        info = self.specialise(**dataset_kwargs)
        if self.facts is not None:
            info = dataclasses.replace(info, **self.facts(data_dir, dict(dataset_kwargs)))
        return info


DATASETS: Registry = Registry("dataset")  # name -> DatasetInfo


def register_dataset(name: str, input_shape: Sequence[int], num_classes: int, mean: Sequence[float],
                     std: Sequence[float], **more: Any) -> Callable[[type], type]:
    """Class decorator: register the dataset class under ``name`` with its facts (``more``: the
    other DatasetInfo fields: transforms, augmentation, overridable, facts, own_val)."""

    def add(cls: type) -> type:
        DATASETS.add(name, DatasetInfo(name, tuple(input_shape), num_classes, tuple(mean), tuple(std), cls, **more))
        return cls

    return add
