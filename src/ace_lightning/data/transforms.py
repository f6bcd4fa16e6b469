"""Picklable tensor transforms shared by all datasets.

Every dataset yields a float tensor in [0, 1] of shape (C, H, W): normalisation is a layer of the
net (eps lives in pixel space), so the data pipeline never normalises. Augmentations from
torchvision accept both PIL images and tensors; ``ToFloatTensor`` closes every pipeline.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF


class ToFloatTensor:
    """PIL image / uint8 tensor / float tensor -> float32 tensor (C, H, W) in [0, 1]."""

    def __call__(self, img: Any) -> torch.Tensor:
        if isinstance(img, Image.Image):
            return TF.to_tensor(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
        if isinstance(img, torch.Tensor):
            if img.dtype == torch.uint8:
                img = img.float().div_(255.0)
            if img.dim() == 2:
                img = img.unsqueeze(0)
            return img.float()
        raise TypeError(f"ToFloatTensor: unsupported sample type {type(img).__name__}")

    def __repr__(self) -> str:
        return "ToFloatTensor()"


def is_identity(transform: Any) -> bool:
    """No transform, or a pipeline of ToFloatTensor steps only (nothing but the conversion)."""
    if transform is None or isinstance(transform, ToFloatTensor):
        return True
    steps = getattr(transform, "transforms", None)
    return isinstance(steps, (list, tuple)) and all(isinstance(t, ToFloatTensor) for t in steps)


def to_float_tensor(img: Any) -> torch.Tensor:
    return ToFloatTensor()(img)


def compose(*steps: Callable) -> Callable:
    """Augmentation steps followed by ToFloatTensor (idempotent on float tensors)."""
    return T.Compose([*steps, ToFloatTensor()])


def no_augmentation() -> Callable:
    return compose()


def cifar_train() -> Callable:
    """CIFAR-10 training augmentation: random crop with 4 px zero padding + horizontal flip."""
    return compose(T.RandomCrop(32, padding=4), T.RandomHorizontalFlip())


def tinyimagenet_train() -> Callable:
    """TinyImageNet (64 px images): random 56 px crop + flip (CROWN-IBP / ACE protocol)."""
    return compose(T.RandomCrop(56), T.RandomHorizontalFlip())


def tinyimagenet_eval() -> Callable:
    return compose(T.CenterCrop(56))


def imagenet_train() -> Callable:
    return compose(T.RandomResizedCrop(224), T.RandomHorizontalFlip())


def imagenet_eval() -> Callable:
    return compose(T.Resize(256), T.CenterCrop(224))
