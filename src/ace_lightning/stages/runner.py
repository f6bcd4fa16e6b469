"""Run one training stage from a composed config: data -> net -> LightningModule -> Trainer ->
checkpoints + exported weights + manifest in ``<run_dir>/<stage>/``.

Resume: rerunning the same command continues from ``checkpoints/last.ckpt`` (schedules are counted
in steps, so eps/kappa/beta continue exactly). A completed stage with the same config is skipped.
A stage folder made by a *different* config is never overwritten silently.

A stage is what its module declares in one ``Stage``: its typed config (stages/configs.py), what it
reads from the run folder (``read_inputs``), its LightningModule (``make_module``) and its own
manifest keys; the registry maps names to these and this runner trains any of them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

from ace_lightning.data import ACEDataModule
from ace_lightning.loggers import StageCSVLogger, extra_loggers, finish_loggers, run_identity
from ace_lightning.nets import build_net
from ace_lightning.config import datamodule_from, job_eps, to_dict
from ace_lightning.console import log, progress_bar_callbacks
from ace_lightning.errors import ConfigError
from ace_lightning.rundir import (
    RUN_STATE,
    atomic_write_text,
    config_hash,
    export_weights,
    identity_config,
    prepare_stage_dir,
    read_manifest,
    write_manifest,
)
from ace_lightning.stages.certified import check_boundable
from ace_lightning.stages.configs import StageConfig

HALF_PRECISIONS = ("16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")


def check_certified_precision(cfg: Mapping[str, Any], stage: str) -> None:
    """Certified training keeps float32 (or float64) parameters: the robust loss is bounded in full
    precision through them, which half-precision weights would make impossible (and the loss
    would silently stop reaching the net). Mixed precision (16-mixed, bf16-mixed) is fine: only
    plain forward passes run in it."""
    precision = str(to_dict(cfg["trainer"]).get("precision", "32-true"))
    if precision in HALF_PRECISIONS:
        raise ConfigError(f"stage '{stage}' trains with certified bounds, which need float32 weights: "
                         f"trainer.precision={precision} is not supported; use 16-mixed or bf16-mixed")


def build_trainer(cfg: Mapping[str, Any], stage_dir: Path, monitor: Optional[str],
                  extra_callbacks: tuple = (), mixed_precision: bool = False) -> tuple[L.Trainer, ModelCheckpoint]:
    trainer_cfg = dict(to_dict(cfg["trainer"]))
    if mixed_precision and torch.cuda.is_available() and trainer_cfg.get("accelerator") in ("auto", "gpu", "cuda"):
        trainer_cfg["precision"] = "16-mixed"
    ckpt = ModelCheckpoint(
        dirpath=stage_dir / "checkpoints", filename="best", monitor=monitor, mode="max",
        save_last=True, save_top_k=1 if monitor else 0, auto_insert_metric_name=False,
        enable_version_counter=False)
    callbacks = [ckpt, LearningRateMonitor(logging_interval="epoch"), *extra_callbacks]
    if not any(isinstance(c, ProgressBar) for c in extra_callbacks):  # the bar on stderr, tables on stdout
        callbacks += progress_bar_callbacks(bool(trainer_cfg.get("enable_progress_bar", True)))
    every = to_dict(cfg["stage"]).get("checkpoint_every_n_steps")
    if every:  # mid-epoch last.ckpt, so a killed run loses at most `every` steps
        callbacks.append(ModelCheckpoint(dirpath=stage_dir / "checkpoints", save_last=True,
                                         save_top_k=0, every_n_train_steps=int(every),
                                         enable_version_counter=False))
    identity = run_identity(cfg, Path(stage_dir).name, read_manifest(Path(stage_dir).parent / "cert"))
    loggers: list = [StageCSVLogger(str(stage_dir)), *extra_loggers(cfg, stage_dir, identity)]
    trainer = L.Trainer(default_root_dir=str(stage_dir), callbacks=callbacks, logger=loggers,
                        **trainer_cfg)
    return trainer, ckpt


@dataclass
class StageInputs:
    """What a stage reads from the run folder for one job (before any data is loaded)."""

    folder: str  # its sub-folder of the run folder (cert_2, gate_1: a cascade's)
    eps: float  # the run's
    inputs: dict = field(default_factory=dict)  # earlier stages' files with their sha256 (manifest)
    net: Optional[dict] = None  # the net config, where an earlier stage's manifest gives it
    pretrained: Optional[str] = None  # external weights, validated and exported instead of trained
    datamodule: Optional[Callable[[ACEDataModule], L.LightningDataModule]] = None  # wraps the run's data


@dataclass(frozen=True)
class Stage:
    """A training stage as the registry and run_training_stage see it: each stage module declares
    one, and nothing else of it is named outside its module."""

    name: str
    config: type[StageConfig]  # its typed config: the keys of conf/stage/<name>.yaml
    net_key: str  # the job config's key of its net (core_net; gate_net: set from StageInputs.net)
    weights: str  # the exported weights' file name; "{folder}" is the stage folder
    key_metric: Optional[str]  # the best checkpoint's (None: the last weights are exported)
    make_module: Callable[[torch.nn.Module, Any, Any, StageInputs], L.LightningModule]
    read_inputs: Optional[Callable[[Mapping[str, Any], Any], StageInputs]] = None  # None: no inputs
    check: Optional[Callable[[Mapping[str, Any], Any], None]] = None  # the job's nets and files
    manifest_extra: Optional[Callable[[L.LightningModule, Any, StageInputs], Mapping[str, Any]]] = None
    certified: bool = False  # trains through bounds: float32 weights, a net the bounds can handle

    def configure(self, cfg: Mapping[str, Any]) -> StageConfig:
        """The job's typed config of this stage, validated, and the job's other checks for it:
        what registry.check_job runs for each stage before anything is written."""
        config = self.config.from_job(cfg)
        if self.certified:
            check_certified_precision(cfg, self.name)
        if self.check is not None:
            self.check(cfg, config)
        return config

    def run(self, cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
        return run_training_stage(cfg, self, callbacks)


def run_training_stage(cfg: Mapping[str, Any], stage: Stage, callbacks: tuple = ()) -> dict:
    """Train ``stage`` for the job ``cfg``. With ``pretrained`` inputs (a weights file of the stage's
    architecture, e.g. a cert-net trained by another library) nothing is trained: the weights are
    loaded, validated and tested, and exported like trained ones. The manifest, with the stage's
    own keys (``manifest_extra``), is written once, by this function."""
    config = stage.configure(cfg)
    inputs = (stage.read_inputs(cfg, config) if stage.read_inputs is not None
              else StageInputs(folder=stage.name, eps=job_eps(cfg)))
    if inputs.net is not None:  # the net an earlier stage trained, under the stage's own key
        cfg = {**to_dict(cfg), stage.net_key: inputs.net}
    key_metric = None if config.selects_last() else stage.key_metric
    pretrained, weights_name = inputs.pretrained, stage.weights.format(folder=inputs.folder)
    run_dir = Path(cfg["run_dir"]).resolve()
    stage_dir = run_dir / inputs.folder
    stage_name = inputs.folder
    net_cfg = to_dict(cfg[stage.net_key])
    ident = identity_config(cfg, {"net": net_cfg, "inputs": {k: v.get("sha256") if isinstance(v, dict) else v
                                                             for k, v in inputs.inputs.items()}})
    ident_hash = config_hash(ident)
    done = prepare_stage_dir(stage_dir, ident_hash, bool(cfg.get("overwrite", False)), ident)
    if done is not None:
        log.info(f"stage '{stage_name}' already complete in {stage_dir} (same config): skipped")
        return done

    started = time.perf_counter()
    L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    dm = datamodule_from(cfg)
    info = dm.info
    net = build_net(net_cfg, info)
    matched_by = None
    if pretrained:  # one-line error naming the mismatched keys, before any data is read
        from ace_lightning.nets.checkpoint import load_external_weights

        matched_by = load_external_weights(net, pretrained, f"{stage_name} net {net_cfg.get('name')!r}")
    if inputs.datamodule is not None:
        dm = inputs.datamodule(dm)
    if stage.certified:  # fail before training when the bounds cannot handle the net
        check_boundable(net, dm)
    module = stage.make_module(net, dm, config, inputs)
    has_val = int(to_dict(cfg["data"]).get("val_size", 0) or 0) > 0
    trainer, ckpt = build_trainer(cfg, stage_dir, key_metric if has_val else None,
                                  extra_callbacks=tuple(callbacks), mixed_precision=config.mixed())
    last = stage_dir / "checkpoints" / "last.ckpt"
    best = None
    if pretrained:
        val_metrics = trainer.validate(module, datamodule=dm, verbose=False) if has_val else []
        test_metrics = trainer.test(module, datamodule=dm, verbose=False)
        metrics = {k: float(v) for part in (val_metrics, test_metrics) for k, v in (part[0] if part else {}).items()}
    else:
        resume = str(last) if last.is_file() and cfg.get("resume", True) else None
        if resume and trainer.is_global_zero:
            log.info(f"resuming stage '{stage_name}' from {last}")
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
        if trainer.interrupted:
            raise KeyboardInterrupt(f"stage '{stage_name}' interrupted: rerun the same command to resume from "
                                    f"{last}")
        best = ckpt.best_model_path if ckpt.best_model_path else None
        test_metrics = trainer.test(module, datamodule=dm, ckpt_path=best or str(last), verbose=False)
        metrics = {k: float(v) for k, v in (test_metrics[0] if test_metrics else {}).items()}
    if ckpt.best_model_score is not None:
        metrics[f"best_{key_metric}"] = float(ckpt.best_model_score)
    manifest: dict = {}
    if trainer.is_global_zero:
        weights = export_weights(module.net, stage_dir / weights_name)
        manifest = {
            "stage": stage_name, "status": "complete", "config_hash": ident_hash, "config": ident,
            "net": net_cfg, "eps": cfg.get("eps"),
            "data": {"name": info.name, "input_shape": list(info.input_shape),
                     "num_classes": info.num_classes, "mean": list(info.mean), "std": list(info.std),
                     "train": len(dm.train_indices), "val": len(dm.val_indices), "test": len(dm.test_indices)},
            "inputs": dict(inputs.inputs),
            "outputs": {"weights": weights,
                        "best_checkpoint": Path(best).name if best else None,
                        "last_checkpoint": None if pretrained else "checkpoints/last.ckpt"},
            **({"pretrained": {"path": str(pretrained), "matched_by": matched_by}} if pretrained else {}),
            "metrics": metrics,
            "epochs_trained": int(trainer.current_epoch),
            "wall_s": time.perf_counter() - started,
            "global_step": int(trainer.global_step),
            "precision": str(trainer.precision),
            **(dict(stage.manifest_extra(module, config, inputs)) if stage.manifest_extra is not None else {}),
        }
        manifest = write_manifest(stage_dir, manifest)
        atomic_write_text(stage_dir / RUN_STATE, json.dumps({"config_hash": ident_hash, "status": "complete"}))
        log.info(f"stage '{stage_name}' complete: {stage_dir}  " +
              "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    finish_loggers(trainer.loggers)
    trainer.strategy.barrier()
    return manifest
