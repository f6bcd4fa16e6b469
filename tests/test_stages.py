"""Core and cert training stages through the real configs on tiny synthetic data: outputs,
manifests, schedules, resume, skip, bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ace_lightning.nets import build_net
from ace_lightning.data import get_dataset_info
from ace_lightning.registry import run_stage
from ace_lightning.errors import StageInputError
from ace_lightning.stages.schedules import CertSchedule, ramp_progress, step_decay
from stage_utils import CERT_TINY, CORE_TINY, compose_cfg


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- schedules -----------------------------------------------------------------------------------

def test_cert_schedule_eps_kappa_beta():
    s = CertSchedule(eps_train=0.105, warmup_steps=10, ramp_steps=20, kappa_end=0.5)
    assert s.eps(0) == s.eps(9) == 0.0 and s.kappa(5) == 1.0 and s.beta(5) == 1.0
    assert s.eps(20) == pytest.approx(0.0525) and s.kappa(20) == pytest.approx(0.75)
    assert s.beta(20) == pytest.approx(0.5)
    assert s.eps(30) == s.eps(10_000) == pytest.approx(0.105) and s.kappa(31) == 0.5 and s.beta(40) == 0.0
    smooth = [ramp_progress(t, 0, 10, "smooth") for t in range(11)]
    assert smooth[0] == 0 and smooth[-1] == 1 and all(a <= b for a, b in zip(smooth, smooth[1:]))
    assert smooth[2] < 0.2  # slow start
    with pytest.raises(ValueError, match="kappa_end"):
        CertSchedule(0.1, 0, 1, kappa_end=1.5)
    with pytest.raises(ValueError, match="ramp shape"):
        CertSchedule(0.1, 0, 1, shape="cosine")


def test_lr_decay_waits_for_the_end_of_the_ramp():
    assert [step_decay(e, 3, 2, 0.5) for e in range(8)] == [1, 1, 1, 1, 1, 0.5, 0.5, 0.25]


# -- cert stage ------------------------------------------------------------------------------------

def test_cert_stage_writes_checkpoints_weights_manifest_and_metrics(tmp_path):
    cfg = compose_cfg(tmp_path, CERT_TINY)
    manifest = run_stage(cfg)
    stage_dir = Path(cfg.run_dir).resolve() / "cert"
    assert manifest["status"] == "complete" and manifest["stage"] == "cert"
    assert (stage_dir / "checkpoints" / "last.ckpt").is_file()
    assert (stage_dir / "checkpoints" / "best.ckpt").is_file()
    on_disk = json.loads((stage_dir / "manifest.json").read_text())
    assert on_disk["outputs"]["weights"]["path"] == "cert.pt"
    for key in ("test/nat_acc", "test/ibp_cert_acc", "test/crown_ibp_cert_acc", "test/cert_acc",
                "test/pgd_acc", "best_val/cert_acc"):
        assert 0.0 <= on_disk["metrics"][key] <= 1.0, key
    m = on_disk["metrics"]
    assert m["test/ibp_cert_acc"] <= m["test/cert_acc"] <= m["test/pgd_acc"] <= m["test/nat_acc"]
    assert on_disk["code_version"]["package"]
    # exported weights load with weights_only into a freshly built net
    info = get_dataset_info("synthetic")
    net = build_net(on_disk["net"], info)
    net.load_state_dict(torch.load(stage_dir / "cert.pt", weights_only=True))
    rows = _rows(stage_dir / "metrics.csv")
    assert any(r.get("val/ibp_cert_acc") for r in rows) and any(r.get("train/eps") for r in rows)


def test_logged_eps_and_kappa_follow_the_schedule_in_steps(tmp_path):
    cfg = compose_cfg(tmp_path, CERT_TINY + ["stage.epochs=3", "stage.ramp_epochs=2"])
    run_stage(cfg)
    rows = [r for r in _rows(Path(cfg.run_dir).resolve() / "cert" / "metrics.csv") if r.get("train/eps")]
    dm_rows = {int(r["step"]): (float(r["train/eps"]), float(r["train/kappa"])) for r in rows}
    per_epoch = max(int(r["step"]) for r in rows if r["epoch"] == "0") + 1
    sched = CertSchedule(eps_train=0.03 * 1.05, warmup_steps=round(0.5 * per_epoch),
                         ramp_steps=2 * per_epoch, kappa_end=0.5)
    for step, (eps, kappa) in dm_rows.items():
        assert eps == pytest.approx(sched.eps(step), abs=1e-7)
        assert kappa == pytest.approx(sched.kappa(step), abs=1e-7)
    assert max(dm_rows) >= 2 * per_epoch  # the logged steps cover the whole ramp


class _Crash(L.Callback):
    """Simulates a crash mid-training (after ``at`` optimiser steps)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step >= self.at:
            raise RuntimeError("simulated crash")


