"""Hydra callbacks of the training entry point (registered in conf/train.yaml).

``ConfigCheck``: a single run's config (every stage it will run, its knobs, eps, data) is checked
before Hydra makes the run's output folder (``<run_dir>/.hydra/<stage>``), so a bad input ends
with one ``error:`` line and exit code 2 and leaves nothing behind. A multirun's jobs check theirs
when they start (registry.run_job), where a failure is recorded in the job's job.json for the
sweep's summary.

``SweepGuard``: a chain of stages swept as separate jobs (``-m stage=core,cert,gate,certify``)
relies on the basic launcher running jobs one after another; a parallel launcher (joblib,
submitit) would start the gate before the cert-net exists. Such a sweep is refused in one line
before any job starts; ``stage=pipeline`` is the form that runs anywhere. After a multirun the
runs summary is written once, with every run folder of the runs root (jobs finishing at the
same moment cannot miss each other); the sweep's own jobs (their ``job.json`` holds the sweep's id,
summary.SWEEP_ENV: other sweeps and single runs in the same runs root are not its jobs) are listed
with their status, the summary table goes to wandb once when ``logger=wandb``, and a sweep with a
failed job exits with code 1. A search (``search`` set, the optuna sweeper) is refused up front when
its objective does not match the sweeper's directions.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ace_lightning.console import log

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


class ConfigCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ace_lightning.errors import USER_ERRORS, fail_on
        from ace_lightning.registry import check_job

        try:
            check_job(config)
        except USER_ERRORS as err:
            fail_on(err)


class SweepGuard(Callback):
    started: float = 0.0  # time.time() when this multirun started: its jobs are those started later
    sweep_id: str = ""    # this multirun's id, in the environment its jobs inherit (summary.SWEEP_ENV)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ace_lightning.summary import SWEEP_ENV

        self.started = time.time()
        self.sweep_id = uuid.uuid4().hex[:12]
        os.environ[SWEEP_ENV] = self.sweep_id
        if config.get("search"):  # a search: its objective against the sweeper's directions
            from ace_lightning.errors import ConfigError, fail_on
            from ace_lightning.search import check_sweeper

            try:
                check_sweeper(config)
            except ConfigError as err:
                fail_on(err)
        launcher = str((config.hydra.get("launcher") or {}).get("_target_", BASIC_LAUNCHER))
        stages = chained_stage_sweep(list(config.hydra.overrides.task))
        if stages and launcher != BASIC_LAUNCHER:
            name = launcher.rsplit(".", 1)[-1]
            print(f"error: -m stage={','.join(stages)} runs the stages as separate jobs, which only the basic "
                  f"launcher runs in order ({name} would run them at once): use stage=pipeline "
                  f"stage.stages=[{','.join(stages)}]", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ace_lightning.summary import SWEEP_ENV, job_states, write_summary

        if os.environ.get(SWEEP_ENV) == self.sweep_id:  # later runs of this process are not this sweep's
            del os.environ[SWEEP_ENV]

        root = Path(str(config.get("runs_root", "runs"))).resolve()
        if not root.is_dir():
            return
        rows = write_summary(root)
        jobs = job_states(root, since=self.started - 1.0, sweep=self.sweep_id or None)
        failed = {run: job for run, job in jobs.items() if job.get("status") != "complete"}
        log.info(f"sweep: {len(jobs) - len(failed)} of {len(jobs)} jobs complete" +
                 "".join(f"\n  {job.get('status', '?')}: {run}: {job.get('error') or ''}" for run, job in failed.items()))
        if rows:
            log.info(f"runs summary: {root / 'summary.md'} (and summary.csv)")
            if (root / "summary_seeds.md").is_file() and any(job.get("seed") for job in jobs.values()):
                log.info(f"over seeds: {root / 'summary_seeds.md'} (mean +- std; and summary_seeds.csv)")
            log_sweep_to_wandb(config, root, rows, jobs)
        if failed:
            log.error(f"{len(failed)} of {len(jobs)} sweep jobs failed (see {root / 'summary.md'})")
            sys.exit(1)


def log_sweep_to_wandb(config: DictConfig, root: Path, rows: list[dict], jobs: dict[str, dict]) -> None:
    """The runs summary as one wandb Table per multirun (job type ``sweep``, offline unless the
    user opted in), beside the stage runs of each job."""
    from ace_lightning.loggers import wandb_mode, wandb_settings
    from ace_lightning.summary import COLUMNS

    wb = wandb_settings(config)
    mode = wandb_mode(wb)
    if mode is None:
        return
    import wandb

    overrides = [str(o) for o in config.hydra.overrides.task]
    name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    run = wandb.init(project=wb.get("project", "ace-lightning"), entity=wb.get("entity"), group="sweeps", name=name,
                     job_type="sweep", dir=str(root), mode=mode, reinit="finish_previous",
                     config={"overrides": overrides, "runs_root": str(root), "jobs": len(jobs),
                             "failed": sum(j.get("status") != "complete" for j in jobs.values())})
    try:
        table = wandb.Table(columns=list(COLUMNS), allow_mixed_types=True,
                            data=[[r.get(c) for c in COLUMNS] for r in rows])
        run.log({"runs_summary": table})
        run.summary["jobs"] = {k: v.get("status") for k, v in jobs.items()}
    finally:
        run.finish()
