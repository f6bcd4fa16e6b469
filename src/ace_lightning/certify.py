"""The certify stage (conf/stage/certify.yaml): a trained run folder -> records -> sweep and
report -> attack -> the exported composed model (ace_model.pt), table and manifest.

The steps live beside it: the certification pass (certify_pass.py), the records' files
(records.py), sweep and report (sweep.py, operating.py, report.py), the attack (certify_attack.py).
"""
from __future__ import annotations

import json
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn

from ace_lightning.ace import ACEModel, CertifySettings
from ace_lightning.attacks.pgd import check_loss
from ace_lightning.atomic import atomic_write_text
from ace_lightning.certify_attack import ATTACK_DEFAULTS, attack_and_check
from ace_lightning.certify_pass import (SPLITS, compute_records, precision_summary, refine_at_operating_points,
                                        split_loaders)
from ace_lightning.config import datamodule_from, job_eps, to_dict
from ace_lightning.console import log
from ace_lightning.errors import ConfigError
from ace_lightning.records import write_records
from ace_lightning.report import format_table
from ace_lightning.rundir import config_hash, load_model, read_manifest, sha256_file, spec_from_run, write_manifest
from ace_lightning.selections import SELECTIONS


def certify_folder(selection: str, entropy_stage: str = "entropy", cascade: Any = None) -> str:
    """certify/ (gate), certify_margin/ (margin selection on the cert stage's net),
    certify_entropy/ (the entropy stage's cert-net), certify_entropy_<stage>/, certify_cascade/."""
    return "certify_cascade" if cascade else SELECTIONS.get(selection).folder(entropy_stage)


INFERENCE_TIMED = 2048  # test inputs whose plain inference is timed (inference_per_input_ms)


@dataclass
class CertifyJob:
    """What the certify steps share: the run folder's composed model, its data, the settings."""

    cfg: Mapping[str, Any]
    st: dict
    settings: CertifySettings
    eps: float
    run_dir: Path
    stage_dir: Path
    spec: dict
    paths: dict
    ident: dict
    ident_hash: str
    model: Optional[ACEModel] = None
    loaders: Optional[dict] = None
    timing: dict = field(default_factory=dict)
    refinement: dict = field(default_factory=dict)  # refine_at_operating_points' summary
    precision: dict = field(default_factory=dict)   # precision_summary for the manifest
    started: float = field(default_factory=time.perf_counter)

    @property
    def progress(self) -> bool:
        return bool(to_dict(self.cfg["trainer"]).get("enable_progress_bar", True))


def prepare(cfg: Mapping[str, Any]) -> CertifyJob:
    """Validate the certify config and read the run folder's composed model (one-line errors
    before anything is loaded)."""
    st = to_dict(cfg["stage"])
    settings = CertifySettings.from_config(st)
    eps = float(cfg["eps"])
    run_dir = Path(cfg["run_dir"]).resolve()
    selection = st.get("selection", "gate")
    entropy_stage = str(st.get("entropy_stage") or "entropy")
    cascade = st.get("cascade")
    spec, paths = spec_from_run(run_dir, selection, entropy_stage, cascade)
    data_name = to_dict(cfg["data"])["name"]
    if data_name != spec["data"]["name"]:
        raise ConfigError(f"records would come from dataset '{data_name}' but {run_dir} was trained on "
                          f"'{spec['data']['name']}': pass data={spec['data']['name']}")
    ident = {"spec": spec, "weights": {k: sha256_file(p) for k, p in paths.items()}, "eps": eps, "stage": st,
             "data": {k: v for k, v in to_dict(cfg["data"]).items() if k not in ("num_workers", "download", "data_dir")}}
    return CertifyJob(cfg, st, settings, eps, run_dir, run_dir / certify_folder(selection, entropy_stage, cascade),
                      spec, paths, ident, config_hash(ident))


