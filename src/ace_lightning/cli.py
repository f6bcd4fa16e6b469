"""Hydra entry point for a trained run folder and its records (conf/certify.yaml):

    python -m ace_lightning.cli action=certify run_dir=runs/mnist/eps_0.1
    python -m ace_lightning.cli action=sweep records=runs/mnist/eps_0.1/certify/records.csv
    python -m ace_lightning.cli action=plot sweep=runs/mnist/eps_0.1/certify/sweep_test.csv out=p.png
    python -m ace_lightning.cli action=compare runs=[runs/a/eps_0.1,runs/b/eps_0.1] out_dir=cmp
    python -m ace_lightning.cli action=audit run_dir=runs/mnist/eps_0.1 audit.steps=100 audit.restarts=10

certify composes the train config for ``stage=certify`` from the run folder's manifests and runs
the certify stage; sweep and plot only read files. audit re-checks a certified folder's
certificates with independent tools (reference bounds, attacks, a MILP; docs/METHOD.md section
13), writes audit.json beside the records and prints one verdict line per folder: exit code 1
when a concrete point contradicts a record. Bad input exits with code 2 and one line; everything
is checked before the first file is written.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig

from ace_lightning.config import to_dict
from ace_lightning.console import log, setup_console
from ace_lightning.errors import USER_ERRORS, fail, fail_on, hydra_entry, hydra_error_line
from ace_lightning.errors import ConfigError, InputNotFoundError

SPLITS = ("val", "test")
PLOT_COLUMNS = ("threshold", "nat_acc", "cert_acc", "cert_route_rate")
FORWARDED = ("data", "trainer")  # config groups of conf/certify.yaml that belong to the train config
RUN_FOLDER = "ace_certify"  # the config group (Hydra's ConfigStore) of what certify_config reads from the run folder


def _required(cfg: DictConfig, key: str, what: str) -> str:
    if cfg.get(key) in (None, ""):
        raise ConfigError(f"action={cfg.action} needs {key}=<{what}>")
    return str(cfg[key])


def _grid(value: Any) -> Optional[int | list[float]]:
    """The grid as sweep.threshold_grid takes it; an empty one is refused before any work."""
    value = to_dict(value)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"threshold grid is empty (grid={value}): pass grid=<k >= 1> or a list of thresholds")
        return value
    if not isinstance(value, list):
        raise ConfigError(f"grid={value!r}: pass a number of quantiles (grid=101) or a list (grid=[0.0,0.5])")
    if not value:
        raise ConfigError("threshold grid is empty (grid=[]): pass grid=<k >= 1> or a list of thresholds")
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"grid={value!r}: every threshold must be a number") from None


# -- action=certify --------------------------------------------------------------------------------

def _command_line() -> tuple[dict[str, str], list[str]]:
    """The command line's config groups of the train config (``data=``, ``trainer=``) and its
    ``data.<key>=`` / ``trainer.<key>=`` overrides as typed (``++``: add or replace there)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    groups = {g: hc.runtime.choices.get(g) for g in FORWARDED if hc.runtime.choices.get(g)}
    dotted = [o if o.startswith("~") else "++" + o.lstrip("+") for o in hc.overrides.task
              if o.lstrip("+~").split("=")[0].split(".")[0] in FORWARDED and "." in o.split("=")[0]]
    return groups, dotted


