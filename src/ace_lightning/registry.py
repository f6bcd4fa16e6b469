"""Stage name -> Stage (each stage module declares its own), the pipeline job that runs stages in
order, and the bookkeeping of one launcher job (job.json).

Adding a stage = its module under stages/ (with its ``STAGE``, found here) + conf/stage/<name>.yaml.
This module sits above the stages and the certify stage (it imports them; nothing below imports it).

Per-stage settings have one dialect, ``stage_overrides.<stage>.<knob>``, whatever runs the stage:
a single stage job (``stage=cert``), a chain of jobs (``-m stage=core,cert,...`` with the basic
launcher) or one pipeline job (``stage=pipeline``, any launcher).
"""
from __future__ import annotations

import numbers
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

from ace_lightning import certify
from ace_lightning.config import CONF_DIR, check_knobs, job_eps, to_dict
from ace_lightning.console import log
from ace_lightning.errors import USER_ERRORS, ConfigError, did_you_mean
from ace_lightning.registries import Registry


class JobStage(Protocol):
    """What the registry needs of a stage: its checks (``configure``: one-line errors before
    anything is written) and its run. The training stages are stages.runner.Stage."""

    name: str

    def configure(self, cfg: Mapping[str, Any]) -> Any: ...

    def run(self, cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict: ...


def _discover_stages() -> Registry[JobStage]:
    """Every module of the stages package that declares a ``STAGE`` (its name order), then the
    certify stage: a new stage needs no line here."""
    import importlib
    import pkgutil

    from ace_lightning import stages as package

    found: Registry[JobStage] = Registry("stage")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        stage = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "STAGE", None)
        if stage is not None:
            found.add(stage.name, stage)
    found.add(certify.STAGE.name, certify.STAGE)
    return found


STAGES: Registry[JobStage] = _discover_stages()


def pipeline_stages(cfg: Any) -> list[str]:
    """The stages a pipeline job runs: ``stage.stages``, else those its certify selection needs."""
    stages = to_dict(cfg["stage"]).get("stages")
    if stages is None:
        return default_stages(cfg)
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"stage.stages must be a list of stages, e.g. [core, cert, certify], got {stages!r}")
    for name in stages:
        if str(name) not in STAGES.names():
            raise ConfigError(f"stage.stages: unknown stage '{name}'{did_you_mean(str(name), STAGES)}; "
                              f"known: {', '.join(STAGES)}")
    return [str(n) for n in stages]


def check_job(cfg: Any) -> None:
    """Everything a job's config can get wrong, checked before any folder is made, any data read or
    any stage trained: the stage's name; every knob of the job's stage and of ``stage_overrides``
    against its conf/stage/<name>.yaml (a knob that is not there is refused, naming the closest
    one); eps; seed; the data config; and every stage the job runs (a pipeline: all of them, with
    their overrides) with that stage's own checks and nets. One-line ConfigError."""
    from ace_lightning.data.datamodule import check_data_config

    name = str(to_dict(cfg["stage"]).get("name"))
    if name not in STAGES.names() and name != PIPELINE:
        raise ConfigError(f"unknown stage '{name}'; known: {', '.join([*STAGES, PIPELINE])}")
    overrides = to_dict(cfg.get("stage_overrides")) or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"stage_overrides must map stage names to knobs (stage_overrides.cert.epochs=20), "
                          f"got {overrides!r}")
    known = [*STAGES, PIPELINE]
    for stage, knobs in overrides.items():
        if stage not in known:
            raise ConfigError(f"stage_overrides.{stage}: unknown stage '{stage}'{did_you_mean(str(stage), known)}; "
                              f"known: {', '.join(known)}")
        if knobs is not None and not isinstance(knobs, Mapping):
            raise ConfigError(f"stage_overrides.{stage} must map knobs to values, got {knobs!r}")
        check_knobs(str(stage), knobs or {})
    job = apply_stage_overrides(cfg.copy()) if hasattr(cfg, "copy") else cfg
    check_knobs(name, to_dict(job["stage"]))
    job_eps(job)
    seed = job.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed must be a whole number, got {seed!r}")
    check_data_config(to_dict(job["data"]))
    names = pipeline_stages(job) if name == PIPELINE else [name]
    for n in names:
        STAGES.get(n).configure(stage_config(job, n) if name == PIPELINE else job)


