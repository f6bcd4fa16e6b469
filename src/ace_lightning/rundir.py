"""The run-folder protocol: how stages meet (DESIGN: stages never import each other).

A run folder ``<runs_root>/<data>/eps_<eps>/`` holds one folder per stage. A stage that completes
writes ``<stage>/manifest.json`` (status, the config hash of everything that changes its result,
its inputs with sha256, its outputs, metrics, code version) and a weights-only file the next stage
loads with ``torch.load(weights_only=True)``; ``run_state.json`` marks a stage that started. This
module is the only place that reads or writes those files: stages, the certify stage and the CLI
all go through it.

Skip / resume / refuse: a completed stage with the same config hash is skipped; a started one
resumes from its checkpoints; a folder made by a different config is refused (``overwrite=true``
moves it aside as ``<stage>.old-<time>``).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

import ace_lightning
from ace_lightning.ace import ACEModel
from ace_lightning.atomic import atomic_torch_save, atomic_write_text
from ace_lightning.config import to_dict
from ace_lightning.console import log
from ace_lightning.errors import ConfigError, StageInputError
from ace_lightning.selections import SELECTIONS

MANIFEST = "manifest.json"
RUN_STATE = "run_state.json"


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
    root = Path(__file__).resolve().parents[2]
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


def load_weights_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a file a stage wrote; a truncated or foreign file is a
    one-line StageInputError (rerun the stage that wrote it), not a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        reason = "file is truncated or not a checkpoint" if not isinstance(err, OSError) else str(err)
        raise StageInputError(f"cannot load {path}: {reason}") from None


def load_weights(net: nn.Module, path: Path, what: str) -> nn.Module:
    """Load an exported state_dict with weights_only=True; one-line error on a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"{what}: weights file {path} not found")
    state = load_weights_file(path)
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


def identity_config(cfg: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None) -> dict:
    """The parts of the config that change a stage's result (not devices, workers, logging)."""
    data = {k: v for k, v in to_dict(cfg["data"]).items() if k not in ("num_workers", "download", "data_dir",
                                                                         "pin_memory", "eval_batch_size")}
    trainer = to_dict(cfg.get("trainer", {})) or {}
    stage = {k: v for k, v in to_dict(cfg["stage"]).items() if k != "folder"}  # where, not what
    ident = {
        "stage": stage, "data": data, "eps": cfg.get("eps"), "seed": cfg.get("seed"),
        "trainer": {k: trainer.get(k) for k in ("max_epochs", "max_steps", "limit_train_batches",
                                                "limit_val_batches", "gradient_clip_val")},
    }
    ident.update(extra or {})
    return ident


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(old: Optional[Mapping[str, Any]], new: Optional[Mapping[str, Any]], limit: int = 3) -> str:
    """The first keys whose values differ between two identity configs, for an error message."""
    if not old or not new:
        return ""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    shown = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more


