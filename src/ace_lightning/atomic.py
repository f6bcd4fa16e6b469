"""Atomic file writes: a temp file in the same folder, then os.replace. A reader (or a crash) never
sees a half-written checkpoint, manifest, CSV or plot, and what was there before stays intact
until the new file is complete."""
from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None]) -> str:
    """``write(tmp_path)`` fills a temp file that then replaces ``path``. The file gets the usual
    permissions (0666 minus the umask; mkstemp alone would leave it readable by its owner only)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text_or_writer: Union[str, Callable[[Any], None]]) -> str:
    """Text, or a callable that writes to the open text file (CSV writers, json.dump)."""
    if isinstance(text_or_writer, str):
        return atomic_write_bytes(path, text_or_writer.encode())

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            text_or_writer(fh)

    return atomic_write(path, write)


def atomic_torch_save(obj: Any, path: PathLike) -> str:
    """torch.save through memory: the bytes depend on ``obj`` only (saving to a temp path records
    that path's name in the archive, so identical weights got different sha256 hashes)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save"]
