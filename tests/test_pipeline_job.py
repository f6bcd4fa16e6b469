"""One pipeline job per run folder (stage=pipeline): the stages in order in one process, any Hydra
launcher running many such jobs in parallel; a chain of stage jobs refused under a parallel
launcher; the runs summary written once after the sweep."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ace_lightning.config import CONF_DIR
from ace_lightning.hydra_callbacks import chained_stage_sweep
from ace_lightning.registry import run_stage, stage_config

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
# debug=tiny (synthetic data, 96 images) plus one epoch per stage and cheap certification
PIPELINE_TINY = ["debug=tiny", "net@cert_net=fc", "net@core_net=fc",
                 "+stage_overrides.core.epochs=1", "+stage_overrides.core.eval_pgd_steps=1",
                 "+stage_overrides.cert.epochs=1", "+stage_overrides.cert.warmup_epochs=0",
                 "+stage_overrides.cert.ramp_epochs=1", "+stage_overrides.cert.val_pgd_steps=1",
                 "+stage_overrides.gate.epochs=1", "+stage_overrides.gate.ramp_epochs=1",
                 "+stage_overrides.certify.attack.steps=2",
                 "+stage_overrides.certify.methods=[IBP,CROWN-IBP]", "+stage_overrides.certify.refine_methods=[]"]
STAGES = ("core", "cert", "gate", "certify")


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
    capsys.readouterr()
    again = run_stage(cfg)  # same config: every stage is skipped, nothing is rewritten
    text = capsys.readouterr().out
    assert text.count("skipped") == len(STAGES), text
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


def test_joblib_launcher_runs_a_two_job_eps_sweep_in_parallel(tmp_path):
    """`-m stage=pipeline eps=a,b hydra/launcher=joblib`: two pipeline jobs at once (one thread
    each); both run folders complete and the runs summary written after the sweep holds both."""
    res = _train(["-m", "stage=pipeline", "eps=0.02,0.04", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  f"runs_root={tmp_path}", *PIPELINE_TINY], timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in res.stdout + res.stderr  # Hydra says which launcher ran the jobs
    for eps in ("0.02", "0.04"):
        run = tmp_path / "synthetic" / f"eps_{eps}"
        for name in STAGES:
            assert json.loads((run / name / "manifest.json").read_text())["status"] == "complete", (eps, name)
    with open(tmp_path / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["run"] for r in rows} == {"synthetic/eps_0.02", "synthetic/eps_0.04"}


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