PIPELINE = "pipeline"


def stage_config(cfg: Any, name: str) -> Any:
    """The config of stage ``name`` inside a pipeline job: conf/stage/<name>.yaml in place of the
    pipeline's own stage node, then ``stage_overrides.<name>`` (the same config, and so the same
    config hash, as the job ``stage=<name>`` with the same overrides)."""
    from omegaconf import OmegaConf, open_dict

    if name not in STAGES.names():
        raise ConfigError(f"stage.stages: unknown stage '{name}'; known: {', '.join(STAGES)}")
    out = cfg.copy()
    with open_dict(out):
        out.stage = OmegaConf.load(Path(CONF_DIR) / "stage" / f"{name}.yaml")
    return apply_stage_overrides(out)


def default_stages(cfg: Any) -> list[str]:
    """The stages the certify stage's selection needs: margin selection none of its own
    ([core, cert, certify]), a gate its gate stage, entropy selection the entropy stage unless it
    uses the cert stage's net (entropy_stage: cert)."""
    certify = to_dict((cfg.get("stage_overrides") or {}).get("certify") or {})
    selection = str(certify.get("selection") or "gate")
    if certify.get("cascade"):
        return ["core", "cert", "certify"]
    middle = {"gate": ["gate"], "margin": [],
              "entropy": [] if str(certify.get("entropy_stage") or "entropy") != "entropy" else ["entropy"]}
    if selection not in middle:
        raise ConfigError(f"stage_overrides.certify.selection={selection!r}: known gate, margin, entropy")
    return ["core", "cert", *middle[selection], "certify"]


def run_pipeline(cfg: Any, callbacks: tuple = ()) -> dict:
    """The stages of ``stage.stages`` in order, in this process, each with its own skip / resume /
    refuse semantics: one job per run folder, so any Hydra launcher may run many in parallel."""
    names = pipeline_stages(cfg)
    configs = [stage_config(cfg, n) for n in names]  # every stage's config errors before any training
    manifests: dict[str, dict] = {}
    pipeline_started = time.time()
    for name, stage_cfg in zip(names, configs):
        log.info(f"pipeline {cfg['run_dir']}: stage '{name}'")
        started = time.time()
        try:
            manifests[name] = STAGES.get(name).run(stage_cfg, callbacks=tuple(callbacks))
        except BaseException as err:
            stage_failed(cfg, name, err, started)
            raise
    log_pipeline_end(Path(str(cfg["run_dir"])).resolve(), names, since=pipeline_started)
    return {"stage": PIPELINE, "stages": manifests}


def log_pipeline_end(run_dir: Path, names: list[str], since: float = 0.0) -> None:
    """The pipeline's last lines: the wall-clock time of each stage this job ran (manifests written
    since ``since``; a stage found complete is named as skipped, its old time is not this job's)
    and where the results are."""
    from ace_lightning.summary import format_stage_times, stage_times

    measured = stage_times(run_dir, since=since)
    folders = {n: [k for k in sorted(measured) if k == n or (n == "certify" and k.startswith(n))] for n in names}
    times = {k: measured[k] for n in names for k in folders[n]}
    skipped = [n for n in names if not folders[n]]
    parts = [format_stage_times(times)] if times else []
    if skipped:
        parts.append(f"{', '.join(skipped)} skipped (already complete)")
    log.info(f"pipeline complete: {run_dir} ({'; '.join(parts)})" if parts else f"pipeline complete: {run_dir}")
    pareto = sorted(run_dir.glob("certify*/pareto.png"))
    if pareto:
        log.info("Pareto plot: " + ", ".join(str(p) for p in pareto))


# -- one launcher job: its outcome in <run_dir>/job.json ---------------------------------------------

def error_one_line(err: BaseException) -> str:
    """A failure in one line: a user error's message; a bug's type and first line."""
    text = " ".join(str(err).split())
    if isinstance(err, USER_ERRORS):
        return text or type(err).__name__
    first = str(err).strip().splitlines()[0].strip() if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def stage_failed(cfg: Any, name: str, err: BaseException, started: float) -> None:
    """Mark stage ``name`` of the job failed: its run_state.json (if this job wrote it) and the
    exception (``ace_stage``, which run_job records)."""
    from ace_lightning.console import global_rank
    from ace_lightning.rundir import mark_stage_failed

    if not hasattr(err, "ace_stage"):
        try:
            err.ace_stage = name  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - an exception type without a __dict__
            pass
        if not isinstance(err, KeyboardInterrupt) and global_rank() == 0:
            mark_stage_failed(Path(str(cfg["run_dir"])).resolve() / name, error_one_line(err), started)


