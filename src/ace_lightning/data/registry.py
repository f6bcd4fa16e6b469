"""Dataset lookup: a registered name (DATASETS, data/info.py: each dataset class registers itself
where it is defined) or a user's class named by ``_target_`` (target_dataset_info), built the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch.utils.data import Dataset

# the dataset modules register their classes when imported (in this order: the registry's order)
from ace_lightning.data import cifar, mnist, tinyimagenet, synthetic, image_folder  # noqa: F401
from ace_lightning.data import transforms as T
from ace_lightning.data.errors import DatasetNotFoundError
from ace_lightning.data.info import DATASETS, DatasetInfo
from ace_lightning.errors import ConfigError


def get_dataset_info(name: str) -> DatasetInfo:
    """The registered dataset ``name`` (or an alias): a one-line error naming the closest known one."""
    return DATASETS.get(name)


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
