"""A search over compositions (``stage=pipeline experiment=search_fmnist``: a multirun of
``hydra/sweeper=optuna``, NSGA-II): each trial is one pipeline job in its own run folder
(``run_name: .../${trial_folder:}``), and the value it hands the sweeper is read from the certify
stage's files on the VALIDATION split only (choosing on test would inflate the numbers;
``action=compare`` shows the trials' test front).

Objectives (``search.objective``): ``nat_cert``, the natural and certified accuracy of the
composition at its val-chosen operating point (the one ace_model.pt exports, the certify stage's
``operating_point``; two directions, both maximize); ``mean_cert``, the val curve's mean certified
accuracy over natural accuracies from ``search.nat_from`` to the core's (compare.mean_certified;
one direction). Trials share the core: a sibling trial's complete core/ with this trial's config
hash is copied in, so the pipeline skips it as any complete stage with the same config.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ace_lightning.atomic import atomic_write_text
from ace_lightning.compare import TRIAL_FILE, mean_certified
from ace_lightning.config import to_dict
from ace_lightning.console import log
from ace_lightning.errors import ConfigError, StageInputError
from ace_lightning.resolvers import job_num

OBJECTIVES = {"nat_cert": 2, "mean_cert": 1}  # objective -> the number of directions the sweeper needs
DEFAULTS = {"objective": "nat_cert", "nat_from": 0.0, "share_core": True}


def search_settings(cfg: Any) -> dict[str, Any]:
    """``search`` of the job's config with its defaults, checked (one-line ConfigError)."""
    given = to_dict(cfg.get("search")) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"search must map knobs to values ({', '.join(DEFAULTS)}), got {given!r}")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"search.{unknown[0]}: unknown knob; known: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **given}
    if out["objective"] not in OBJECTIVES:
        raise ConfigError(f"search.objective={out['objective']!r}: known {', '.join(OBJECTIVES)}")
    nat_from = out["nat_from"]
    if isinstance(nat_from, bool) or not isinstance(nat_from, (int, float)) or not 0.0 <= nat_from <= 1.0:
        raise ConfigError(f"search.nat_from must be a natural accuracy in [0, 1], got {nat_from!r}")
    return out


def check_sweeper(config: Any) -> None:
    """Before a search's first trial: its objective against the optuna sweeper's directions
    (nat_cert returns two numbers, mean_cert one; all are maximized)."""
    if not config.get("search"):
        return
    objective = search_settings(config)["objective"]
    if str(config.stage.get("name")) != "pipeline":
        raise ConfigError(f"a search's trial is a pipeline job: stage=pipeline, got stage={config.stage.get('name')}")
    sweeper = config.hydra.get("sweeper") or {}
    if "optuna" not in str(sweeper.get("_target_", "")):
        return
    direction = sweeper.get("direction")
    if isinstance(direction, str) or not hasattr(direction, "__iter__"):
        direction = [direction]
    directions = [str(getattr(d, "name", d)) for d in direction]  # strings, or optuna's Direction enum
    want = OBJECTIVES[objective]
    if len(directions) != want or set(directions) != {"maximize"}:
        need = "[maximize,maximize]" if want == 2 else "maximize"
        raise ConfigError(f"search.objective={objective} returns {want} number(s) to maximize: "
                          f"hydra.sweeper.direction={need}, got {directions}")


def certify_dir(cfg: Any) -> Path:
    """The certify stage's folder of this pipeline job (certify_margin/, certify_entropy_cert/, ...)."""
    from ace_lightning.certify import certify_folder
    from ace_lightning.registry import stage_config

    st = to_dict(stage_config(cfg, "certify")["stage"])
    name = certify_folder(str(st.get("selection", "gate")), str(st.get("entropy_stage") or "entropy"),
                          st.get("cascade"))
    return Path(str(cfg["run_dir"])).resolve() / name