def _finish_wandb(exit_code: int) -> None:
    """A stage that raised left its wandb run open: close it as failed (the next job of a
    joblib worker would log into it otherwise)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):  # not under Hydra (a test, a library call)
        return False


def _task_overrides() -> Optional[list[str]]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not under Hydra (a test, a library call)
        return None


def run_job(cfg: Any, callbacks: tuple = (), work: Optional[Callable[[], Any]] = None) -> Any:
    """One launcher job (what ``ace-train`` runs): ``run_stage(cfg)``, or ``work()``, with its outcome
    in ``<run_dir>/job.json``: running, then complete, or failed with the one-line error and the
    stage that failed (interrupted for Ctrl-C). The runs summary lists every job from these
    records; the exception is raised again for the caller to report."""
    from ace_lightning.console import global_rank
    from ace_lightning.summary import SWEEP_ENV, read_job_state, write_job_state

    if global_rank() != 0:  # DDP: every rank runs the job; rank zero keeps its record
        return work() if work is not None else run_stage(cfg, callbacks)
    if not _in_multirun():  # a bad config leaves nothing behind (a sweep's job records its failure)
        check_job(cfg)
    run_dir = Path(str(cfg["run_dir"])).resolve()
    name = str(to_dict(cfg["stage"]).get("name"))
    data = to_dict(cfg["data"]) or {}
    state = {"job": name, "status": "running", "started": time.time(), "pid": os.getpid(),
             "data": data.get("name"), "eps": cfg.get("eps"), "seed": cfg.get("seed"),
             "overrides": _task_overrides(), "multirun": _in_multirun() or SWEEP_ENV in os.environ,
             "sweep": os.environ.get(SWEEP_ENV)}  # the multirun it belongs to (None: a single run)
    write_job_state(run_dir, state)
    try:
        out = work() if work is not None else run_stage(cfg, callbacks)
    except BaseException as err:
        if name != PIPELINE:
            stage_failed(cfg, name, err, state["started"])
        interrupted = isinstance(err, KeyboardInterrupt)
        _finish_wandb(1 if not interrupted else 255)
        current = read_job_state(run_dir) or {}
        if current.get("pid") not in (None, state["pid"]) and current.get("status") in ("failed", "interrupted"):
            raise  # a process this job started (DDP) recorded its own failure, with its error
        state.update(status="interrupted" if interrupted else "failed", ended=time.time(),
                     error=None if interrupted else error_one_line(err),
                     failed_stage=getattr(err, "ace_stage", name))
        write_job_state(run_dir, state)
        raise
    state.update(status="complete", ended=time.time())
    write_job_state(run_dir, state)
    return out


def apply_stage_overrides(cfg: Any) -> Any:
    """Pipelines sweep ``stage=core,cert,...`` in one multirun, so an experiment cannot set
    ``stage.epochs`` for all of them at once: it sets ``stage_overrides.<name>`` instead, merged
    here into the stage config of the job being run."""
    from omegaconf import DictConfig, OmegaConf, open_dict

    if not isinstance(cfg, DictConfig):
        return cfg
    name = cfg.stage.name
    over = (cfg.get("stage_overrides") or {}).get(name)
    if over:
        with open_dict(cfg):
            cfg.stage = OmegaConf.merge(cfg.stage, over)
    return cfg


def run_stage(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    """Run the configured stage; ``callbacks`` are extra Lightning callbacks (tests, user hooks).
    The whole job's config is checked first (check_job)."""
    name = to_dict(cfg["stage"])["name"]
    cfg = apply_stage_overrides(cfg)  # stage_overrides.pipeline.stages too: an experiment names its stages
    check_job(cfg)
    if name == PIPELINE:
        return run_pipeline(cfg, tuple(callbacks))
    return STAGES.get(name).run(cfg, callbacks=tuple(callbacks))
