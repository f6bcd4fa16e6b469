"""Stage name -> function(cfg) -> manifest, and the pipeline job that runs stages in order.

Adding a stage = one entry in STAGES + conf/stage/<name>.yaml. This module sits above the stages
and the certify stage (it imports them; nothing below imports it).

Per-stage settings have one dialect, ``stage_overrides.<stage>.<knob>``, whatever runs the stage:
a single stage job (``stage=cert``), a chain of jobs (``-m stage=core,cert,...`` with the basic
launcher) or one pipeline job (``stage=pipeline``, any launcher).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ace_lightning.bounds import output_bounds
from ace_lightning.nets import eval_mode
from ace_lightning.config import CONF_DIR, to_dict
from ace_lightning.console import log
from ace_lightning.stages.base import config_kwargs
from ace_lightning.stages.runner import check_certified_precision, run_training_stage
from ace_lightning.errors import USER_ERRORS, ConfigError, InputNotFoundError


def run_core(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.core import CoreStage

    st = to_dict(cfg["stage"])

    def make(net, dm):
        return CoreStage(net, **config_kwargs(CoreStage, st, eval_eps=float(cfg["eps"])))

    return run_training_stage(cfg, "core", make, "core_net", CoreStage.key_metric, "core.pt",
                              mixed_precision=bool(st.get("mixed_precision", False)), callbacks=callbacks)


def check_boundable(net: torch.nn.Module, dm) -> None:
    """Fail before training when the bound layer cannot handle the cert-net (one-line ValueError)."""
    shape = tuple(dm.info.input_shape)
    x = torch.full((2, *shape), 0.5)
    with eval_mode(net):
        output_bounds(net, x, 0.01, "IBP")


def run_cert(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.cert import CertStage
    from ace_lightning.rundir import sha256_file

    st = to_dict(cfg["stage"])
    # validate before any data is loaded
    CertStage.check_config(st, float(cfg["eps"]))
    check_certified_precision(cfg, "cert")
    pretrained = st.get("pretrained_path")
    inputs = {}
    if pretrained:
        path = Path(str(pretrained)).expanduser().resolve()
        if not path.is_file():
            raise InputNotFoundError(f"stage.pretrained_path: weight file not found: {path}")
        pretrained = str(path)
        inputs["pretrained"] = {"path": pretrained, "sha256": sha256_file(path)}

    def make(net, dm):
        kw = config_kwargs(CertStage, st, eps=float(cfg["eps"]))
        if pretrained:
            kw["shi_init"] = False  # the imported weights are the net
        return CertStage(net, **kw)

    # selection co-training trades a little certified accuracy for selectability: the best val
    # cert_acc would pick a checkpoint from before it, so the last weights are exported instead
    key = None if float(st.get("select_weight", 0.0) or 0.0) > 0 else CertStage.key_metric
    folder = str(st.get("folder") or "cert")  # a second cert-net of a cascade: its own folder (cert_2)
    if not folder.startswith("cert") or "/" in folder or folder.startswith("certify"):
        raise ConfigError(f"stage.folder must name a cert stage folder such as cert or cert_2, got {folder!r}")
    return run_training_stage(cfg, folder, make, "cert_net", key, "cert.pt", inputs=inputs,
                              pre_check=check_boundable, callbacks=callbacks, pretrained=pretrained)


def run_certify_stage(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.certify import certify_folder, run_certify

    manifest = run_certify(cfg)
    st = to_dict(cfg["stage"])
    stage_dir = Path(cfg["run_dir"]).resolve() / certify_folder(st.get("selection", "gate"),
                                                                 str(st.get("entropy_stage") or "entropy"),
                                                                 st.get("cascade"))
    if manifest:  # rank zero: where the results are (the table was printed above)
        log.info(f"stage 'certify' results: {stage_dir} (table.txt, records.csv, operating_points.json, "
                 f"pareto.png, ace_model.pt)")
    return manifest


def run_gate(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.gate_run import run_gate as run

    check_certified_precision(cfg, "gate")
    return run(cfg, callbacks=callbacks, pre_check=check_boundable)


def run_entropy(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.entropy import run_entropy as run

    check_certified_precision(cfg, "entropy")
    return run(cfg, callbacks=callbacks, pre_check=check_boundable)


STAGES: dict[str, Callable[..., dict]] = {"core": run_core, "cert": run_cert, "certify": run_certify_stage,
                                          "gate": run_gate, "entropy": run_entropy}


PIPELINE = "pipeline"


def stage_config(cfg: Any, name: str) -> Any:
    """The config of stage ``name`` inside a pipeline job: conf/stage/<name>.yaml in place of the
    pipeline's own stage node, then ``stage_overrides.<name>`` (the same config, and so the same
    config hash, as the job ``stage=<name>`` with the same overrides)."""
    from omegaconf import OmegaConf, open_dict

    if name not in STAGES:
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
    names = [str(n) for n in (to_dict(cfg["stage"]).get("stages") or default_stages(cfg))]
    configs = [stage_config(cfg, n) for n in names]  # every stage's config errors before any training
    manifests: dict[str, dict] = {}
    for name, stage_cfg in zip(names, configs):
        log.info(f"pipeline {cfg['run_dir']}: stage '{name}'")
        started = time.time()
        try:
            manifests[name] = run_stage(stage_cfg, callbacks)
        except BaseException as err:
            stage_failed(cfg, name, err, started)
            raise
    log_pipeline_end(Path(str(cfg["run_dir"])).resolve(), names)
    return {"stage": PIPELINE, "stages": manifests}


def log_pipeline_end(run_dir: Path, names: list[str]) -> None:
    """The pipeline's last lines: each stage's wall-clock time and where the results are."""
    from ace_lightning.summary import format_stage_times, stage_times

    measured = stage_times(run_dir)
    times = {k: measured[k] for n in names for k in sorted(measured) if k == n or (n == "certify" and k.startswith(n))}
    log.info(f"pipeline complete: {run_dir} ({format_stage_times(times)})" if times else
             f"pipeline complete: {run_dir}")
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
    from ace_lightning.summary import read_job_state, write_job_state

    if global_rank() != 0:  # DDP: every rank runs the job; rank zero keeps its record
        return work() if work is not None else run_stage(cfg, callbacks)
    run_dir = Path(str(cfg["run_dir"])).resolve()
    name = str(to_dict(cfg["stage"]).get("name"))
    data = to_dict(cfg["data"]) or {}
    state = {"job": name, "status": "running", "started": time.time(), "pid": os.getpid(),
             "data": data.get("name"), "eps": cfg.get("eps"), "overrides": _task_overrides()}
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
    """Run the configured stage; ``callbacks`` are extra Lightning callbacks (tests, user hooks)."""
    name = to_dict(cfg["stage"])["name"]
    cfg = apply_stage_overrides(cfg)  # stage_overrides.pipeline.stages too: an experiment names its stages
    if name == PIPELINE:
        return run_pipeline(cfg, tuple(callbacks))
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'; known: {', '.join([*STAGES, PIPELINE])}")
    return STAGES[name](cfg, callbacks=tuple(callbacks))
