"""Hydra callbacks of the training entry point (registered in conf/train.yaml).

``SweepGuard``: a chain of stages swept as separate jobs (``-m stage=core,cert,gate,certify``)
relies on the basic launcher running jobs one after another; a parallel launcher (joblib,
submitit) would start the gate before the cert-net exists. Such a sweep is refused in one line
before any job starts; ``stage=pipeline`` is the form that runs anywhere. After a multirun the
runs summary is written once, with every run folder the sweep completed (jobs finishing at the
same moment cannot miss each other).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def swept_values(override: str) -> list[str]:
    """The values of a ``key=a,b,c`` sweep override (one value: not a sweep)."""
    value = override.split("=", 1)[1] if "=" in override else ""
    return [v for v in value.split(",") if v.strip()]


def chained_stage_sweep(task_overrides: list[str]) -> list[str]:
    """The stage names of a ``stage=a,b,...`` sweep among the command line's overrides ([] if none)."""
    for o in task_overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "stage" and len(swept_values(o)) > 1:
            return swept_values(o)
    return []


class SweepGuard(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str((config.hydra.get("launcher") or {}).get("_target_", BASIC_LAUNCHER))
        stages = chained_stage_sweep(list(config.hydra.overrides.task))
        if stages and launcher != BASIC_LAUNCHER:
            name = launcher.rsplit(".", 1)[-1]
            print(f"error: -m stage={','.join(stages)} runs the stages as separate jobs, which only the basic "
                  f"launcher runs in order ({name} would run them at once): use stage=pipeline "
                  f"stage.stages=[{','.join(stages)}]", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ace_lightning.summary import write_summary

        root = Path(str(config.get("runs_root", "runs"))).resolve()
        if root.is_dir():
            write_summary(root)