def certify_records(job: CertifyJob) -> Optional[Path]:
    """Step 1: certify every input of the splits (DDP shards them), refine the gate intervals at
    the operating points, write records.csv; returns its path (None on non-zero ranks)."""
    st, settings = job.st, job.settings
    job.model = load_model(job.spec, job.paths)
    dm = datamodule_from(job.cfg)
    batch_size = int(st.get("batch_size", 256))
    job.loaders = split_loaders(dm, st.get("splits", list(SPLITS)), batch_size)
    trainer_cfg = {k: v for k, v in to_dict(job.cfg["trainer"]).items()
                   if k in ("accelerator", "devices", "strategy", "enable_progress_bar")}
    precision = to_dict(job.cfg["trainer"]).get("precision", "32-true")
    if str(precision) not in ("32-true", "32", "None"):
        rank_zero_warn(f"certify runs in full precision ({settings.dtype}); trainer.precision={precision} "
                      f"applies to training only")
    job.stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()  # plain inference of the composed model (what certification costs against),
    timed = 0                 # on the first INFERENCE_TIMED test inputs
    with torch.no_grad():
        for x, _, _ in job.loaders["test"]:
            job.model(x)
            timed += x.shape[0]
            if timed >= INFERENCE_TIMED:
                break
    job.timing["plain_inference_test"] = time.perf_counter() - t0
    job.timing["plain_inference_inputs"] = timed
    t0 = time.perf_counter()
    cols = compute_records(job.model, job.loaders, job.eps, settings, trainer_cfg, work_dir=job.stage_dir)
    job.timing["certification_all_splits"] = time.perf_counter() - t0
    if cols is None:  # non-zero DDP rank: rank 0 does the rest
        return None
    t0 = time.perf_counter()
    job.refinement = refine_at_operating_points(job.model, job.loaders, cols, job.eps, settings,
                                                st.get("thresholds"), st.get("grid", 101),
                                                float(st.get("tolerance", 0.01)), batch_size, job.progress)
    job.timing["refinement"] = time.perf_counter() - t0
    job.precision = precision_summary(cols, settings, precision, job.refinement)
    job.timing["certification_per_input_ms"] = 1000 * job.timing["certification_all_splits"] / max(1, len(cols["index"]))
    job.timing["inference_per_input_ms"] = 1000 * job.timing["plain_inference_test"] / max(1, timed)
    return write_records(cols, job.stage_dir)


def sweep_and_report(records_path: Path, stage_dir: Path, grid: Any = 101, tolerance: float = 0.01) -> dict:
    """Step 2: the exact threshold sweep on val and test, operating points chosen on val,
    sweep_*.csv, operating_points.json and pareto.png; returns report.write_sweep_outputs' dict."""
    from ace_lightning.report import write_sweep_outputs

    return write_sweep_outputs(records_path, stage_dir, grid=grid, tolerance=tolerance)


def export_composed(job: CertifyJob, points: Sequence[dict], operating_point: Optional[str] = None) -> dict:
    """Step 4: the composed model at the chosen operating point (ace_model.pt, certifying as the
    stage did), table.txt and the manifest."""
    stage_dir = job.stage_dir
    summary = json.loads((stage_dir / "operating_points.json").read_text())
    if operating_point is None:  # margin selection: its per-class point when there is one
        keys = {p["key"] for p in summary["operating_points"]}
        operating_point = "per_class" if job.model.selector(0).per_class and "per_class" in keys \
            else "nat_within_1pt"
    chosen = next((p for p in summary["operating_points"] if p["key"] == operating_point), None)
    if chosen is None and summary["operating_points"]:
        chosen = summary["operating_points"][0]
    spec = job.spec
    if chosen is not None:
        T = chosen["threshold"] if isinstance(chosen["threshold"], list) else [chosen["threshold"]]
        T = [float(t) for t in T]
        job.model.set_thresholds(T)
        for branch, t in zip(spec["branches"], T):
            branch["threshold"] = t
        if chosen.get("class_thresholds") is not None:  # margin selection: one kappa per class
            kappa = [float(v) for v in chosen["class_thresholds"]]
            job.model.set_class_thresholds(0, kappa)
            spec["branches"][0]["class_thresholds"] = kappa
    spec["certify"] = job.settings.as_dict()  # ACEModel.predict(eps=) certifies the same way
    job.model.spec = spec
    job.model.save(stage_dir / "ace_model.pt")
    n_test = len(job.loaders["test"].dataset)
    table = format_table(points, title=f"{spec['data']['name']}, eps={job.eps:g}, test split ({n_test} inputs)")
    atomic_write_text(stage_dir / "table.txt", table + "\n")
    log.info(table)
    parquet = stage_dir / "records.parquet"
    return write_manifest(stage_dir, {
        "stage": "certify", "status": "complete", "config_hash": job.ident_hash, "config": job.ident,
        "eps": job.eps, "selection": job.st.get("selection", "gate"),
        "outputs": {"records": "records.csv", **({"records_parquet": parquet.name} if parquet.is_file() else {}),
                    "sweep_val": "sweep_val.csv", "sweep_test": "sweep_test.csv",
                    "operating_points": "operating_points.json", "pareto": "pareto.png",
                    "table": "table.txt", "model": {"path": "ace_model.pt",
                                                    "sha256": sha256_file(stage_dir / "ace_model.pt")}},
        "chosen_operating_point": chosen,
        "certification": job.settings.as_dict(),
        "precision": job.precision,
        "timing_s": dict(job.timing),
        "metrics": {p["key"]: {k: v for k, v in p.items() if k not in ("key", "name")} for p in points},
        "soundness_violations": summary.get("soundness_violations", 0),
        "wall_s": time.perf_counter() - job.started,
    })


