"""Hydra entry point: ``ace-train stage=<core|cert|gate|entropy|certify|pipeline> data=<name> eps=<eps>``
(or ``python -m ace_lightning.train ...``).

``stage=pipeline`` runs the stages of one run folder in order in one job, so sweeps over datasets
and epsilons run in parallel under any Hydra launcher (``hydra/launcher=joblib`` here,
``submitit_slurm`` on a cluster). ``-m stage=core,cert,gate,certify`` chains the stages as
separate jobs, which only the basic launcher runs in order (a parallel launcher is refused).
Bad input exits with code 2 and a one-line message (a knob a stage does not have names the
closest one it has); every stage the job will run is checked before anything is written, and
nothing already written is touched.

Every job records its outcome in ``<run_dir>/job.json``. Inside a multirun a failed job does not
stop the sweep: it prints its error (and a bug's traceback), the other jobs run on, and the sweep
ends with the runs summary listing every job and exit code 1 (hydra_callbacks.SweepGuard).
A search (``stage=pipeline experiment=search_fmnist``, the optuna sweeper) gets each trial's
objective(s) on the validation split as the job's return value (search.py).
"""
from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from ace_lightning.errors import USER_ERRORS, fail_on, hydra_entry


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


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def run_job_as_single_run(run_name: str) -> int:
    """This multirun job's overrides, as ``python -m ace_lightning.train`` in its own process, in this
    job's run folder (a search's trial folder comes from the sweep's job number, which a single run
    has not) and as a single run (a search's experiment makes itself a multirun)."""
    import subprocess

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    cmd = [sys.executable, "-m", "ace_lightning.train", *hc.overrides.task, f"run_name={run_name}",
           "hydra.mode=RUN", f"hydra.run.dir={hc.runtime.output_dir}"]
    return subprocess.run(cmd).returncode


def ddp_job_as_single_run(run_name: str) -> None:
    """run_job_as_single_run for run_job: a failed process raises (it printed its own error line
    and wrote job.json)."""
    code = run_job_as_single_run(run_name)
    if code:
        raise ChildProcessError(f"the job's DDP process exited with code {code}")


def main() -> None:
    """``ace-train``: Hydra's own errors (a key the config lacks, an unknown option) are one line too."""
    hydra_entry(train)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train(cfg: DictConfig) -> Any:
    """The job; a search's trial (``search`` set) returns its objective(s) on val for the sweeper
    (search.py), None when it failed (the sweeper records a failed trial)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    from ace_lightning.console import setup_console

    setup_console()
    from ace_lightning.registry import run_job

    work = (lambda: ddp_job_as_single_run(str(cfg.run_name))) if ddp_job_in_multirun(cfg) else None
    try:
        if cfg.get("search"):
            from ace_lightning.search import run_trial

            return run_trial(cfg, lambda: run_job(cfg, work=work))
        run_job(cfg, work=work)
    except USER_ERRORS as err:  # one line for the user; tracebacks are for bugs
        if not in_multirun():
            fail_on(err)
        job_failed(cfg, err, traceback=False)
    except Exception as err:
        if not in_multirun():
            raise
        job_failed(cfg, err, traceback=not isinstance(err, ChildProcessError))


def job_failed(cfg: DictConfig, err: Exception, traceback: bool) -> None:
    """A failed job of a multirun: its error on stderr (a bug's traceback too), then back to the
    launcher, which runs the other jobs; job.json says it failed."""
    import traceback as tb

    from ace_lightning.errors import error_line
    from ace_lightning.registry import error_one_line

    if traceback:
        tb.print_exception(err, file=sys.stderr)
    line = error_line(err) if isinstance(err, USER_ERRORS) else error_one_line(err)
    print(f"error: job {cfg.run_dir} failed: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
