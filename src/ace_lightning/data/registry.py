"""One registry of datasets: name -> loader, input shape, classes, mean/std, augmentation.

Everything downstream (nets, stages, configs) asks the registry instead of hard-coding shapes, so
adding a dataset is one entry here plus one conf/data/<name>.yaml.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch.utils.data import Dataset

from ace_lightning.data import transforms as T
from ace_lightning.data.cifar import CIFAR10
from ace_lightning.data.image_folder import ImageFolderDataset, folder_facts, has_val
from ace_lightning.data.mnist import MNIST, FashionMNIST
from ace_lightning.data.synthetic import SyntheticDataset
from ace_lightning.data.tinyimagenet import ImageNet200, TinyImageNet
from ace_lightning.data.errors import DatasetNotFoundError
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
    # any folder of images (conf/data/image_folder.yaml): shape and classes come from its knobs
    # and files (folder_facts), mean/std from the data config's mean/std (default 0.5 / 0.25)
    "image_folder": DatasetInfo(
        "image_folder", (3, 32, 32), 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ImageFolderDataset,
        facts=folder_facts, own_val=has_val,
    ),
}


def get_dataset_info(name: str) -> DatasetInfo:
    """Registry lookup with a one-line error listing the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset '{name}'; known: {', '.join(sorted(DATASETS))}") from None


def locate_target(target: str, what: str) -> Any:
    """The class (or function) a ``_target_`` names, or a one-line ConfigError."""
    from hydra.utils import get_object

    try:
        return get_object(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError: the path does not resolve
        reason = " ".join(str(err).split()).split(" Are you sure")[0]
        raise ConfigError(f"{what}._target_ '{target}' cannot be imported ({reason})") from None


class TargetDataset:
    """A user's dataset class named by ``_target_``, built with hydra.utils.instantiate like the
    registered ones: ``cls(data_dir, train=..., transform=..., download=..., **dataset_kwargs)``."""

    def __init__(self, target: str) -> None:
        self.target, self.cls = str(target), locate_target(target, "data")

    def __call__(self, data_dir: str, **kwargs: Any) -> Dataset:
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        from ace_lightning.errors import ACEError

        try:
            return instantiate({"_target_": self.target, "_convert_": "all"}, data_dir, **kwargs)
        except InstantiationException as err:
            if isinstance(err.__cause__, ACEError):
                raise err.__cause__ from None
            raise ConfigError(f"data._target_ '{self.target}' cannot be built: "
                              f"{' '.join(str(err.__cause__ or err).split())}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TargetDataset) and other.target == self.target

    def __hash__(self) -> int:
        return hash(self.target)


@dataclass(frozen=True)
class TargetFacts:
    """facts of a ``_target_`` dataset: the configured input_shape / num_classes, else its train
    split's first image and its ``classes`` (or largest target + 1)."""

    build: TargetDataset
    input_shape: Optional[tuple] = None
    num_classes: Optional[int] = None

    def __call__(self, data_dir: str, kwargs: Mapping[str, Any]) -> dict:
        shape, classes, target = self.input_shape, self.num_classes, self.build.target
        if shape is None or classes is None:
            ds = self.build(data_dir, train=True, transform=T.no_augmentation(), download=False, **kwargs)
            if shape is None:
                if len(ds) == 0:
                    raise DatasetNotFoundError(f"data._target_ '{target}': the train split is empty")
                shape = tuple(T.to_float_tensor(ds[0][0]).shape)
            if classes is None:
                if getattr(ds, "classes", None) is not None:
                    classes = len(ds.classes)
                elif getattr(ds, "targets", None) is not None and len(ds.targets):
                    classes = int(max(int(t) for t in ds.targets)) + 1
                else:
                    raise ConfigError(f"data._target_ '{target}' has no classes or targets attribute: "
                                      f"set data.num_classes")
        shape = tuple(int(v) for v in shape)
        if len(shape) != 3:
            raise ConfigError(f"data.input_shape must be [channels, height, width], got {list(shape)}")
        return {"input_shape": shape, "num_classes": int(classes),
                "mean": (0.5,) * shape[0], "std": (0.25,) * shape[0]}


def target_dataset_info(name: str, target: str, input_shape: Optional[Any] = None,
                        num_classes: Optional[int] = None) -> DatasetInfo:
    """The DatasetInfo of a user's dataset class (a data config with ``_target_``): no
    augmentation; shape and classes configured or read from the data (_inferred_facts)."""
    build = TargetDataset(target)
    facts = TargetFacts(build, None if input_shape is None else tuple(int(v) for v in input_shape),
                        None if num_classes is None else int(num_classes))
    return DatasetInfo(str(name), (0, 0, 0), 0, (), (), build, facts=facts)