def certify_config(cfg: DictConfig, groups: dict[str, str], dotted: list[str]) -> DictConfig:
    """The train config of ``stage=certify`` on ``cfg.run_dir``, composed once. Precedence, lowest first:

    1. conf/train.yaml with ``stage=certify`` and the groups ``data=`` (default: the dataset the
       cert-net was trained on) and ``trainer=`` of the command line;
    2. the run folder: the cert-net's data settings (same dataset: the same val/test inputs), eps
       and seed; the stage settings of the folder's last certify; runs_root beside the folder;
    3. the knobs of conf/certify.yaml that are set (eps, selection, methods, ..., overwrite);
    4. the command line's ``data.<key>=`` / ``trainer.<key>=`` overrides;
    5. ``overrides=[...]``.

    2 and 3 are one config node that Hydra merges after the defaults list (RUN_FOLDER), so the
    user's own overrides (4, 5) are applied after it, as typed."""
    from hydra import compose
    from hydra.core.config_store import ConfigStore

    from ace_lightning.certify import certify_folder
    from ace_lightning.rundir import read_manifest, spec_from_run

    run_dir = Path(_required(cfg, "run_dir", "run folder")).resolve()
    if not run_dir.is_dir():
        raise InputNotFoundError(f"run folder not found: {run_dir}")
    entropy_stage = str(cfg.get("entropy_stage") or "entropy")
    selection = cfg.selection or ("entropy" if cfg.get("entropy_stage") else
                                  next((s for s in ("gate", "entropy") if read_manifest(run_dir / s)), "margin"))
    spec_from_run(run_dir, selection, entropy_stage)  # every stage the composed model needs, before anything runs
    cert = read_manifest(run_dir / "cert")
    trained = dict(cert.get("config", {}).get("data") or {"name": cert["data"]["name"]})
    data = groups.get("data") or trained["name"]
    eps = float(cfg.eps if cfg.eps is not None else cert["eps"])
    if not 0 <= eps <= 1:
        raise ConfigError(f"eps must be in [0, 1] (pixel space, e.g. 2/255 = 0.00784), got {eps}")
    # the layout train.yaml makes is <runs_root>/<data>/eps_<eps>: summary.csv goes to runs_root; any
    # other folder is a run of its parent (the summary lands next to it, never inside it)
    runs_root = run_dir.parents[1] if run_dir.name.startswith("eps_") else run_dir.parent
    node: dict[str, Any] = {"run_dir": str(run_dir), "runs_root": str(runs_root), "eps": eps}
    if data == trained["name"]:  # the same val/test inputs as in training
        node["data"] = {k: v for k, v in trained.items() if k != "name"}
    if cert.get("config", {}).get("seed") is not None:
        node["seed"] = int(cert["config"]["seed"])
    last = (read_manifest(run_dir / certify_folder(selection, entropy_stage)) or {}).get("config", {}).get("stage")
    stage = {k: v for k, v in last.items() if k not in ("name", "epochs", "grad_clip")} if isinstance(last, dict) else {}
    knobs = {"selection": selection, "entropy_stage": entropy_stage if selection == "entropy" else None,
             "batch_size": cfg.batch_size, "grid": _grid(cfg.grid),
             **{k: to_dict(cfg.get(k)) for k in ("methods", "gate_methods", "refine_methods", "thresholds",
                                                "time_budget_s", "dtype", "recheck_tol")}}
    node["stage"] = {**stage, **{k: v for k, v in knobs.items() if v is not None}}
    node["overwrite"] = bool(cfg.overwrite)
    ConfigStore.instance().store(group=RUN_FOLDER, name="run_folder", node=node, package="_global_")
    return compose(config_name="train", overrides=[
        "stage=certify", f"data={data}", f"trainer={groups.get('trainer', 'default')}", f"+{RUN_FOLDER}=run_folder",
        *dotted, *[str(o) for o in to_dict(cfg.overrides) or []]])


def run_certify_action(cfg: DictConfig) -> dict:
    from ace_lightning.registry import run_stage

    return run_stage(certify_config(cfg, *_command_line()))


# -- action=sweep ----------------------------------------------------------------------------------

