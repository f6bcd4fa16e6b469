"""Downloads that leave nothing behind when they fail: the downloader works in a temporary folder
and only what it fetched completely is moved into the data folder (before this, an offline run
left an empty ``data/mnist/MNIST/raw`` in the working directory)."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Iterable


def download_into(root: str, fetch: Callable[[str], Iterable[str]]) -> list[str]:
    """``fetch(tmp)`` downloads into the temporary folder ``tmp`` and returns the paths (relative to
    it) worth keeping; those are moved into ``root``, each atomically (a file or folder already
    there is kept). Any exception of ``fetch`` propagates with ``root`` untouched."""
    moved = []
    with tempfile.TemporaryDirectory(prefix="ace-lightning-download-") as tmp:
        keep = list(fetch(tmp))
        for rel in keep:
            src, dest = os.path.join(tmp, rel), os.path.join(root, rel)
            if not os.path.exists(src):
                raise FileNotFoundError(f"the download did not produce {rel}")
            if os.path.exists(dest):
                continue
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            part = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{os.getpid()}.part")
            (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, part)
            os.replace(part, dest)
            moved.append(dest)
    return moved
