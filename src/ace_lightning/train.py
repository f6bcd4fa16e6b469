"""Hydra entry point: ``python -m ace_lightning.train stage=<core|cert|...> data=<name> eps=<eps>``.

Multirun chains stages (``-m stage=core,cert``): every job of one (data, eps) combination shares
the run folder, each stage reads what the earlier ones wrote. Bad input exits with code 2 and a
one-line message; nothing already written is touched.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def error_line(err: BaseException) -> str:
    """The first line of a user error's message (ACE_TRACEBACK=1: re-raise it, for debugging)."""
    if os.environ.get("ACE_TRACEBACK"):
        raise err
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return msg.strip("'\"")


def fail_on(err: BaseException) -> None:
    fail(error_line(err))


def ddp_job_in_multirun(cfg: DictConfig) -> bool:
    """Lightning's ``ddp`` starts the other ranks by re-running the command line; inside a Hydra
    multirun that would be the whole sweep again. Such jobs run as a single-run subprocess."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    strategy = str((cfg.get("trainer") or {}).get("strategy", "auto"))
    return (HydraConfig.get().mode == RunMode.MULTIRUN and strategy.startswith("ddp")
            and "spawn" not in strategy and "LOCAL_RANK" not in os.environ)


def run_job_as_single_run() -> int:
    """This multirun job's overrides, as ``python -m ace_lightning.train`` in its own process."""
    import subprocess

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    cmd = [sys.executable, "-m", "ace_lightning.train", *hc.overrides.task,
           f"hydra.run.dir={hc.runtime.output_dir}"]
    return subprocess.run(cmd).returncode


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    if ddp_job_in_multirun(cfg):
        code = run_job_as_single_run()
        if code:
            sys.exit(code)  # the job printed its own error line
        return
    from ace_lightning.stages import run_stage

    try:
        run_stage(cfg)
    except USER_ERRORS as err:  # one line for the user; tracebacks are for bugs
        fail_on(err)


if __name__ == "__main__":
    main()