def run_sweep_action(cfg: DictConfig) -> dict:
    from ace_lightning.report import format_table, write_sweep_outputs
    from ace_lightning.records import load_records, split_set

    path = _required(cfg, "records", "records.csv")
    grid = _grid(cfg.grid)
    tolerance = cfg.tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ConfigError(f"tolerance={tolerance!r}: pass a non-negative accuracy difference, e.g. 0.01")
    records = load_records(path)
    if cfg.split is not None:
        if cfg.split not in SPLITS:
            raise ConfigError(f"split={cfg.split!r}: pass split=val, split=test or split=null")
        if "split" in records and cfg.split not in records.splits:
            raise ConfigError(f"records in {path} hold split(s) {split_set(records.splits)}, not "
                             f"{cfg.split!r}: pass split=null or certify the {cfg.split} split")
        records = records.split(cfg.split)
    out_dir = cfg.out_dir or os.path.dirname(os.path.abspath(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_sweep_outputs(records, out_dir, grid=grid, tolerance=float(tolerance))
    for w in caught:
        print(f"warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    shown = written["shown_split"]
    n = len(records.split(shown))
    log.info(format_table(written["points"], title=f"{path}: {shown} split ({n} inputs)"))
    files = [os.path.basename(written[k]) for k in ("sweep_val", "sweep_test", "operating_points", "pareto")
             if k in written]
    log.info(f"wrote {', '.join(files)} in {out_dir}")
    return written


# -- action=plot -----------------------------------------------------------------------------------

def read_sweep_csv(path: str) -> list[dict[str, float]]:
    """Rows of a sweep CSV (report.py writes them: threshold and rates, +-inf thresholds)."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"sweep file not found: {path} (action=sweep writes it)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in PLOT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path} is not a sweep CSV: it lacks column(s) {', '.join(missing)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append({k: float(v) for k, v in row.items() if k is not None})
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: line {line} holds a value that is not a number") from None
    if not rows:
        raise ConfigError(f"{path} holds no sweep rows: run action=sweep first")
    return rows


def read_points(path: str, shown: str) -> tuple[list[dict], list[dict]]:
    """(reference networks, operating points) of operating_points.json with their ``shown``-split
    numbers (val numbers for a point that has no test ones), as plot_pareto draws them."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"operating points file not found: {path} (action=sweep writes it)")
    try:
        summary = json.loads(Path(path).read_text())
        groups = []
        for group in ("reference_points", "operating_points"):
            groups.append([{"key": p["key"], "name": p["name"],
                            "threshold": None if p["threshold"] is None else float(p["threshold"]),
                            **(p.get(shown) or p.get("val") or p["test"])} for p in summary[group]])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not an operating_points.json ({type(err).__name__}: {err})") from None
    return groups[0], groups[1]


def run_plot_action(cfg: DictConfig) -> str:
    from ace_lightning.report import PLOT_FILE, plot_pareto

    if not cfg.sweep and not cfg.sweep_val:
        raise ConfigError("action=plot needs sweep=<sweep_test.csv> (and/or sweep_val=<sweep_val.csv>)")
    rows_test = read_sweep_csv(str(cfg.sweep)) if cfg.sweep else None
    rows_val = read_sweep_csv(str(cfg.sweep_val)) if cfg.sweep_val else None
    refs, points = read_points(str(cfg.points), "test" if cfg.sweep else "val") if cfg.points else ([], [])
    out = str(cfg.out or os.path.join(os.path.dirname(os.path.abspath(str(cfg.sweep or cfg.sweep_val))), PLOT_FILE))
    plot_pareto(out, rows_test, rows_val, refs, points)
    log.info(f"wrote {out}")
    return out


# -- action=compare --------------------------------------------------------------------------------

def run_compare_action(cfg: DictConfig) -> dict:
    from ace_lightning.ace import CertifySettings
    from ace_lightning.compare import compare_runs

    runs = to_dict(cfg.runs)
    if isinstance(runs, str):
        runs = [runs]
    if not runs:
        raise ConfigError("action=compare needs runs=[<run folder>,...] (each holding cert/, and certify/ for ACE)")
    steps = cfg.attack_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"attack_steps={steps!r}: pass a number of PGD steps >= 1")
    settings = CertifySettings.from_config({k: to_dict(cfg.get(k)) for k in (
        "methods", "gate_methods", "refine_methods", "time_budget_s", "dtype", "recheck_tol") if cfg.get(k) is not None})
    out_dir = cfg.out_dir or "compare"
    result = compare_runs(runs, out_dir, settings, data_dir=cfg.data_dir, attack_steps=steps,
                          progress=bool(cfg.progress))
    log.info("\n".join(result["summary"] + [f"note: {n}" for n in result["notes"]]))
    log.info(f"wrote compare.csv, compare.png, compare.md in {Path(out_dir).resolve()}")
    return result


# -- action=audit ----------------------------------------------------------------------------------

def run_audit_action(cfg: DictConfig) -> list[dict]:
    """Audit every certified folder of ``run_dir`` (or ``audit.stage``); exit code 1 on a violation."""
    from ace_lightning.audit import audit_run
    from ace_lightning.audit_claims import AuditSettings

    run_dir = _required(cfg, "run_dir", "run folder")
    knobs = dict(to_dict(cfg.audit) or {})
    knobs.update({k: to_dict(cfg.get(k)) for k in ("split", "data_dir", "progress") if cfg.get(k) is not None})
    reports = audit_run(Path(run_dir), AuditSettings.from_config(knobs))
    if any(r["violations"] for r in reports):
        sys.exit(1)  # a soundness failure, not a user error (2)
    return reports


def main() -> None:
    """``ace-certify``: Hydra's own errors (a key the config lacks, an unknown option) are one line too."""
    hydra_entry(certify_main)


@hydra.main(version_base="1.3", config_path="conf", config_name="certify")
def certify_main(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    setup_console()
    actions = {"certify": run_certify_action, "sweep": run_sweep_action, "plot": run_plot_action,
               "compare": run_compare_action, "audit": run_audit_action}
    try:
        if cfg.action not in actions:
            raise ConfigError(f"action={json.dumps(to_dict(cfg.action))}: pass action=certify, action=sweep, "
                             f"action=plot, action=compare or action=audit")
        actions[cfg.action](cfg)
    except USER_ERRORS as err:  # one line for the user; tracebacks are for bugs
        fail_on(err)
    except HydraException as err:  # composing the train config: overrides=[...] with an unknown knob
        fail(hydra_error_line(err))


if __name__ == "__main__":
    main()
