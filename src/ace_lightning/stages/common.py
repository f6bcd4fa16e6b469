"""What every stage shares: atomic files, manifests, weight export, the code version.

Stages never import each other; they meet through the run folder: each writes
``<run_dir>/<stage>/manifest.json`` (what it produced, from which inputs, with hashes) and a
weights-only file that the next stage loads (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

import ace_lightning
from ace_lightning.atomic import atomic_torch_save, atomic_write_text  # noqa: F401 (re-exported)

MANIFEST = "manifest.json"


class StageInputError(ValueError):
    """A stage's input is missing or inconsistent (one line; the CLI exits with code 2)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_hash(cfg: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> dict:
    """Package version plus the git commit (and whether the tree was dirty) when run from a clone."""
    root = Path(__file__).resolve().parents[3]
    info: dict[str, Any] = {"package": ace_lightning.__version__, "torch": torch.__version__}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def export_weights(net: nn.Module, path: Path) -> dict:
    """Plain state_dict (tensors only: loadable with weights_only=True), written atomically."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    atomic_torch_save(state, path)
    return {"path": Path(path).name, "sha256": sha256_file(path)}


def load_weights(net: nn.Module, path: Path, what: str) -> nn.Module:
    """Load an exported state_dict with weights_only=True; one-line error on a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"{what}: weights file {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise StageInputError(f"{what}: {path} does not match the configured architecture ({detail})") from None
    return net


def write_manifest(stage_dir: Path, manifest: Mapping[str, Any]) -> dict:
    """Write ``manifest.json`` atomically (adding creation time and code version); returns it."""
    body = dict(manifest)
    body.setdefault("created", dt.datetime.now().isoformat(timespec="seconds"))
    body.setdefault("code_version", code_version())
    path = Path(stage_dir) / MANIFEST
    atomic_write_text(path, json.dumps(body, indent=2, default=str))
    return body


def read_manifest(stage_dir: Path) -> Optional[dict]:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def require_stage(run_dir: Path, stage: str, needed_by: str) -> dict:
    """The manifest of an earlier stage, or a one-line error naming the stage to run first."""
    manifest = read_manifest(Path(run_dir) / stage)
    if manifest is None or manifest.get("status") != "complete":
        raise StageInputError(f"stage '{needed_by}' needs stage '{stage}' in {run_dir}: run it first "
                              f"(python -m ace_lightning.train stage={stage} ...)")
    return manifest


def l1_penalty(net: nn.Module) -> torch.Tensor:
    """Sum of |w| over conv and linear weights (ace-method.md section 6, factor applied by caller)."""
    terms = [m.weight.abs().sum() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return torch.stack(terms).sum() if terms else torch.zeros(())