def prepare_stage_dir(stage_dir: Path, ident_hash: str, overwrite: bool,
                      ident: Optional[Mapping[str, Any]] = None) -> Optional[dict]:
    """Returns the completed manifest to skip with, or None to (re)run. Refuses to mix configs
    (the error names the first settings that differ, and the version that made the folder)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(stage_dir)
    if manifest and manifest.get("status") == "complete" and manifest.get("config_hash") == ident_hash \
            and not overwrite:
        return manifest
    state_path = stage_dir / RUN_STATE
    previous = json.loads(state_path.read_text()) if state_path.is_file() else None
    if previous and previous.get("config_hash") != ident_hash:
        if not overwrite:
            made_by = ((manifest or {}).get("code_version") or {}).get("package")
            version = (f"; it was made by ace-lightning {made_by}, this is {ace_lightning.__version__}"
                       if made_by and made_by != ace_lightning.__version__ else "")
            diff = config_differences((manifest or {}).get("config"), ident)
            raise StageInputError(
                f"{stage_dir} holds stage '{stage_dir.name}' made with a different config "
                f"({diff or 'hash ' + str(previous.get('config_hash')) + ' != ' + ident_hash}{version}); "
                f"use another run_dir or overwrite=true")
        backup = stage_dir.with_name(f"{stage_dir.name}.old-{dt.datetime.now():%Y%m%d-%H%M%S}")
        shutil.move(str(stage_dir), backup)
        stage_dir.mkdir(parents=True)
        log.info(f"moved the previous '{stage_dir.name}' stage to {backup}")
    atomic_write_text(state_path, json.dumps({"config_hash": ident_hash, "status": "running"}))
    return None


def mark_stage_failed(stage_dir: Path, error: str, since: float) -> bool:
    """``run_state.json`` of a stage that failed says so, with the one-line error (it stays
    resumable: the next run with the same config resumes from last.ckpt as after a crash). Only a
    state this job wrote (running, written at or after ``since``, a time.time()) is changed: a
    folder refused for its different config keeps its own. Returns whether it was marked."""
    path = Path(stage_dir) / RUN_STATE
    try:
        state = json.loads(path.read_text())
        written = path.stat().st_mtime
    except (OSError, ValueError):
        return False
    if state.get("status") != "running" or written < since - 1.0:  # 1 s: file systems' coarse mtimes
        return False
    atomic_write_text(path, json.dumps({**state, "status": "failed", "error": error}))
    return True


def stage_weights(run_dir: Path, stage: str, manifest: Mapping[str, Any], needed_by: str) -> tuple[Path, str]:
    """Path and sha256 of a completed stage's exported weights (checked against its manifest)."""
    stage_dir = Path(run_dir) / stage
    try:
        rec = manifest["outputs"]["weights"]
        path = stage_dir / rec["path"]
    except (KeyError, TypeError):
        raise StageInputError(f"stage '{needed_by}': the manifest of '{stage}' in {stage_dir} lists no "
                              f"weights") from None
    if not path.is_file():
        raise StageInputError(f"stage '{needed_by}': weights {path} of stage '{stage}' are missing: rerun "
                              f"stage '{stage}' (overwrite=true)")
    sha = sha256_file(path)
    if rec.get("sha256") and rec["sha256"] != sha:
        raise StageInputError(f"stage '{needed_by}': {path} changed after stage '{stage}' wrote it "
                              f"(sha256 {sha[:12]} != manifest {rec['sha256'][:12]}): rerun stage '{stage}'")
    return path, sha


def check_same_data(info: Any, manifest: Mapping[str, Any], stage: str, needed_by: str) -> None:
    data = manifest.get("data") or {}
    want = (data.get("name"), list(data.get("input_shape") or []), data.get("num_classes"))
    have = (info.name, list(info.input_shape), info.num_classes)
    if data and want != have:
        raise StageInputError(f"stage '{needed_by}': stage '{stage}' was trained on {want[0]} {want[1]} with "
                              f"{want[2]} classes, this run's data is {have[0]} {have[1]} with {have[2]}")


def stage_datamodule(manifest: Mapping[str, Any], data_dir: Optional[str] = None):
    """The datamodule of the data a stage ran on, from its manifest's data settings (so val and test
    are the same inputs: split sizes, subset, seed), on the default data folder or ``data_dir``.
    Manifests keep no data folder or worker count: those belong to the machine."""
    from ace_lightning.data import ACEDataModule

    data = dict((manifest.get("config") or {}).get("data") or {"name": (manifest.get("data") or {})["name"]})
    if data_dir:
        data["data_dir"] = data_dir
    return ACEDataModule(**{**data, "num_workers": 0})


