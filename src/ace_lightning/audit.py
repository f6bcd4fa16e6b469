"""An independent check of a run folder's certificates: ``ace-certify action=audit run_dir=...``
(docs/METHOD.md section 13).

The certify stage's records claim, per input, bounds over the ball: a certified margin of the
cert-net, an interval [lb_g, ub_g] of the selector; ace_model.pt answers at its exported
thresholds. A user who did not write the bound code re-checks those claims here with tools that
share no code with it:

(a) the reference bounds (bounds/reference.py: pure torch, dense, float64, no auto_LiRPA)
    recompute every certificate the composed model relies on, with the method the records say
    decided it, and the gate intervals that decide routing at the exported threshold;
(b) attacks on every certified input: on each bound itself (a point below a certified margin or
    outside the recorded gate interval) and on the composed model as deployed; AutoAttack too
    when it is installed;
(c) an exact MILP (bounds/milp.py) on a sample: the true minimum margin against the certified one.

Only a concrete point that contradicts a record is a *violation* (exit code 1): the attacks and
the MILP give such points. A certificate the reference does not reproduce is *unconfirmed* and
listed with its index: a sound bound can be tighter than the reference (alpha-CROWN), so that
alone proves nothing. Everything is written to <certify folder>/audit.json.

This module reads the folder and writes the report; the claims: audit_claims.py; (a) and (c):
audit_bounds.py; (b): audit_attacks.py.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from ace_lightning.ace import ACEModel
from ace_lightning.atomic import atomic_write_text
from ace_lightning.audit_attacks import attack_check, autoattack_check
from ace_lightning.audit_bounds import milp_check, reference_check
from ace_lightning.audit_claims import AuditSettings, class_thresholds, listed, read_claims
from ace_lightning.console import log
from ace_lightning.errors import InputNotFoundError, StageInputError

AUDIT_FILE = "audit.json"


# -- the run folder --------------------------------------------------------------------------------

def certified_folders(run_dir: Path, stage: Optional[str] = None) -> list[Path]:
    """The complete certify stage folders of ``run_dir`` (certify/ first; folders moved aside as
    <stage>.old-<time> are not audited), or the one named ``stage``; one-line errors otherwise."""
    from ace_lightning.compare import certified_folders as with_sweeps
    from ace_lightning.rundir import read_manifest

    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise InputNotFoundError(f"run folder not found: {run_dir}")
    if stage:
        folder = run_dir / stage
        manifest = read_manifest(folder) if folder.is_dir() else None
        if not manifest or manifest.get("status") != "complete" or manifest.get("stage") != "certify":
            raise StageInputError(f"{folder} is not a complete certify stage: run action=certify first")
        return [folder]
    found = [p for p in with_sweeps(run_dir) if ".old-" not in p.name
             and (read_manifest(p) or {}).get("status") == "complete" and (p / "ace_model.pt").is_file()]
    if not found:
        raise StageInputError(f"{run_dir} has no complete certify stage to audit: run action=certify first")
    return found


def _stage_files(stage_dir: Path) -> tuple[dict, Path]:
    """The certify manifest and the records file, with the exported model checked against the
    sha256 the manifest recorded (the records describe that model and no other)."""
    from ace_lightning.rundir import read_manifest, sha256_file

    manifest = read_manifest(stage_dir) or {}
    if manifest.get("status") != "complete":
        raise StageInputError(f"{stage_dir} is not a complete certify stage: run action=certify first")
    for name in ("ace_model.pt", "records.csv", "operating_points.json"):
        if not (stage_dir / name).is_file():
            raise StageInputError(f"{stage_dir} lacks {name}: run action=certify again (overwrite=true)")
    want = ((manifest.get("outputs") or {}).get("model") or {}).get("sha256")
    if want and sha256_file(stage_dir / "ace_model.pt") != want:
        raise StageInputError(f"{stage_dir / 'ace_model.pt'} changed after the certify stage wrote it (sha256 differs "
                              f"from its manifest): the records describe another model; certify again")
    return manifest, stage_dir / "records.csv"


def audit_inputs(manifest: Mapping[str, Any], records, split: str, data_dir: Optional[str] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the records index (records' ``index``: position in the split's dataset), from
    the data the certify stage ran on (its manifest's data settings: the same splits); checked
    against the records' labels."""
    from ace_lightning.rundir import stage_datamodule

    dm = stage_datamodule(manifest, data_dir)
    dm.setup("test")
    base = (dm.test_set if split == "test" else dm.val_set).dataset
    index = np.asarray(records["index"]).astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= len(base)):
        raise StageInputError(f"records index inputs up to {int(index.max())}, the {split} split of "
                              f"{dm.name} has {len(base)}: not the data the records were made on")
    items = [base[int(i)] for i in index]
    x = torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items])
    y = torch.as_tensor([int(it[1]) for it in items])
    if "label" in records:
        bad = np.flatnonzero(y.numpy() != np.asarray(records["label"]).astype(np.int64))
        if bad.size:
            raise StageInputError(f"the {split} input with index {int(index[bad[0]])} has label {int(y[bad[0]])} in "
                                  f"{dm.data_dir}, {int(records['label'][bad[0]])} in the records: not the data "
                                  f"the records were made on (pass data_dir=...)")
    return x, y


