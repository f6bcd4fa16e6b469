"""Reader for the IDX format of (Fashion-)MNIST, plain or gzip.

We read the files ourselves instead of through torchvision because the Debian package
``dataset-fashion-mnist`` ships the same data with checksums torchvision rejects.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch

from ace_lightning.data.errors import DatasetNotFoundError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> torch.Tensor:
    """Read one IDX file (``.gz`` or raw) into a tensor, validating magic number and size."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetNotFoundError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DatasetNotFoundError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetNotFoundError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
            f"file has {len(raw) - header} bytes of data"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def find_idx_file(dirs: list[str], stem: str) -> str | None:
    """First existing ``stem`` or ``stem.gz`` in ``dirs``."""
    for d in dirs:
        for name in (stem, stem + ".gz"):
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None