def test_resume_continues_the_schedule_where_it_stopped(tmp_path):
    overrides = CERT_TINY + ["stage.epochs=3", "stage.ramp_epochs=2", "stage.checkpoint_every_n_steps=1"]
    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(cfg, callbacks=(_Crash(at=3),))
    stage_dir = Path(cfg.run_dir).resolve() / "cert"
    assert not (stage_dir / "manifest.json").exists()  # an interrupted stage is not "complete"
    before = torch.load(stage_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert before >= 2  # checkpoints run after other callbacks: the crash step itself is lost
    manifest = run_stage(compose_cfg(tmp_path, overrides))
    assert manifest["status"] == "complete"
    rows = [r for r in _rows(stage_dir / "metrics.csv") if r.get("train/eps")]
    steps = sorted(int(r["step"]) for r in rows)
    assert steps[0] == 0  # the curve from before the crash is kept (metrics.csv appended)
    per_epoch = manifest["global_step"] // 3
    sched = CertSchedule(0.03 * 1.05, round(0.5 * per_epoch), 2 * per_epoch, 0.5)
    for r in rows:  # before and after the crash: the same schedule, no restart from step 0
        assert float(r["train/eps"]) == pytest.approx(sched.eps(int(r["step"])), abs=1e-7)
    assert max(steps) == manifest["global_step"] - 1


def test_completed_stage_is_skipped_and_a_different_config_is_refused(tmp_path, capsys):
    cfg = compose_cfg(tmp_path, CERT_TINY)
    first = run_stage(cfg)
    again = run_stage(compose_cfg(tmp_path, CERT_TINY))
    assert again["created"] == first["created"]
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(StageInputError, match="different config"):
        run_stage(compose_cfg(tmp_path, CERT_TINY + ["stage.kappa_end=0.2"]))


@pytest.mark.parametrize("override, message", [
    (["stage.ramp_epochs=5"], "eps schedule ends after training ends"),
    (["stage.kappa_end=1.5"], "kappa_end must be in"),
    (["stage.method=CROWN"], "unknown certified-training method"),
    (["eps=1.5"], "eps must be in"),
    (["stage.select_weight=1.5"], "select_weight"),
    (["stage.select_weight=0.5", "stage.select_margin=0"], "select_margin must be positive"),
    (["stage.select_weight=0.5", "stage.loss_fusion=true"], "loss_fusion: false"),
    (["stage.select_weight=0.5", "stage.select_start_epoch=1"], "inside the eps schedule"),
    (["stage.select_weight=0.5", "stage.select_start_epoch=2"], "would never run"),
    (["stage.select_weight=0.5", "stage.select_lr=0"], "select_lr must be positive"),
])
def test_bad_cert_config_fails_before_training(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run_stage(compose_cfg(tmp_path, CERT_TINY + override))
    assert not (Path(tmp_path) / "synthetic").exists() or not any(Path(tmp_path).rglob("*.ckpt"))


def test_selection_margin_loss_values_and_gradients():
    from ace_lightning.stages.cert import selection_margin_loss
    # input 0 certified with margin 1 (target 4): 3/4; input 1 certified beyond the target: 0;
    # input 2 not certified, natural top-2 gap 2 (x weight 0.5): 1/4
    lb = torch.tensor([[1.0, 2.0], [5.0, 6.0], [-1.0, 3.0]], requires_grad=True)
    logits = torch.tensor([[3.0, 0.0, 0.0], [9.0, 0.0, 1.0], [1.0, 3.0, 1.0]], requires_grad=True)
    loss = selection_margin_loss(lb, logits, margin=4.0, uncertified_weight=0.5)
    assert loss.item() == pytest.approx((3 / 4 + 0 + 1 / 4) / 3)
    loss.backward()
    # gradient descent raises the certified input's smallest margin and shrinks the uncertified
    # input's natural gap; nothing else moves
    assert lb.grad[0, 0] < 0 and lb.grad[0, 1] == 0 and not lb.grad[1].any() and not lb.grad[2].any()
    assert logits.grad[2, 1] > 0 and logits.grad[2, 0] + logits.grad[2, 2] < 0
    assert not logits.grad[:2].any()


def test_selection_co_training_starts_after_the_ramp(tmp_path):
    cfg = compose_cfg(tmp_path, CERT_TINY + ["stage.epochs=3", "stage.select_weight=0.5"])
    manifest = run_stage(cfg)
    assert manifest["status"] == "complete"
    rows = [r for r in _rows(Path(cfg.run_dir).resolve() / "cert" / "metrics.csv") if r.get("train/eps")]
    eps_train = 0.03 * 1.05
    during = [r for r in rows if float(r["train/eps"]) < eps_train * (1 - 1e-6)]
    after = [r for r in rows if float(r["train/eps"]) >= eps_train * (1 - 1e-6)]
    assert during and after
    assert not any(r.get("train/selection_loss") for r in during)
    assert all(0.0 <= float(r["train/selection_loss"]) for r in after)
    # the co-trained (last) weights are exported, not the best val cert_acc from before co-training
    assert manifest["outputs"]["best_checkpoint"] is None
    last = torch.load(Path(cfg.run_dir).resolve() / "cert" / "checkpoints" / "last.ckpt", weights_only=False)
    exported = torch.load(Path(cfg.run_dir).resolve() / "cert" / "cert.pt", weights_only=True)
    for name, value in exported.items():
        assert torch.equal(value, last["state_dict"][f"net.{name}"]), name


def test_selection_co_training_lr_warm_restart():
    from ace_lightning.stages.cert import CertConfig, CertStage
    net = build_net({"name": "small", "kind": "cert"}, get_dataset_info("synthetic"))
    common = dict(optimizer={"name": "adam", "lr": 1e-3}, lr_schedule={"step_epochs": 5, "gamma": 0.5},
                  warmup_epochs=1, ramp_epochs=10, epochs=34)
    plain = CertStage(net, CertConfig.from_dict(common, 0.03), 0.03)
    restart = CertStage(net, CertConfig.from_dict({**common, "select_weight": 0.8, "select_start_epoch": 24,
                                                   "select_lr": 5e-4, "select_lr_step_epochs": 3}, 0.03), 0.03)
    assert [plain.lr_factor(e) for e in (0, 10, 11, 16, 21, 23)] == [1, 1, 1, 0.5, 0.25, 0.25]
    for e in range(24):  # the certified-training phase is untouched
        assert restart.lr_factor(e) == plain.lr_factor(e)
    assert [restart.lr_factor(e) for e in (24, 26, 27, 30, 33)] == [0.5, 0.5, 0.25, 0.125, 0.0625]


def test_selection_co_training_can_start_later(tmp_path):
    cfg = compose_cfg(tmp_path, CERT_TINY + ["stage.epochs=3", "stage.select_weight=0.5",
                                             "stage.select_start_epoch=2"])
    run_stage(cfg)
    rows = [r for r in _rows(Path(cfg.run_dir).resolve() / "cert" / "metrics.csv") if r.get("train/eps")]
    per_epoch = max(int(r["step"]) for r in rows if r["epoch"] == "0") + 1
    with_loss = sorted(int(r["step"]) for r in rows if r.get("train/selection_loss"))
    assert with_loss and with_loss[0] == 2 * per_epoch


def test_cert_net_the_bound_layer_cannot_handle_fails_before_training(tmp_path, monkeypatch):
    import ace_lightning.stages.runner as runner

    real = runner.build_net

    def with_maxpool(cfg, info, **kw):
        net = real(cfg, info, **kw)
        return torch.nn.Sequential(torch.nn.MaxPool2d(3, 1, 1), net)

    monkeypatch.setattr(runner, "build_net", with_maxpool)
    with pytest.raises(ValueError, match="bound layer cannot handle"):
        run_stage(compose_cfg(tmp_path, CERT_TINY))
    assert not any(Path(tmp_path).rglob("*.ckpt"))


# -- core stage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["natural", "pgd"])
def test_core_stage(tmp_path, mode):
    extra = ["stage.mode=pgd", "stage.train_eps=0.01", "stage.pgd_steps=2"] if mode == "pgd" else []
    manifest = run_stage(compose_cfg(tmp_path, CORE_TINY + extra))
    assert manifest["outputs"]["weights"]["path"] == "core.pt"
    m = manifest["metrics"]
    assert 0 <= m["test/pgd_acc"] <= m["test/nat_acc"] <= 1
    assert manifest["config"]["stage"]["mode"] == mode


def test_core_stage_channels_last_trains_and_exports_plain_weights(tmp_path):
    """stage.channels_last: the core trains in NHWC; its exported weights load into a net built
    from the config and give the stage's test accuracy."""
    from ace_lightning.config import datamodule_from

    cfg = compose_cfg(tmp_path, CORE_TINY + ["stage.channels_last=true", "stage.eval_pgd_steps=0"])
    manifest = run_stage(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    dm = datamodule_from(cfg)
    dm.setup("test")
    net = build_net(dict(cfg.core_net), dm.info).eval()
    net.load_state_dict(torch.load(run_dir / "core" / "core.pt", weights_only=True))
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((net(x).argmax(-1) == y).sum())
            total += len(y)
    assert correct / total == pytest.approx(manifest["metrics"]["test/nat_acc"], abs=1e-6)
    assert manifest["config"]["stage"]["channels_last"] is True


def test_unknown_timm_core_is_a_one_line_error_from_the_cli(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "ace_lightning.train", "stage=core", "data=synthetic",
           "core_net.name=no_such_net_xyz", f"runs_root={tmp_path}", "trainer.accelerator=cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "no_such_net_xyz" in last
