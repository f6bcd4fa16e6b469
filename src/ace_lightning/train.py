"""Hydra entry point: ``ace-train stage=<core|cert|gate|entropy|certify|pipeline> data=<name> eps=<eps>``
(or ``python -m ace_lightning.train ...``).

``stage=pipeline`` runs the stages of one run folder in order in one job, so sweeps over datasets
and epsilons run in parallel under any Hydra launcher (``hydra/launcher=joblib`` here,
``submitit_slurm`` on a cluster). ``-m stage=core,cert,gate,certify`` chains the stages as
separate jobs, which only the basic launcher runs in order (a parallel launcher is refused).
Bad input exits with code 2 and a one-line message; nothing already written is touched.
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from ace_lightning.errors import USER_ERRORS, fail_on


def ddp_job_in_multirun(cfg: DictConfig) -> bool:
    """Lightning's ``ddp`` starts the other ranks by re-running the command line; inside a Hydra
    multirun that would be the whole sweep again. Such jobs run as a single-run subprocess."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    strategy = str((cfg.get("trainer") or {}).get("strategy", "auto"))
    # under Slurm (submitit) every rank is its own task already: Lightning's SLURMEnvironment
    started_by_slurm = "SLURM_NTASKS" in os.environ and "SLURM_JOB_NAME" in os.environ
    return (HydraConfig.get().mode == RunMode.MULTIRUN and strategy.startswith("ddp")
            and "spawn" not in strategy and "LOCAL_RANK" not in os.environ and not started_by_slurm)


def run_job_as_single_run() -> int:
    """This multirun job's overrides, as ``python -m ace_lightning.train`` in its own process."""
    import subprocess

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    cmd = [sys.executable, "-m", "ace_lightning.train", *hc.overrides.task,
           f"hydra.run.dir={hc.runtime.output_dir}"]
    return subprocess.run(cmd).returncode


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    from ace_lightning.console import setup_console

    setup_console()
    if ddp_job_in_multirun(cfg):
        code = run_job_as_single_run()
        if code:
            sys.exit(code)  # the job printed its own error line
        return
    from ace_lightning.registry import run_stage

    try:
        run_stage(cfg)
    except USER_ERRORS as err:  # one line for the user; tracebacks are for bugs
        fail_on(err)


if __name__ == "__main__":
    main()
