"""Compose the real Hydra configs with tiny overrides, as a user's command line would."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ace_lightning.config import CONF_DIR

TINY = ["debug=tiny"]  # conf/debug/tiny.yaml: synthetic data, 96 training images, CPU, no progress bars


def compose_cfg(run_root: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name,
                       overrides=[f"runs_root={run_root}", *TINY, *overrides])


CERT_TINY = ["stage=cert", "net@cert_net=small", "eps=0.03", "stage.epochs=2", "stage.warmup_epochs=0.5",
             "stage.ramp_epochs=1", "stage.val_pgd_steps=2"]
CORE_TINY = ["stage=core", "net@core_net=small_cnn", "eps=0.03", "stage.epochs=1", "stage.eval_pgd_steps=2"]
