"""Loggers beside the always-on CSV logger: wandb, offline unless the user opts in (tests and CI
never go online: WANDB_MODE=disabled or offline wins over the config)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf


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


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def wandb_settings(cfg: Mapping[str, Any]) -> dict:
    logger = _plain(cfg.get("logger") or {}) or {}
    return dict(logger.get("wandb") or {})


def extra_loggers(cfg: Mapping[str, Any], stage_dir: Path) -> list:
    """[WandbLogger] when logger.wandb.enabled, grouped by run so a dashboard shows the pipeline
    run as one unit; [] otherwise."""
    wb = wandb_settings(cfg)
    if not wb.get("enabled"):
        return []
    mode = os.environ.get("WANDB_MODE") or wb.get("mode", "offline")
    if mode == "disabled":
        return []
    from lightning.pytorch.loggers import WandbLogger

    stage = Path(stage_dir).name
    return [WandbLogger(project=wb.get("project", "ace-lightning"), entity=wb.get("entity"),
                        group=str(wb.get("group") or Path(stage_dir).parent.name),
                        name=f"{wb.get('group') or Path(stage_dir).parent.name}/{stage}",
                        job_type=stage, save_dir=str(stage_dir), mode=mode, reinit="finish_previous",
                        config=_plain(cfg) if isinstance(cfg, (dict, DictConfig)) else None)]


def finish_loggers(loggers: list) -> None:
    """End each wandb run with its stage: a pipeline runs several stages in one process, and an
    open run would swallow the next stage's logs."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
