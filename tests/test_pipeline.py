"""The pipeline as a user runs it: Hydra multirun chaining the stages, one run folder per
(data, eps), wandb offline, SIGKILL + rerun resumes, the CIFAR reproduction in SMOKE mode on
generated CIFAR-format files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
TINY = ["data=synthetic", "data.subset=64", "data.val_size=48", "data.batch_size=16", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "eps=0.03", "net@cert_net=fc", "net@core_net=fc",
        "+stage_overrides.core.epochs=1", "+stage_overrides.core.eval_pgd_steps=1",
        "+stage_overrides.cert.epochs=1", "+stage_overrides.cert.warmup_epochs=0",
        "+stage_overrides.cert.ramp_epochs=1", "+stage_overrides.cert.val_pgd_steps=1",
        "+stage_overrides.gate.epochs=1", "+stage_overrides.gate.ramp_epochs=1",
        "+stage_overrides.certify.attack.steps=2",
        # the ladder and the refinement without alpha-CROWN (seconds per input on a CPU; its own tests cover it)
        "+stage_overrides.certify.methods=[IBP,CROWN-IBP,CROWN]", "+stage_overrides.certify.refine_methods=[CROWN]"]


def _train(args: list[str], tmp: Path, env=None, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ace_lightning.train", *args, f"runs_root={tmp}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=timeout)


@pytest.mark.slow  # the chained form; make test keeps the pipeline job (test_pipeline_job.py)
def test_multirun_chains_the_stages_and_sweeps_eps(tmp_path):
    res = _train(["-m", "stage=core,cert,gate,certify", *[t for t in TINY if not t.startswith("eps=")],
                  "eps=0.02,0.04"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for eps in ("0.02", "0.04"):
        run = tmp_path / "synthetic" / f"eps_{eps}"
        for stage in ("core", "cert", "gate", "certify"):
            manifest = json.loads((run / stage / "manifest.json").read_text())
            assert manifest["status"] == "complete", (eps, stage)
        certify = run / "certify"
        for name in ("records.csv", "records.parquet", "sweep_val.csv", "sweep_test.csv", "operating_points.json",
                     "pareto.png", "ace_model.pt", "table.txt"):
            assert (certify / name).is_file(), name
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("run,data,eps")
    assert {line.split(",")[2] for line in summary[1:]} == {"0.02", "0.04"}
    assert "natural" in res.stdout and "certified" in res.stdout  # the table is printed


def test_every_stage_under_ddp_with_two_gloo_processes(tmp_path):
    """trainer=ddp_cpu (2 ranks, gloo) for core, cert, gate and certify in one pipeline job. Real
    `ddp` re-executes the command line, so this runs in a subprocess: both ranks run the pipeline
    in step; rank 0 writes every file, and the gate labels are certified once, not per rank."""
    tiny = [t for t in TINY if not t.startswith("eps=")] + ["eps=0.005", "trainer=ddp_cpu"]
    res = _train(["stage=pipeline", *tiny], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert out.count("Starting with 2 processes") >= 1
    assert out.count("gate labels: certifying") == 1  # prepare_data on rank 0 only
    run = tmp_path / "synthetic" / "eps_0.005"
    for stage in ("core", "cert", "gate"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage
        assert sorted(p.name for p in (run / stage / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
        assert out.count(f"stage '{stage}' complete") == 1  # one rank writes, the console is rank zero
    gate = json.loads((run / "gate" / "manifest.json").read_text())
    assert gate["gate_status"] == "trained", gate["labels"]
    records = (run / "certify" / "records.csv").read_text().splitlines()
    header = records[0].split(",")
    keys = [(r.split(",")[header.index("split")], r.split(",")[header.index("index")]) for r in records[1:]]
    assert len(keys) == len(set(keys)) == 48 + 64  # every val and test input exactly once
    assert json.loads((run / "certify" / "manifest.json").read_text())["status"] == "complete"


def test_a_missing_stage_is_named_in_a_one_line_error(tmp_path):
    res = _train(["stage=gate", *TINY], tmp_path)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "needs stage 'cert'" in last


def _stop_at_first_complete_checkpoint(proc: subprocess.Popen, ckpt: Path, log: Path, timeout: float = 300) -> dict:
    """Poll until ``ckpt`` exists, freeze the run (SIGSTOP) so nothing changes while the file is
    read, and return the checkpoint once it loads; a file caught half-written lets the run go on."""
    import torch

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before writing {ckpt.name}: "
                        f"{log.read_text()[-3000:]}")
        if ckpt.is_file():
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                return torch.load(ckpt, map_location="cpu", weights_only=False)
            except Exception:  # not complete yet
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
    pytest.fail(f"no {ckpt.name} after {timeout} s: {log.read_text()[-3000:]}")


@pytest.mark.slow  # a real kill and resume, about 15 s
def test_sigkill_mid_epoch_then_rerun_resumes_and_finishes(tmp_path):
    """SIGKILL right after the first mid-epoch last.ckpt (checkpoint_every_n_steps), then the
    same command again: it resumes from that checkpoint's step instead of starting over."""
    import csv

    subset, batch, epochs = 256, 8, 3
    args = ["stage=cert", *TINY, f"data.subset={subset}", f"data.batch_size={batch}",
            f"+stage_overrides.cert.epochs={epochs}", "+stage_overrides.cert.checkpoint_every_n_steps=2"]
    args = [a for a in args if a not in ("+stage_overrides.cert.epochs=1",)]
    cmd = [sys.executable, "-m", "ace_lightning.train", *args, f"runs_root={tmp_path}"]
    stage_dir = tmp_path / "synthetic" / "eps_0.03" / "cert"
    total_steps = epochs * subset // batch
    log = tmp_path / "killed_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        ckpt = _stop_at_first_complete_checkpoint(proc, stage_dir / "checkpoints" / "last.ckpt", log)
    finally:
        proc.kill()  # SIGKILL, also when stopped
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(ckpt["global_step"])
    assert 0 < killed_at < total_steps and killed_at % (subset // batch), f"not mid-epoch: step {killed_at}"
    assert not (stage_dir / "manifest.json").exists()
    assert not list(stage_dir.glob("**/*.tmp"))  # nothing half-written left behind
    metrics = stage_dir / "metrics.csv"
    rows_before = len(list(csv.DictReader(metrics.open(newline="")))) if metrics.exists() else 0

    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming stage 'cert'" in res.stdout + res.stderr
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["epochs_trained"] == epochs
    assert manifest["global_step"] == total_steps
    # the rerun trained exactly the steps after the checkpoint (the CSV log appends across runs)
    rows = list(csv.DictReader(metrics.open(newline="")))[rows_before:]
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(killed_at, total_steps))