def run_certify(cfg: Mapping[str, Any]) -> dict:
    """The certify stage (conf/stage/certify.yaml): records -> sweep/report -> attack -> export,
    skipped when the run folder already holds a complete certification of the same inputs."""
    job = prepare(cfg)
    done = read_manifest(job.stage_dir)
    if done and done.get("status") == "complete" and done.get("config_hash") == job.ident_hash \
            and not cfg.get("overwrite"):
        log.info(f"stage 'certify' already complete in {job.stage_dir} (same inputs): skipped")
        return done
    job.started = time.perf_counter()
    records_path = certify_records(job)
    if records_path is None:
        return {}
    st = job.st
    t0 = time.perf_counter()
    written = sweep_and_report(records_path, job.stage_dir, st.get("grid", 101), float(st.get("tolerance", 0.01)))
    job.timing["sweep_and_report"] = time.perf_counter() - t0
    points = written["points"]
    attack = {**ATTACK_DEFAULTS, **dict(st.get("attack") or {})}
    if attack.get("enabled", True):
        t0 = time.perf_counter()
        attack_and_check(job.model, job.loaders["test"], records_path, job.stage_dir, job.eps, attack, points,
                         job.progress)
        job.timing["attack"] = time.perf_counter() - t0
    manifest = export_composed(job, points, st.get("operating_point"))
    from ace_lightning.summary import write_summary

    write_summary(Path(cfg["runs_root"]).resolve())
    log_to_wandb(cfg, job.stage_dir, points)
    return manifest


def log_to_wandb(cfg: Mapping[str, Any], stage_dir: Path, points: Sequence[Mapping[str, Any]]) -> None:
    """The certify run of the pipeline's wandb group (offline unless the user opted in): its
    config is the job's plus what a dashboard filters by (loggers.run_identity: dataset, eps,
    seed, method, selection); the records' summary per operating point (the table's rows, as a
    wandb Table and as summary values ``<point>/<metric>``), the sweep as Tables, the Pareto plot."""
    import csv
    import math

    from ace_lightning.loggers import run_identity, wandb_mode, wandb_settings

    wb = wandb_settings(cfg)
    mode = wandb_mode(wb)
    if mode is None:
        return
    import wandb

    config = dict(to_dict(cfg))
    config.update(run_identity(cfg, stage_dir.name, read_manifest(stage_dir.parent / "cert")))
    group = str(wb.get("group") or stage_dir.parent.name)
    run = wandb.init(project=wb.get("project", "ace-lightning"), entity=wb.get("entity"), group=group,
                     name=f"{group}/{stage_dir.name}", job_type="certify", dir=str(stage_dir), mode=mode,
                     reinit="finish_previous", config=config)
    metrics = ("nat_acc", "cert_acc", "adv_acc", "cert_route_rate")
    try:
        for split in ("val", "test"):
            path = stage_dir / f"sweep_{split}.csv"
            if path.is_file():
                with open(path, newline="") as fh:
                    rows = list(csv.reader(fh))
                run.log({f"sweep/{split}": wandb.Table(columns=rows[0], data=[[float(v) for v in r] for r in rows[1:]])})

        def number(v: Any) -> Any:  # +-inf thresholds (core / cert-net alone) as text: JSON has no inf
            return str(v) if isinstance(v, float) and not math.isfinite(v) else v
        run.log({"operating_points": wandb.Table(
            columns=["point", "name", "threshold", *metrics], allow_mixed_types=True,
            data=[[p["key"], p.get("name"), number(p.get("threshold")), *[p.get(k) for k in metrics]] for p in points])})
        run.log({"pareto": wandb.Image(str(stage_dir / "pareto.png"))})
        for p in points:
            for k in metrics:
                if isinstance(p.get(k), (int, float)):
                    run.summary[f"{p['key']}/{k}"] = p[k]
    finally:
        run.finish()


