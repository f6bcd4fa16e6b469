"""Stage name -> function(cfg) -> manifest, and the pipeline job that runs stages in order.

Adding a stage = one entry in STAGES + conf/stage/<name>.yaml. This module sits above the stages
and the certify stage (it imports them; nothing below imports it).

Per-stage settings have one dialect, ``stage_overrides.<stage>.<knob>``, whatever runs the stage:
a single stage job (``stage=cert``), a chain of jobs (``-m stage=core,cert,...`` with the basic
launcher) or one pipeline job (``stage=pipeline``, any launcher).
"""
from __future__ import annotations

import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ace_lightning.bounds import output_bounds
from ace_lightning.nets import eval_mode
from ace_lightning.config import CONF_DIR, check_knobs, to_dict
from ace_lightning.console import log
from ace_lightning.stages.base import check_optimizer, check_val_crown_ibp, config_kwargs
from ace_lightning.stages.runner import check_certified_precision, run_training_stage
from ace_lightning.errors import USER_ERRORS, ConfigError, InputNotFoundError, did_you_mean


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
    check_cert(cfg)  # validate before any data is loaded
    pretrained = st.get("pretrained_path")
    inputs = {}
    if pretrained:
        path = Path(str(pretrained)).expanduser().resolve()
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


# -- every stage's config checked before the job's first stage runs ---------------------------------

def job_eps(cfg: Mapping[str, Any]) -> float:
    """The run's eps as a number (each stage's check says which range it takes: [0, 1] for the core
    and the certify stage, (0, 1] for the certified training stages)."""
    value = cfg.get("eps")
    try:
        eps = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        eps = math.nan
    if not math.isfinite(eps):
        raise ConfigError(f"eps must be a number in [0, 1] (pixel space, e.g. 2/255 = 0.00784), got {value!r}")
    return eps


def check_net(cfg: Mapping[str, Any], key: str) -> None:
    from ace_lightning.nets import check_net_config

    check_net_config(to_dict(cfg[key]), key)


def check_core(cfg: Mapping[str, Any]) -> None:
    from ace_lightning.stages.core import CoreStage

    st = to_dict(cfg["stage"])
    CoreStage.check_config(st, job_eps(cfg))
    check_optimizer(st.get("optimizer"))
    check_net(cfg, "core_net")


def check_cert(cfg: Mapping[str, Any]) -> None:
    from ace_lightning.stages.cert import CertStage

    st = to_dict(cfg["stage"])
    CertStage.check_config(st, job_eps(cfg))
    check_val_crown_ibp(st.get("val_crown_ibp", True))
    check_optimizer(st.get("optimizer"))
    check_certified_precision(cfg, "cert")
    folder = str(st.get("folder") or "cert")  # a second cert-net of a cascade: its own folder (cert_2)
    if not folder.startswith("cert") or "/" in folder or folder.startswith("certify"):
        raise ConfigError(f"stage.folder must name a cert stage folder such as cert or cert_2, got {folder!r}")
    if st.get("pretrained_path"):
        path = Path(str(st["pretrained_path"])).expanduser().resolve()
        if not path.is_file():
            raise InputNotFoundError(f"stage.pretrained_path: weight file not found: {path}")
    check_net(cfg, "cert_net")


def check_gate(cfg: Mapping[str, Any]) -> None:
    from ace_lightning.nets import check_net_config
    from ace_lightning.stages.gate import GateStage
    from ace_lightning.stages.gate_labels import check_negatives, label_methods

    st = to_dict(cfg["stage"])
    GateStage.check_config({**st, "method": st.get("method") or "IBP"}, job_eps(cfg))
    check_negatives(st.get("negatives"))
    if st.get("label_method"):
        label_methods(st["label_method"])
    check_val_crown_ibp(st.get("val_crown_ibp", True))
    check_optimizer(st.get("optimizer"))
    check_certified_precision(cfg, "gate")
    cascade, thresholds = list(st.get("cascade") or ["cert"]), st.get("cascade_thresholds")
    if thresholds is not None and len(thresholds) != len(cascade) - 1:
        raise ConfigError(f"stage.cascade_thresholds needs one threshold per earlier pair ({len(cascade) - 1}), "
                          f"got {len(thresholds)}")
    if st.get("gate_net"):
        check_net_config({**dict(st["gate_net"]), "kind": "gate"}, "stage.gate_net")


def check_entropy(cfg: Mapping[str, Any]) -> None:
    from ace_lightning.stages.cert import CLASSIC, CertStage
    from ace_lightning.stages.entropy import EntropyStage

    st = to_dict(cfg["stage"])
    if CertStage.check_config(st, job_eps(cfg)) not in CLASSIC:
        raise ConfigError(f"the entropy stage co-trains with IBP or CROWN-IBP bounds over the ball, not "
                          f"{st.get('method')}: train the cert stage with it and use entropy selection on it "
                          f"(stage=certify stage.selection=entropy stage.entropy_stage=cert)")
    EntropyStage.check_entropy_config(st.get("lam", 0.5), st.get("tau", 1.0), st.get("route", "box"))
    check_val_crown_ibp(st.get("val_crown_ibp", True))
    check_optimizer(st.get("optimizer"))
    check_certified_precision(cfg, "entropy")
    if not st.get("init_from_cert", True):
        check_net(cfg, "cert_net")


def check_certify(cfg: Mapping[str, Any]) -> None:
    from ace_lightning.ace import SELECTIONS, CertifySettings
    from ace_lightning.attacks.pgd import check_loss

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


STAGE_CHECKS: dict[str, Callable[[Any], None]] = {"core": check_core, "cert": check_cert, "gate": check_gate,
                                                  "entropy": check_entropy, "certify": check_certify}


def pipeline_stages(cfg: Any) -> list[str]:
    """The stages a pipeline job runs: ``stage.stages``, else those its certify selection needs."""
    stages = to_dict(cfg["stage"]).get("stages")
    if stages is None:
        return default_stages(cfg)
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"stage.stages must be a list of stages, e.g. [core, cert, certify], got {stages!r}")
    for name in stages:
        if str(name) not in STAGES:
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
    if name not in STAGES and name != PIPELINE:
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
        STAGE_CHECKS[n](stage_config(job, n) if name == PIPELINE else job)


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
    names = pipeline_stages(cfg)
    configs = [stage_config(cfg, n) for n in names]  # every stage's config errors before any training
    manifests: dict[str, dict] = {}
    pipeline_started = time.time()
    for name, stage_cfg in zip(names, configs):
        log.info(f"pipeline {cfg['run_dir']}: stage '{name}'")
        started = time.time()
        try:
            manifests[name] = STAGES[name](stage_cfg, callbacks=tuple(callbacks))
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
    from ace_lightning.summary import read_job_state, write_job_state

    if global_rank() != 0:  # DDP: every rank runs the job; rank zero keeps its record
        return work() if work is not None else run_stage(cfg, callbacks)
    if not _in_multirun():  # a bad config leaves nothing behind (a sweep's job records its failure)
        check_job(cfg)
    run_dir = Path(str(cfg["run_dir"])).resolve()
    name = str(to_dict(cfg["stage"]).get("name"))
    data = to_dict(cfg["data"]) or {}
    state = {"job": name, "status": "running", "started": time.time(), "pid": os.getpid(),
             "data": data.get("name"), "eps": cfg.get("eps"), "seed": cfg.get("seed"),
             "overrides": _task_overrides()}
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
    return STAGES[name](cfg, callbacks=tuple(callbacks))