def test_wandb_offline_run_has_the_logged_keys(tmp_path):
    env = dict(ENV, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_API_KEY="")
    env.pop("WANDB_API_KEY")
    res = _train(["-m", "stage=core,cert,gate,certify", *TINY, "logger=wandb"], tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "synthetic" / "eps_0.03"
    offline = sorted(run.glob("*/wandb/offline-run-*"))
    assert {p.parts[-3] for p in offline} >= {"core", "cert", "gate", "certify"}

    def logged(stage: str) -> bytes:
        """The offline run's record log (protobuf records; keys are stored as plain strings)."""
        run_dir = next(p for p in offline if p.parts[-3] == stage)
        return b"".join(f.read_bytes() for f in run_dir.glob("run-*.wandb"))

    certify = logged("certify")
    for key in (b"sweep/val", b"sweep/test", b"pareto", b"nat_within_1pt/cert_acc"):
        assert key in certify, key
    cert = logged("cert")
    for key in (b"train/loss", b"train/eps", b"val/cert_acc", b"val/ibp_cert_acc"):
        assert key in cert, key
    assert b"val/cert_acc" not in logged("core")  # each stage has its own run
    for stage in ("core", "cert", "gate", "certify"):  # the config a dashboard filters runs by
        rec = logged(stage)
        for key in (b"stage_name", b"selection", b"method", b"seed"):
            assert key in rec, (stage, key)
    assert b"operating_points" in certify  # the records' summary per operating point
    sweep = sorted(tmp_path.glob("wandb/offline-run-*"))  # the multirun's summary table, once
    assert len(sweep) == 1 and b"runs_summary" in b"".join(f.read_bytes() for f in sweep[0].glob("run-*.wandb"))


CIFAR_FAST = ["cifar10_aceentropy_ibp_2_255", "cifar10_acenet_mtlibp_2_255"]


@pytest.mark.parametrize("wanted", [
    # entropy selection (C2), a gate on a CNN7 (BatchNorm) MTL-IBP cert-net: 73 s, make test-all
    # (make test keeps the pipeline job itself: tests/test_pipeline_job.py)
    pytest.param(CIFAR_FAST, marks=pytest.mark.slow),
    pytest.param(None, marks=pytest.mark.slow),  # every pipeline of make reproduce-cifar
], ids=["fast", "all"])
def test_reproduce_cifar_smoke_on_generated_cifar_files(tmp_path, wanted):
    """`make reproduce-cifar SMOKE=1`: the CIFAR-10 pipelines (EfficientNet-B0 core, C2/C3/C5 and
    CNN7 cert-nets, gate or entropy selection, certify) on generated CIFAR-format files."""
    from ace_lightning.pipeline import REPRODUCE
    from test_data import _write_cifar

    _write_cifar(str(tmp_path / "cifar"), per_batch=40, n_test=64)
    runs = tmp_path / "runs"
    wanted = wanted or [name for name, *_ in REPRODUCE]
    cmd = [sys.executable, "-m", "ace_lightning.pipeline", "--smoke", "--runs-root", str(runs), "--only", *wanted,
           "--", f"data.data_dir={tmp_path / 'cifar'}", "data.download=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((runs / "reproduce.json").read_text())
    assert [r["experiment"] for r in rows] == wanted
    for r in rows:
        assert 0 <= r["nat_within_1pt"]["nat_acc"] <= 1 and r["expected_nat"] > 0
    assert "90.1 / 27.5" in res.stdout and "78.8 / 64.4" in res.stdout and "SMOKE" in res.stdout
    cert = json.loads((runs / "cifar10_acenet_mtlibp" / "eps_2_255" / "cert" / "manifest.json").read_text())
    assert cert["config"]["stage"]["method"] == "MTL-IBP" and cert["net"]["name"] == "cnn7"
    assert (runs / "cifar10_aceentropy_ibp" / "eps_2_255" / "certify_entropy" / "manifest.json").is_file()


@pytest.mark.slow  # make test attacks entropy certificates in test_certify_paths.py
def test_entropy_selection_on_the_cert_stages_own_selection_co_trained_net(tmp_path):
    """cert with selection co-training, then certify with entropy selection on cert/ itself
    (stage.entropy_stage=cert): no entropy stage needed, records in certify_entropy_cert/."""
    res = _train(["-m", "stage=core,cert,certify", *TINY, "++stage_overrides.cert.epochs=2",
                  "+stage_overrides.cert.select_weight=0.5", "+stage_overrides.certify.selection=entropy",
                  "+stage_overrides.certify.entropy_stage=cert"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "synthetic" / "eps_0.03"
    cert = json.loads((run / "cert" / "manifest.json").read_text())
    assert cert["outputs"]["best_checkpoint"] is None  # co-trained: the last weights are exported
    manifest = json.loads((run / "certify_entropy_cert" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["selection"] == "entropy"
    assert not (run / "entropy").exists() and not (run / "certify").exists()
    header = (run / "certify_entropy_cert" / "records.csv").read_text().splitlines()[0].split(",")
    assert {"g", "lb_g", "ub_g", "cert_ok"} <= set(header)
    # without entropy_stage=cert the certify stage names the missing entropy stage
    res = _train(["stage=certify", *TINY, "stage.selection=entropy"], tmp_path)
    assert res.returncode != 0 and "entropy" in res.stderr.strip().splitlines()[-1]