# -- one certify folder ----------------------------------------------------------------------------

def audit_stage(stage_dir: Path, s: AuditSettings) -> dict:
    """Audit one certify folder; writes <stage_dir>/audit.json atomically and returns its content."""
    from ace_lightning.records import load_records

    t0 = time.perf_counter()
    stage_dir = Path(stage_dir).resolve()
    manifest, records_path = _stage_files(stage_dir)
    records = load_records(records_path, split=s.split)
    model = ACEModel.load(stage_dir / "ace_model.pt").eval()
    if records.n_pairs != model.num_branches:
        raise StageInputError(f"{records_path} holds {records.n_pairs} pair(s), ace_model.pt {model.num_branches}")
    eps = float(manifest.get("eps", model.spec.get("eps")))
    thresholds = model.thresholds.double().numpy()  # exactly what the exported model compares with
    claims = read_claims(records, thresholds, class_thresholds(model))
    x, y = audit_inputs(manifest, records, s.split, s.data_dir)
    certification = dict(manifest.get("certification") or model.spec.get("certify") or {})
    chosen = manifest.get("chosen_operating_point") or {}
    log.info(f"audit {stage_dir}: {int(claims.certified.sum()):,} of {len(claims.index):,} {s.split} inputs certified "
             f"at the exported threshold(s) {[float(t) for t in thresholds]}")
    report: dict[str, Any] = {
        "stage_dir": str(stage_dir), "split": s.split, "eps": eps, "inputs": int(len(claims.index)),
        "thresholds": [float(t) for t in thresholds], "certified": int(claims.certified.sum()),
        "selection": list(model.selection), "settings": s.as_dict(),
        "records_at_chosen_point": {
            "threshold": chosen.get("threshold"),
            "cert_acc": (chosen.get("test") or {}).get("cert_acc") if s.split == "test" else None,
            "cert_acc_at_exported_threshold": float(claims.certified.mean())}}
    proven = None
    if s.reference:
        report["reference"], proven = reference_check(model, x, y, claims, eps, certification, s)
    else:
        report["reference"] = {"ran": False, "reason": "reference=false"}
    bad: set[int] = set()  # the inputs (dataset indices) some check found a concrete counterexample for
    report["attack"] = attack_check(model, x, y, claims, eps, s, bad, proven)
    report["autoattack"] = autoattack_check(model, x, y, claims, eps, s, bad)
    report["milp"] = milp_check(model, x, y, claims, eps, s, bad)
    report["violations"] = len(bad)
    report["violating_inputs"] = listed(sorted(bad))
    report["wall_s"] = time.perf_counter() - t0
    atomic_write_text(stage_dir / AUDIT_FILE, json.dumps(report, indent=2, default=_json_default))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def verdict(report: Mapping[str, Any]) -> str:
    """The one line the CLI prints per audited folder."""
    a = report["attack"]
    parts = [f"attack {a['steps']}x{a['restarts']} {a['seconds']:.0f} s"]
    ref = report["reference"]
    parts.append(f"reference confirmed {ref['confirmed']:,}/{ref['certified']:,}" if ref.get("ran")
                 else "no reference")
    aa = report["autoattack"]
    parts.append(f"AutoAttack {aa['attacked']:,} inputs" if aa.get("ran") else
                 f"AutoAttack {'not installed' if 'not installed' in str(aa.get('reason')) else 'off'}")
    milp = report["milp"]
    if milp.get("ran"):
        solved = sum(p.get("solved", 0) for p in milp["pairs"])
        sampled = sum(p.get("sampled", 0) for p in milp["pairs"])
        gaps = [p["mean_gap_certified"] for p in milp["pairs"] if p.get("mean_gap_certified") is not None]
        robust = sum(p.get("uncertified_robust", 0) for p in milp["pairs"])
        open_ = sum(p.get("uncertified_sampled", 0) for p in milp["pairs"])
        proved = sum(p.get("certified_proved", 0) for p in milp["pairs"])
        certified = sum(p.get("certified_sampled", 0) for p in milp["pairs"])
        parts.append(f"MILP {solved}/{sampled} solved" + (f", mean gap {np.mean(gaps):.3g}" if gaps else "")
                     + f", {proved}/{certified} certified margins proved, {robust}/{open_} uncertified robust")
    else:
        parts.append(f"MILP not run: {milp.get('reason')}")
    parts.append(f"{report['wall_s']:.0f} s")
    n = report["violations"]
    return (f"audit: {n:,} violation{'s' if n != 1 else ''} in {report['certified']:,} certified inputs "
            f"({'; '.join(parts)}) -> {Path(report['stage_dir']) / AUDIT_FILE}")


def audit_run(run_dir: Path, s: AuditSettings) -> list[dict]:
    """Audit every certified folder of ``run_dir`` (or ``s.stage``); one verdict line each."""
    reports = []
    for folder in certified_folders(run_dir, s.stage):
        report = audit_stage(folder, s)
        log.info(verdict(report))
        reports.append(report)
    return reports
