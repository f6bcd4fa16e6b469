"""TinyImageNet and ImageNet200 from their folder layouts.

TinyImageNet (200 classes, 64x64 JPEGs)::

    root/wnids.txt
    root/train/<wnid>/images/*.JPEG
    root/val/val_annotations.txt          (file <TAB> wnid <TAB> box...)
    root/val/images/*.JPEG

``root`` may also be the folder that contains ``tiny-imagenet-200/``. Its test split has no
labels, so the labelled val split serves as test set (as in CROWN-IBP and ACE).

ImageNet200: a standard ImageNet folder (``root/train/<wnid>/...``, ``root/val/<wnid>/...``, val
reorganised into class folders) restricted to TinyImageNet's 200 wnids; the paper certifies it
with a cert-net on a 64 px downsampled view while the core sees 224 px.

Labels are indices into the *sorted* wnid list in both, so the two datasets agree.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ace_lightning.data.download import download_into
from ace_lightning.data import transforms as T
from ace_lightning.data.errors import DatasetNotFoundError
from ace_lightning.data.info import register_dataset
from ace_lightning.data.transforms import to_float_tensor
from ace_lightning.data.wnids import TINYIMAGENET_WNIDS

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png")
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_HOW_TO_GET = f"download {TINYIMAGENET_URL} and unzip it there, or rerun with download=true and network access"
IMAGENET_HOW_TO_GET = (
    "point data_dir at an ImageNet folder with train/<wnid>/ and val/<wnid>/ (val images sorted "
    "into class folders, e.g. with the common valprep.sh script); ImageNet cannot be downloaded automatically"
)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _images_under(folder: str) -> list[str]:
    """All image files below ``folder`` (recursive), sorted for a deterministic order."""
    out = []
    for dirpath, _, files in os.walk(folder):
        out.extend(os.path.join(dirpath, f) for f in files if _is_image(f))
    return sorted(out)


def read_wnids(path: str) -> list[str]:
    with open(path) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise DatasetNotFoundError(f"{path} lists some wnids twice")
    return wnids


class _ImageListDataset(Dataset):
    """(path, label) samples decoded with PIL on access; picklable (no open file handles)."""

    samples: list[tuple[str, int]]
    classes: list[str]

    def __init__(self, transform: Optional[Callable]) -> None:
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return to_float_tensor(img), label


@register_dataset("tinyimagenet", (3, 56, 56), 200, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                  train_transform=T.tinyimagenet_train, eval_transform=T.tinyimagenet_eval,
                  augmentation="random crop 56 + horizontal flip (train), centre crop 56 (eval)")
class TinyImageNet(_ImageListDataset):
    """TinyImageNet-200 (100000 train / 10000 val-as-test, 3x64x64 stored, 56 px crops used)."""

    base_folder = "tiny-imagenet-200"

    def __init__(
        self,
        root: str,
        train: bool = True,
        transform: Optional[Callable] = None,
        download: bool = False,
    ) -> None:
        super().__init__(transform)
        self.train = train
        root = os.path.expanduser(str(root))
        self.root = self._resolve(root, download)
        self.wnids = read_wnids(os.path.join(self.root, "wnids.txt"))
        self.classes = sorted(self.wnids)
        self.class_to_idx = {w: i for i, w in enumerate(self.classes)}
        self.samples = self._train_samples() if train else self._val_samples()
        if not self.samples:
            raise DatasetNotFoundError(f"TinyImageNet in {self.root}: no {'train' if train else 'val'} images found; {TINY_HOW_TO_GET}")

    def _resolve(self, root: str, download: bool) -> str:
        for cand in (root, os.path.join(root, self.base_folder)):
            if os.path.isfile(os.path.join(cand, "wnids.txt")):
                return cand
        reason = "download=False"
        if download:
            try:
                from torchvision.datasets.utils import download_and_extract_archive

                def fetch(tmp: str) -> list[str]:  # a failed download leaves no root behind
                    download_and_extract_archive(TINYIMAGENET_URL, tmp)
                    return [self.base_folder]

                download_into(root, fetch)
                cand = os.path.join(root, self.base_folder)
                if os.path.isfile(os.path.join(cand, "wnids.txt")):
                    return cand
                reason = "the downloaded archive has no wnids.txt"
            except Exception as exc:
                reason = f"download failed ({type(exc).__name__}: {exc})"
        raise DatasetNotFoundError(
            f"TinyImageNet not found: no wnids.txt in {root} or {os.path.join(root, self.base_folder)} and {reason}; {TINY_HOW_TO_GET}"
        )

    def _train_samples(self) -> list[tuple[str, int]]:
        samples = []
        for wnid in self.classes:
            folder = os.path.join(self.root, "train", wnid)
            if not os.path.isdir(folder):
                raise DatasetNotFoundError(f"TinyImageNet in {self.root}: missing train/{wnid}/ listed in wnids.txt; {TINY_HOW_TO_GET}")
            samples.extend((p, self.class_to_idx[wnid]) for p in _images_under(folder))
        return samples

    def _val_samples(self) -> list[tuple[str, int]]:
        ann = os.path.join(self.root, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            raise DatasetNotFoundError(f"TinyImageNet in {self.root}: missing val/val_annotations.txt; {TINY_HOW_TO_GET}")
        samples = []
        with open(ann) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 2 or parts[1].strip() not in self.class_to_idx:
                    raise DatasetNotFoundError(f"{ann}:{lineno}: expected '<file>\\t<wnid from wnids.txt>\\t...', got {line.strip()!r}")
                path = os.path.join(self.root, "val", "images", parts[0].strip())
                if not os.path.isfile(path):
                    raise DatasetNotFoundError(f"{ann}:{lineno}: image {path} is missing; {TINY_HOW_TO_GET}")
                samples.append((path, self.class_to_idx[parts[1].strip()]))
        return samples


@register_dataset("imagenet200", (3, 224, 224), 200, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                  train_transform=T.imagenet_train, eval_transform=T.imagenet_eval,
                  augmentation="random resized crop 224 + horizontal flip (train), resize 256 + centre crop 224 (eval)")
class ImageNet200(_ImageListDataset):
    """ImageNet restricted to the 200 TinyImageNet classes (full resolution, 224 px crops)."""

    def __init__(
        self,
        root: str,
        train: bool = True,
        transform: Optional[Callable] = None,
        download: bool = False,
        wnids: Optional[Sequence[str]] = None,
        wnids_file: Optional[str] = None,
    ) -> None:
        super().__init__(transform)
        self.train = train
        self.root = os.path.expanduser(str(root))
        if wnids_file:
            wnids = read_wnids(wnids_file)
        self.classes = sorted(wnids if wnids is not None else TINYIMAGENET_WNIDS)
        self.class_to_idx = {w: i for i, w in enumerate(self.classes)}
        split = "train" if train else "val"
        folder = os.path.join(self.root, split)
        if not os.path.isdir(folder):
            raise DatasetNotFoundError(f"ImageNet200 not found: no folder {folder}; {IMAGENET_HOW_TO_GET}")
        missing = [w for w in self.classes if not os.path.isdir(os.path.join(folder, w))]
        if missing:
            raise DatasetNotFoundError(
                f"ImageNet200: {len(missing)} of {len(self.classes)} class folders missing in {folder} "
                f"(first: {', '.join(missing[:3])}); {IMAGENET_HOW_TO_GET}"
            )
        self.samples = [(p, self.class_to_idx[w]) for w in self.classes
                        for p in _images_under(os.path.join(folder, w))]
        if not self.samples:
            raise DatasetNotFoundError(f"ImageNet200: no images under {folder}/<wnid>/; {IMAGENET_HOW_TO_GET}")

