"""A folder of images in torchvision's ImageFolder layout, one sub-folder per class::

    root/train/<class>/*.png        (any image format PIL reads: png, jpg, bmp, ...)
    root/test/<class>/*.png
    root/val/<class>/*.png          optional: without it, val_size images are carved from train

Every image is converted to ``channels`` (1: grayscale, 3: RGB) and resized to ``image_size``, so
the nets see one shape; labels index the sorted class folders of train/, and every split must
have the same class folders.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from PIL import Image
from torch.utils.data import Dataset

from ace_lightning.data.errors import DatasetNotFoundError
from ace_lightning.data.info import register_dataset
from ace_lightning.data.transforms import to_float_tensor
from ace_lightning.errors import ConfigError

LAYOUT = "<data_dir>/train/<class>/<image>, <data_dir>/test/<class>/<image> (and optionally val/)"
SPLITS = ("train", "val", "test")


def image_shape(image_size: Union[int, Sequence[int]], channels: int) -> tuple[int, int, int]:
    """(C, H, W) from the ``image_size`` (side, or [height, width]) and ``channels`` knobs."""
    if int(channels) not in (1, 3):
        raise ConfigError(f"image_folder: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    size = [image_size] * 2 if isinstance(image_size, (int, float, str)) else list(image_size)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ConfigError(f"image_folder: image_size must be a side length or [height, width], got {image_size}")
    return int(channels), int(size[0]), int(size[1])


def split_classes(root: str, split: str) -> list[str]:
    """The sorted class folders of ``root/split`` (DatasetNotFoundError naming the layout)."""
    folder = os.path.join(os.path.expanduser(str(root)), split)
    if not os.path.isdir(folder):
        raise DatasetNotFoundError(f"image_folder: {folder} not found; the layout is {LAYOUT}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"image_folder: {folder} holds no class folders; the layout is {LAYOUT}")
    return classes


def has_val(root: str) -> bool:
    """Whether the folder has a val/ split of its own (else val is carved from train/)."""
    return os.path.isdir(os.path.join(os.path.expanduser(str(root)), "val"))


def folder_facts(data_dir: str, kwargs: Mapping[str, Any]) -> dict:
    """DatasetInfo facts of a configured image folder: the shape from the knobs, the class count
    from train/."""
    shape = image_shape(kwargs.get("image_size", 32), kwargs.get("channels", 3))
    return {"input_shape": shape, "num_classes": len(split_classes(data_dir, "train")),
            "mean": (0.5,) * shape[0], "std": (0.25,) * shape[0]}


# shape and classes come from its knobs and files (folder_facts), mean/std from the data config's
# mean/std (default 0.5 / 0.25)
@register_dataset("image_folder", (3, 32, 32), 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), facts=folder_facts,
                  own_val=has_val)
class ImageFolderDataset(Dataset):
    """One split of an image folder; yields (float tensor (C, H, W) in [0, 1], class index)."""

    def __init__(
        self,
        root: str,
        train: bool = True,
        transform: Optional[Callable] = None,
        download: bool = False,
        image_size: Union[int, Sequence[int]] = 32,
        channels: int = 3,
        split: Optional[str] = None,
    ) -> None:
        from torchvision.datasets import ImageFolder

        self.split = split or ("train" if train else "test")
        if self.split not in SPLITS:
            raise ConfigError(f"image_folder: unknown split {self.split!r}; known: {', '.join(SPLITS)}")
        self.train, self.transform = train, transform
        self.shape = image_shape(image_size, channels)
        self.mode = "L" if self.shape[0] == 1 else "RGB"
        self.source = os.path.join(os.path.expanduser(str(root)), self.split)
        self.classes = split_classes(root, "train")
        mine = split_classes(root, self.split)
        if mine != self.classes:
            extra = sorted(set(mine) ^ set(self.classes))
            raise DatasetNotFoundError(f"image_folder: {self.source} and the train folder have different class "
                                       f"folders (e.g. {extra[0]!r}): every split needs the same classes")
        try:
            folder = ImageFolder(self.source)
        except FileNotFoundError as err:  # a class folder without images
            raise DatasetNotFoundError(f"image_folder: {err}") from None
        self.samples = folder.samples
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        with Image.open(path) as img:
            img = img.convert(self.mode)
            if img.size != (self.shape[2], self.shape[1]):
                img = img.resize((self.shape[2], self.shape[1]), Image.BILINEAR)
        if self.transform is not None:
            img = self.transform(img)
        return to_float_tensor(img), int(target)