def check_certify(cfg: Mapping[str, Any]) -> None:
    """The certify stage's knobs (one-line ConfigErrors before any folder is made)."""
    st = to_dict(cfg["stage"])
    eps = job_eps(cfg)
    if not 0.0 <= eps <= 1.0:
        raise ConfigError(f"eps must be in [0, 1] (pixel space, e.g. 2/255 = 0.00784), got {eps}")
    CertifySettings.from_config(st)
    cascade = st.get("cascade")
    if cascade is not None:
        if not isinstance(cascade, list) or not cascade:
            raise ConfigError("stage.cascade must be a list of (cert, selection) pairs, e.g. [{cert: cert_2, "
                              "selection: margin}, {cert: cert, selection: margin}], or null for one pair")
        for k, pair in enumerate(cascade):
            pair = pair if isinstance(pair, Mapping) else {"?": pair}
            unknown = set(pair) - {"cert", "selection", "gate"}
            if unknown:
                raise ConfigError(f"cascade pair {k + 1}: unknown key(s) {', '.join(sorted(unknown))}; "
                                  f"a pair is {{cert: <folder>, selection: margin|gate|entropy, gate: <folder>}}")
            if str(pair.get("selection") or "margin") not in SELECTIONS:
                raise ConfigError(f"cascade pair {k + 1}: unknown selection {pair.get('selection')!r}; "
                                  f"known: {', '.join(SELECTIONS)}")
    elif st.get("selection", "gate") not in SELECTIONS:
        raise ConfigError(f"unknown selection {st.get('selection')!r}; known: {', '.join(SELECTIONS)}")
    splits = st.get("splits") or []
    bad = [s for s in (splits if isinstance(splits, list) else [splits]) if s not in ("val", "test")]
    if bad or not isinstance(splits, list):
        raise ConfigError(f"unknown split {(bad or [splits])[0]!r}; certify knows val and test")
    batch = st.get("batch_size", 256)
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ConfigError(f"stage.batch_size must be a whole number >= 1, got {batch!r}")
    if not float(st.get("tolerance", 0.01)) >= 0:
        raise ConfigError(f"stage.tolerance must be >= 0, got {st.get('tolerance')}")
    attack = dict(st.get("attack") or {})
    check_loss(str(attack.get("loss", "margin")))


class CertifyStage:
    """The certify stage as the registry sees it (registry.STAGES): its checks and its run. It
    trains nothing, so the training stages' runner (stages/runner.py) is not involved."""

    name = "certify"

    @staticmethod
    def configure(cfg: Mapping[str, Any]) -> None:
        check_certify(cfg)

    @staticmethod
    def run(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
        manifest = run_certify(cfg)
        st = to_dict(cfg["stage"])
        stage_dir = Path(cfg["run_dir"]).resolve() / certify_folder(st.get("selection", "gate"),
                                                                     str(st.get("entropy_stage") or "entropy"),
                                                                     st.get("cascade"))
        if manifest:  # rank zero: where the results are (the table was printed above)
            log.info(f"stage 'certify' results: {stage_dir} (table.txt, records.csv, operating_points.json, "
                     f"pareto.png, ace_model.pt)")
        return manifest


STAGE = CertifyStage()