def spec_from_run(run_dir: Path, selection: str = "gate", entropy_stage: str = "entropy",
                  cascade: Optional[Sequence[Mapping[str, Any]]] = None) -> tuple[dict, dict]:
    """(spec, weight paths) of the composed model from the stage manifests of a run folder:
    core/, cert/ and gate/ (selection network); core/ and cert/ (margin selection); for entropy
    selection the cert-net of ``entropy_stage`` (entropy/: co-trained by the entropy stage; cert/:
    the cert stage's net as is); or a ``cascade`` of pairs (``cascade_spec``)."""
    selection = SELECTIONS.canonical(selection)
    chosen = SELECTIONS.get(selection)
    run_dir = Path(run_dir)
    core = require_stage(run_dir, "core", "certify")
    first = (cascade[0] or {}).get("cert", "cert") if cascade else "cert"
    cert = require_stage(run_dir, str(first), "certify")
    for name, manifest in (("core", core), (first, cert)):
        if "net" not in manifest:
            raise StageInputError(f"{run_dir / name / 'manifest.json'} does not say which net it trained (no 'net')")
    data = dict(cert["data"])
    if core["data"]["name"] != data["name"]:
        raise StageInputError(f"run folder mixes datasets: core on {core['data']['name']}, cert on {data['name']}")
    paths = {"core": run_dir / "core" / core["outputs"]["weights"]["path"]}
    if cascade:
        branches, more = cascade_spec(run_dir, cascade)
        paths.update(more)
    else:
        stage = chosen.stage(entropy_stage)
        selector = require_stage(run_dir, stage, "certify")
        branch: dict[str, Any] = {"selection": selection, "threshold": 0.0, "cert_net": cert["net"]}
        if chosen.network:  # the cert stage's net and the selector network of its stage
            paths["cert_0"] = run_dir / "cert" / cert["outputs"]["weights"]["path"]
            paths["gate_0"] = run_dir / stage / selector["outputs"]["weights"]["path"]
            branch["gate_net"] = {**selector["net"], "kind": "gate"}
        else:  # no selector network: the cert-net of the selector's stage (margin: cert/; entropy: entropy_stage)
            paths["cert_0"] = run_dir / stage / selector["outputs"]["weights"]["path"]
            branch["cert_net"] = selector.get("net", cert["net"])
        branches = [branch]
    spec = {"data": {k: data[k] for k in ("name", "input_shape", "num_classes", "mean", "std")},
            "eps": cert.get("eps"), "core_net": core["net"], "branches": branches}
    return spec, paths


def model_from_run(run_dir: Path, selection: str = "gate", entropy_stage: str = "entropy") -> ACEModel:
    """The composed model with trained weights (weights-only loading) and threshold 0."""
    return load_model(*spec_from_run(run_dir, selection, entropy_stage))


def load_model(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> ACEModel:
    """The composed model of ``spec`` with the weights at ``paths`` (from spec_from_run), threshold 0."""
    model = ACEModel.from_spec(spec)
    load_weights(model.core, paths["core"], "core")
    for k in range(model.num_branches):
        load_weights(model.certs[k], paths[f"cert_{k}"], "cert-net" if k == 0 else f"cert-net {k + 1}")
        if f"gate_{k}" in paths:
            load_weights(model.gates[str(k)], paths[f"gate_{k}"], "gate" if k == 0 else f"gate {k + 1}")
    return model.eval()


def cascade_spec(run_dir: Path, cascade: Sequence[Mapping[str, Any]]) -> tuple[list[dict], dict]:
    """Branches and weight paths of a cascade: pairs in order, each ``{cert: <cert stage folder>,
    selection: margin | gate | entropy, gate: <gate stage folder>}`` (gate: default gate for the
    first pair, gate_<k> for pair k + 1, as the gate stage names them; entropy: on the cert-net as
    it is). Every stage must be complete."""
    branches, paths = [], {}
    for k, pair in enumerate(cascade):
        pair = dict(pair or {})
        unknown = set(pair) - {"cert", "selection", "gate"}
        if unknown:
            raise ConfigError(f"cascade pair {k + 1}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"a pair is {{cert: <folder>, selection: margin|gate|entropy, gate: <folder>}}")
        folder, selection = str(pair.get("cert") or "cert"), str(pair.get("selection") or "margin")
        if selection not in SELECTIONS:
            raise ConfigError(f"cascade pair {k + 1}: unknown selection {selection!r}; known: {', '.join(SELECTIONS)}")
        selection = SELECTIONS.canonical(selection)
        cert = require_stage(run_dir, folder, "certify")
        paths[f"cert_{k}"] = run_dir / folder / cert["outputs"]["weights"]["path"]
        branch: dict[str, Any] = {"selection": selection, "threshold": 0.0, "cert_net": cert["net"], "stage": folder}
        if SELECTIONS.get(selection).network:
            gate_folder = str(pair.get("gate") or ("gate" if k == 0 else f"gate_{k}"))
            gate = require_stage(run_dir, gate_folder, "certify")
            paths[f"gate_{k}"] = run_dir / gate_folder / gate["outputs"]["weights"]["path"]
            branch["gate_net"] = {**gate["net"], "kind": "gate"}
        branches.append(branch)
    if not branches:
        raise ConfigError("stage.cascade is empty: give at least one (cert, selection) pair, or null for one pair")
    return branches, paths
