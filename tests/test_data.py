"""Dataset registry, on-disk formats (real Fashion-MNIST, generated CIFAR-10 / TinyImageNet /
ImageNet200 files) and the datamodule's splits."""
from __future__ import annotations

import gzip
import inspect
import io
import os
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ace_lightning.data import DATASETS, ACEDataModule, DatasetNotFoundError, get_dataset_info
from ace_lightning.data.cifar import CIFAR10
from ace_lightning.data.idx import read_idx
from ace_lightning.data.mnist import FashionMNIST
from ace_lightning.data.synthetic import SyntheticDataset
from ace_lightning.data.tinyimagenet import ImageNet200, TinyImageNet
from ace_lightning.data.wnids import TINYIMAGENET_WNIDS

FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
CONF = os.path.join(os.path.dirname(__file__), "..", "src", "ace_lightning", "conf")


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg, msg
    return msg


# --- registry ------------------------------------------------------------------------------

def _tiny_files(name: str, root) -> None:
    """A few images in the dataset's real on-disk format (the writers are further down)."""
    if name in ("fashion_mnist", "mnist"):
        _write_fmnist(root)  # the same IDX files for both
    elif name == "cifar10":
        _write_cifar(str(root), per_batch=2, n_test=4)
    elif name == "tinyimagenet":
        _write_tinyimagenet(str(root), wnids=TINYIMAGENET_WNIDS, per_class=1)
    elif name == "imagenet200":
        for split in ("train", "val"):
            for i, w in enumerate(TINYIMAGENET_WNIDS):
                _jpeg(str(root / split / w / f"{w}.JPEG"), 8, i)
    elif name == "image_folder":  # two classes of PNGs of other sizes (resized to the configured 32 px)
        for split in ("train", "test"):
            for c, cls in enumerate(("cat", "dog")):
                for i in range(3):
                    path = root / split / cls / f"{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    arr = np.random.default_rng(10 * c + i).integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                    Image.fromarray(arr).save(path)
    elif name != "synthetic":  # generated in memory
        pytest.fail(f"dataset '{name}' is registered but this test cannot write its files: add a writer")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registry_facts_are_what_the_loader_and_transforms_produce(name, tmp_path):
    """The registry's static facts (input shape after the crops, class count, one mean/std per
    channel) are what the nets are built from, so they must match the batches that the
    datamodule really yields from files in the dataset's format, train (augmented) and test."""
    info = get_dataset_info(name)
    assert info.name == name
    _tiny_files(name, tmp_path)
    dm = ACEDataModule(name, data_dir=str(tmp_path), download=False, val_size=2, batch_size=4)
    dm.setup()
    assert dm.info == info  # no dataset_kwargs: the registry entry itself
    assert len(dm.train_set.dataset.classes) == info.num_classes
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert tuple(x.shape[1:]) == info.input_shape
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1  # eps is in pixel space
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < info.num_classes
        assert len(info.mean) == len(info.std) == x.shape[1]  # the nets' Normalize: one per channel


@pytest.mark.skipif(not os.path.isdir(FMNIST_SYSTEM_DIR),
                    reason="real Fashion-MNIST needs the Debian package: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_mean_and_std_are_the_training_set_statistics(tmp_path):
    info = get_dataset_info("fashion_mnist")
    pixels = FashionMNIST(str(tmp_path), train=True).data.double().div_(255)  # empty data_dir -> system folder
    assert pixels.mean().item() == pytest.approx(info.mean[0], abs=5e-4)
    assert pixels.std().item() == pytest.approx(info.std[0], abs=5e-4)


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; known: cifar10, fashion_mnist"):
        get_dataset_info("svhn")


def test_every_registry_entry_has_a_config_the_datamodule_accepts():
    params = set(inspect.signature(ACEDataModule).parameters)
    for name in DATASETS:
        cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF, "data", f"{name}.yaml")))
        assert cfg["name"] == name
        assert set(cfg) <= params, set(cfg) - params
        ACEDataModule(**cfg)  # construction touches no files


