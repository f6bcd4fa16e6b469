"""Atomic writes: content-only bytes (stable hashes), usual permissions, old file kept on failure."""
import hashlib
import os
import stat

import pytest
import torch

from ace_lightning.atomic import atomic_torch_save, atomic_write_text


def test_torch_save_bytes_depend_on_the_weights_only(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3)}
    a, b = tmp_path / "a.pt", tmp_path / "sub" / "b.pt"
    atomic_torch_save(state, a)
    atomic_torch_save(state, b)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
    assert torch.equal(torch.load(b, weights_only=True)["w"], state["w"])


def test_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "x.csv", "a,b\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")

    def broken(fh):
        fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_text(path, broken)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
