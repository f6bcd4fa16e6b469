"""Loggers beside the always-on CSV logger: wandb, offline unless the user opts in (tests and CI
never go online: WANDB_MODE=disabled or offline wins over the config)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

from ace_lightning.config import to_dict


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; a resumed stage must keep the curves of
    the epochs before the interruption, so we append (reusing the existing header)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                header = fh.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)


class StageCSVLogger(CSVLogger):
    """CSV logger writing ``<stage_dir>/metrics.csv`` and appending across resumes."""

    def __init__(self, stage_dir: str) -> None:
        super().__init__(save_dir=str(stage_dir), name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_settings(cfg: Mapping[str, Any]) -> dict:
    logger = to_dict(cfg.get("logger") or {}) or {}
    return dict(logger.get("wandb") or {})


def wandb_mode(wb: Mapping[str, Any]) -> Optional[str]:
    """The mode a wandb run of these settings uses (WANDB_MODE wins over the config); None when
    wandb is off."""
    if not wb.get("enabled"):
        return None
    mode = os.environ.get("WANDB_MODE") or wb.get("mode", "offline")
    return None if mode == "disabled" else str(mode)


def run_identity(cfg: Mapping[str, Any], stage: str, cert_manifest: Optional[Mapping[str, Any]] = None) -> dict:
    """What a dashboard filters a stage run by, as flat config keys: dataset, eps, seed, stage, run,
    method (the cert-net's certified training method: its manifest's, else the config's) and
    selection (gate | entropy: the composition the stage belongs to)."""
    st = to_dict(cfg.get("stage")) or {}
    over = to_dict(cfg.get("stage_overrides")) or {}
    trained = ((cert_manifest or {}).get("config") or {}).get("stage") or {}
    if stage == "cert":
        method = st.get("method")
    else:
        method = trained.get("method") or (over.get("cert") or {}).get("method")
    if stage.startswith("certify"):
        selection = st.get("selection", "gate")
    elif stage.startswith("entropy"):
        selection = "entropy"
    else:
        selection = (over.get("certify") or {}).get("selection") or "gate"
    data = to_dict(cfg.get("data")) or {}
    return {"dataset": data.get("name"), "eps": cfg.get("eps"), "seed": cfg.get("seed"), "stage_name": stage,
            "run": str(cfg.get("run_name") or ""), "method": method, "selection": selection}


def extra_loggers(cfg: Mapping[str, Any], stage_dir: Path, identity: Optional[Mapping[str, Any]] = None) -> list:
    """[WandbLogger] when logger.wandb.enabled, grouped by run so a dashboard shows the pipeline
    run as one unit, its config the job's with ``identity`` (run_identity) on top; [] otherwise."""
    wb = wandb_settings(cfg)
    mode = wandb_mode(wb)
    if mode is None:
        return []
    from lightning.pytorch.loggers import WandbLogger

    stage = Path(stage_dir).name
    config = to_dict(cfg) if isinstance(cfg, (dict, DictConfig)) else {}
    config = {**(config or {}), **(identity or run_identity(cfg, stage))}
    return [WandbLogger(project=wb.get("project", "ace-lightning"), entity=wb.get("entity"),
                        group=str(wb.get("group") or Path(stage_dir).parent.name),
                        name=f"{wb.get('group') or Path(stage_dir).parent.name}/{stage}",
                        job_type=stage, save_dir=str(stage_dir), mode=mode, reinit="finish_previous",
                        config=config)]


def finish_loggers(loggers: list) -> None:
    """End each wandb run with its stage: a pipeline runs several stages in one process, and an
    open run would swallow the next stage's logs."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
