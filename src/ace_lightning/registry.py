"""Stage name -> function(cfg) -> manifest, and the pipeline job that runs stages in order.

Adding a stage = one entry in STAGES + conf/stage/<name>.yaml. This module sits above the stages
and the certify stage (it imports them; nothing below imports it).

Per-stage settings have one dialect, ``stage_overrides.<stage>.<knob>``, whatever runs the stage:
a single stage job (``stage=cert``), a chain of jobs (``-m stage=core,cert,...`` with the basic
launcher) or one pipeline job (``stage=pipeline``, any launcher).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ace_lightning.bounds import output_bounds
from ace_lightning.config import CONF_DIR, to_dict
from ace_lightning.console import log
from ace_lightning.stages.base import config_kwargs
from ace_lightning.stages.runner import check_certified_precision, run_training_stage
from ace_lightning.errors import ConfigError, InputNotFoundError


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
    was = net.training
    net.eval()
    output_bounds(net, x, 0.01, "IBP")
    net.train(was)


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
    return run_training_stage(cfg, "cert", make, "cert_net", key, "cert.pt", inputs=inputs,
                              pre_check=check_boundable, callbacks=callbacks, pretrained=pretrained)


def run_certify_stage(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.certify import run_certify

    return run_certify(cfg)


def run_gate(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.gate import run_gate as run

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


def run_pipeline(cfg: Any, callbacks: tuple = ()) -> dict:
    """The stages of ``stage.stages`` in order, in this process, each with its own skip / resume /
    refuse semantics: one job per run folder, so any Hydra launcher may run many in parallel."""
    names = [str(n) for n in (to_dict(cfg["stage"]).get("stages") or [])]
    if not names:
        raise ConfigError("stage=pipeline needs stage.stages, e.g. [core, cert, gate, certify]")
    configs = [stage_config(cfg, n) for n in names]  # every stage's config errors before any training
    manifests: dict[str, dict] = {}
    for name, stage_cfg in zip(names, configs):
        log.info(f"pipeline {cfg['run_dir']}: stage '{name}'")
        manifests[name] = run_stage(stage_cfg, callbacks)
    return {"stage": PIPELINE, "stages": manifests}


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
    if name == PIPELINE:
        return run_pipeline(cfg, tuple(callbacks))
    cfg = apply_stage_overrides(cfg)
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'; known: {', '.join([*STAGES, PIPELINE])}")
    return STAGES[name](cfg, callbacks=tuple(callbacks))