def share_core(cfg: Any) -> Optional[Path]:
    """Copy a sibling trial's complete core/ into this trial's run folder when it was made with this
    trial's config hash (the search does not touch the core); the copy is atomic (a folder moved
    into place). Returns the folder copied, None when this trial trains its own core."""
    from ace_lightning.registry import stage_config
    from ace_lightning.rundir import config_hash, identity_config, read_manifest

    run_dir = Path(str(cfg["run_dir"])).resolve()
    if (run_dir / "core").exists():
        return None
    core = stage_config(cfg, "core")
    # the identity the runner records (stages/runner.py); a mismatch only means no copy
    want = config_hash(identity_config(core, {"net": to_dict(core["core_net"]), "inputs": {}}))
    for sibling in sorted(run_dir.parent.glob("*/core")):
        manifest = read_manifest(sibling) or {}
        if sibling.parent == run_dir or manifest.get("status") != "complete" or manifest.get("config_hash") != want:
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".core.copy-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(sibling, tmp, ignore=shutil.ignore_patterns("wandb"))
        os.replace(tmp, run_dir / "core")
        log.info(f"search: core/ of {sibling.parent.name} (same config) copied into {run_dir}")
        return sibling
    return None


def _read_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def trial_values(stage_dir: Path, objective: str, nat_from: float = 0.0) -> tuple[float, ...]:
    """The objective(s) of a certified run folder, from its certify stage's files, val split only."""
    from ace_lightning.rundir import read_manifest

    manifest = read_manifest(stage_dir) or {}
    if manifest.get("status") != "complete":
        raise StageInputError(f"search: no complete certify stage in {stage_dir}")
    if objective == "nat_cert":
        chosen = manifest.get("chosen_operating_point") or {}
        if "val" not in chosen:
            raise StageInputError(f"search: {stage_dir} chose no operating point on val (certify the val split)")
        return float(chosen["val"]["nat_acc"]), float(chosen["val"]["cert_acc"])
    points = json.loads((stage_dir / "operating_points.json").read_text())
    curve = [r for name in ("sweep_val.csv", "sweep_val_per_class.csv") if (stage_dir / name).is_file()
             for r in _read_rows(stage_dir / name)]  # margin selection: one kappa, and a kappa per class
    if not curve or points.get("core_nat_val") is None:
        raise StageInputError(f"search: {stage_dir} has no val curve (certify the val split)")
    return (mean_certified(curve, float(nat_from), float(points["core_nat_val"])),)


def run_trial(cfg: Any, run: Callable[[], Any]) -> Union[float, tuple[float, ...], None]:
    """One trial: the core shared when it can be, the pipeline job (``run``), then its value for the
    sweeper, recorded in <run_dir>/trial.json with the trial's searched knobs (status running, then
    complete with the values; compare.py reads it)."""
    from ace_lightning.console import global_rank
    from ace_lightning.rundir import read_manifest

    settings = search_settings(cfg)
    path = Path(str(cfg["run_dir"])).resolve() / TRIAL_FILE
    record = {"trial": job_num(), "status": "running", "objective": settings["objective"], "split": "val",
              "nat_from": settings["nat_from"] if settings["objective"] == "mean_cert" else None,
              "params": _swept_params()}
    if global_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        if settings["share_core"]:
            share_core(cfg)
    try:
        run()
    except BaseException as err:  # the trial failed: say so in trial.json (the sweeper records it)
        if global_rank() == 0:
            from ace_lightning.errors import error_line

            failed = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            record.update(status=failed, error=None if failed == "interrupted" else error_line(err))
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        raise
    if global_rank() != 0:
        return None
    stage_dir = certify_dir(cfg)
    values = trial_values(stage_dir, settings["objective"], settings["nat_from"])
    chosen = (read_manifest(stage_dir) or {}).get("chosen_operating_point") or {}
    record.update(status="complete", values=list(values), certify=stage_dir.name, operating_point=chosen.get("key"))
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    log.info(f"search: trial {record['trial']} {settings['objective']} (val) = "
             + ", ".join(f"{v:.4f}" for v in values))
    return values if len(values) > 1 else values[0]


def _swept_params() -> dict[str, str]:
    """The trial's values of the sweeper's searched knobs (hydra.sweeper.params), as overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:  # not under Hydra
        return {}
    searched = set((to_dict(hc.sweeper.get("params")) or {}) if "sweeper" in hc else {})
    pairs = (o.split("=", 1) for o in hc.overrides.task if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs if k.lstrip("+~") in searched}