# --- Fashion-MNIST / IDX -------------------------------------------------------------------

def _write_idx(path, arr: np.ndarray) -> None:
    code = {np.uint8: 0x08}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _write_fmnist(folder, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), rng.integers(0, 10, n, dtype=np.uint8))


@pytest.mark.skipif(not os.path.isdir(FMNIST_SYSTEM_DIR),
                    reason="real Fashion-MNIST needs the Debian package: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    train = FashionMNIST(str(tmp_path), train=True)  # empty data_dir -> system folder
    test = FashionMNIST(str(tmp_path), train=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.source == FMNIST_SYSTEM_DIR
    assert sorted(train.targets.unique().tolist()) == list(range(10))
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y == 9  # the first training image of Fashion-MNIST is an ankle boot
    dm = ACEDataModule("fashion_mnist", data_dir=str(tmp_path), download=False, val_size=5000, batch_size=32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 1, 28, 28) and dm.info.num_classes == 10


def test_fashion_mnist_prefers_data_dir_and_validates_files(tmp_path):
    _write_fmnist(tmp_path / "FashionMNIST" / "raw")  # torchvision's layout
    ds = FashionMNIST(str(tmp_path), train=True)
    assert len(ds) == 20 and ds.source.endswith(os.path.join("FashionMNIST", "raw"))
    raw = read_idx(str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"))
    assert torch.equal((ds[3][0] * 255).round().to(torch.uint8)[0], raw[3])
    bad = tmp_path / "bad"
    _write_fmnist(bad)
    with open(bad / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(gzip.compress(b"\x00\x00\x08\x01" + (99).to_bytes(4, "big") + b"\x00" * 3))
    with pytest.raises(DatasetNotFoundError, match="truncated or corrupt"):
        FashionMNIST(str(bad), train=False)


def test_fashion_mnist_missing_everywhere_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())
    with pytest.raises(DatasetNotFoundError) as err:
        FashionMNIST(str(tmp_path / "nowhere"), train=True, download=False)
    msg = _one_line(err.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert isinstance(err.value, FileNotFoundError)


# --- CIFAR-10 (exact python pickle format) ------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """The real CIFAR-10 batches are Python 2 pickles: dict keys and strings are py2 ``str``
    (BINSTRING opcodes), which torchvision reads with ``encoding="latin1"``. Python 3 would write
    bytes differently, so emit those opcodes for ``bytes`` (numpy's raw buffer included)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_dump(obj, path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _write_cifar(root, per_batch=4, n_test=6, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        entry = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(),
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        _py2_dump(entry, os.path.join(folder, name))
        written[name] = entry
    meta = {b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer",
                                                  "dog", "frog", "horse", "ship", "truck")],
            b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    _py2_dump(meta, os.path.join(folder, "batches.meta"))
    return written


def test_generated_cifar10_loads_through_torchvision_path(tmp_path):
    written = _write_cifar(str(tmp_path))
    train, test = CIFAR10(str(tmp_path), train=True), CIFAR10(str(tmp_path), train=False)
    assert (len(train), len(test)) == (20, 6)
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    x, y = train[5]  # second image of data_batch_2
    expect = written["data_batch_2"][b"data"][1].reshape(3, 32, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(expect))
    assert y == written["data_batch_2"][b"labels"][1]
    assert test.targets == written["test_batch"][b"labels"]


def test_cifar10_missing_data_is_one_line_naming_folder(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as err:
        CIFAR10(str(tmp_path), train=True, download=False)
    msg = _one_line(err.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed .URLError") as err:
        CIFAR10(str(tmp_path), train=True, download=True)
    _one_line(err.value)


def test_cifar10_malformed_batch_is_reported(tmp_path):
    _write_cifar(str(tmp_path))
    _py2_dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
              tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DatasetNotFoundError, match="not in the CIFAR-10 python format"):
        CIFAR10(str(tmp_path), train=True)


def test_cifar10_datamodule_augments_train_only(tmp_path):
    _write_cifar(str(tmp_path), per_batch=8)
    dm = ACEDataModule("cifar10", data_dir=str(tmp_path), download=False, val_size=10, batch_size=6)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 6)
    torch.manual_seed(0)
    aug = torch.stack([dm.train_set[i][0] for i in range(30)])
    plain = torch.stack([dm.train_eval_set[i][0] for i in range(30)])
    assert aug.shape == plain.shape == (30, 3, 32, 32)
    assert not torch.equal(aug, plain)  # crops/flips moved some pixels
    assert torch.equal(plain, torch.stack([dm.train_eval_set[i][0] for i in range(30)]))  # no randomness
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 32, 32) and y.dtype == torch.int64


# --- TinyImageNet / ImageNet200 folder trees -----------------------------------------------

def _jpeg(path, side, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG")


def _write_tinyimagenet(root, wnids=("n02124075", "n01443537", "n09246464"), per_class=3):
    base = os.path.join(root, "tiny-imagenet-200")
    with open(os.path.join(_mkdir(base), "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    for c, w in enumerate(wnids):
        for i in range(per_class):
            _jpeg(os.path.join(base, "train", w, "images", f"{w}_{i}.JPEG"), 64, 10 * c + i)
    lines = []
    for i in range(5):
        w = wnids[i % len(wnids)]
        _jpeg(os.path.join(base, "val", "images", f"val_{i}.JPEG"), 64, 100 + i)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.makedirs(os.path.join(base, "test", "images"))  # unlabeled split: ignored
    return base


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


def test_tinyimagenet_folder_layout(tmp_path):
    _write_tinyimagenet(str(tmp_path))
    train, test = TinyImageNet(str(tmp_path), train=True), TinyImageNet(str(tmp_path), train=False)
    assert (len(train), len(test)) == (9, 5)
    assert train.classes == sorted(["n02124075", "n01443537", "n09246464"])
    assert train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # labels follow the sorted wnids
    assert test.targets == [train.classes.index(w) for w in ("n02124075", "n01443537", "n09246464", "n02124075", "n01443537")]
    info = get_dataset_info("tinyimagenet")
    dm = ACEDataModule("tinyimagenet", data_dir=str(tmp_path), download=False, val_size=2, batch_size=4)
    dm.setup()
    assert dm.train_set[0][0].shape == dm.test_set[0][0].shape == info.input_shape  # 56 px crops
    full = TinyImageNet(str(tmp_path / "tiny-imagenet-200"), train=False)[1][0]
    assert torch.equal(dm.test_set[1][0], full[:, 4:60, 4:60])  # centre crop for evaluation


def test_tinyimagenet_missing_is_one_line(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        TinyImageNet(str(tmp_path), train=True)
    msg = _one_line(err.value)
    assert "wnids.txt" in msg and str(tmp_path) in msg and "tiny-imagenet-200.zip" in msg
    base = _write_tinyimagenet(str(tmp_path))
    os.remove(os.path.join(base, "val", "images", "val_3.JPEG"))
    with pytest.raises(DatasetNotFoundError, match="val_3.JPEG is missing"):
        TinyImageNet(str(tmp_path), train=False)


def test_imagenet200_restricts_to_the_tinyimagenet_classes(tmp_path):
    assert len(TINYIMAGENET_WNIDS) == 200
    for split in ("train", "val"):
        for i, w in enumerate(TINYIMAGENET_WNIDS + ("n01440764",)):  # + one non-TinyImageNet class
            _jpeg(str(tmp_path / split / w / f"{w}_{i}.JPEG"), 8, i)
    train = ImageNet200(str(tmp_path), train=True)
    assert len(train) == 200 and len(train.classes) == 200 and "n01440764" not in train.classes
    assert train.targets == list(range(200))
    assert train.classes == sorted(TINYIMAGENET_WNIDS)  # same label order as TinyImageNet
    x, _ = ImageNet200(str(tmp_path), train=False, transform=get_dataset_info("imagenet200").eval_transform())[7]
    assert x.shape == (3, 224, 224)
    os.rename(tmp_path / "val" / TINYIMAGENET_WNIDS[5], tmp_path / "val" / "moved")
    with pytest.raises(DatasetNotFoundError, match=f"1 of 200 class folders missing .* {TINYIMAGENET_WNIDS[5]}") as err:
        ImageNet200(str(tmp_path), train=False)
    _one_line(err.value)


def test_imagenet200_custom_wnids_and_datamodule(tmp_path):
    wnids = ["n02124075", "n01443537"]
    for split in ("train", "val"):
        for c, w in enumerate(wnids):
            for i in range(3):
                _jpeg(str(tmp_path / split / w / f"{i}.JPEG"), 32, 10 * c + i)
    wnids_file = tmp_path / "wnids.txt"
    wnids_file.write_text("\n".join(wnids))
    dm = ACEDataModule("imagenet200", data_dir=str(tmp_path), download=False, val_size=2, batch_size=2,
                       dataset_kwargs={"wnids_file": str(wnids_file)})
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 224, 224) and set(y.tolist()) <= {0, 1}
    with pytest.raises(DatasetNotFoundError, match="no folder .*train"):
        ImageNet200(str(tmp_path / "empty"), train=True)


# --- synthetic and the datamodule ----------------------------------------------------------

def test_synthetic_is_deterministic_and_learnable():
    kw = dict(input_shape=(2, 8, 8), num_classes=3, train_size=90, test_size=30, seed=1)
    a, b = SyntheticDataset(train=True, **kw), SyntheticDataset(train=True, **kw)
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    test = SyntheticDataset(train=False, **kw)
    assert not torch.equal(a.data[:30], test.data)
    xs = torch.stack([a[i][0] for i in range(len(a))]).flatten(1)
    means = torch.stack([xs[a.targets == c].mean(0) for c in range(3)])
    xt = torch.stack([test[i][0] for i in range(len(test))]).flatten(1)
    acc = (torch.cdist(xt, means).argmin(1) == test.targets).float().mean()
    assert acc > 0.9  # nearest class mean separates the classes


def test_datamodule_splits_are_deterministic_disjoint_and_subsettable():
    kw = dict(name="synthetic", download=False, val_size=50, batch_size=16,
              dataset_kwargs=dict(input_shape=(1, 6, 6), num_classes=4, train_size=300, test_size=40))
    dm = ACEDataModule(seed=3, **kw)
    dm.setup()
    assert dm.info.input_shape == (1, 6, 6) and dm.info.num_classes == 4 and len(dm.info.mean) == 1
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (250, 50, 40)
    assert not set(dm.train_indices) & set(dm.val_indices)
    assert sorted(dm.train_indices + dm.val_indices) == list(range(300))
    again = ACEDataModule(seed=3, **kw)
    again.setup()
    assert again.val_indices == dm.val_indices
    other = ACEDataModule(seed=4, **kw)
    other.setup()
    assert other.val_indices != dm.val_indices
    # the un-augmented training view: same indices, same order, no shuffling
    assert dm.train_eval_set.indices == dm.train_set.indices == dm.train_indices
    xs, ys = zip(*[(x, y) for x, y in dm.train_eval_dataloader()])
    assert torch.cat(ys).tolist() == [int(dm.train_set.dataset.targets[i]) for i in dm.train_indices]
    small = ACEDataModule(seed=3, subset=20, **kw)
    small.setup()
    assert (len(small.train_set), len(small.val_set), len(small.test_set)) == (20, 20, 20)
    assert set(small.val_indices) <= set(dm.val_indices)  # val images do not depend on subset
    assert set(small.train_indices) <= set(dm.train_indices)
    pickle.loads(pickle.dumps(small))  # DDP spawn pickles the datamodule
    with pytest.raises(ValueError, match="leaves no training images"):
        ACEDataModule(seed=3, **{**kw, "val_size": 300}).setup()
