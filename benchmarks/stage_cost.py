"""Stage throughput against arithmetic, in the same run (issue: every stage close to the cost of
its own arithmetic).

- Training stages (core, cert, gate): the real stage (the demo's config, its datamodule,
  Lightning, logging, progress bar) for a number of steps; its time per training step is the
  median gap between consecutive batch starts (and the mean, which counts the slow steps:
  logging, the first batch). The bare loop runs the same net, batch size and loss by hand on one
  batch of the same data. Ratio = stage step / bare step (target: cert <= 1.3). The gate stage
  runs on a copy of the demo's run folder (its cert-net and cached labels).
- Certify stage: on a copy of the demo's trained run folder (make demo first), the stage's wall
  time against its certification pass (target <= 5x), from the manifest it writes.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from ace_lightning.bounds import robust_ce_loss
from ace_lightning.config import CONF_DIR, datamodule_from
from ace_lightning.nets import build_net
from ace_lightning.registry import run_stage
from ace_lightning.stages.common import l1_penalty
from lightning_overhead import _median_gap, _Stamps  # the same stamps and median as the Lightning-overhead bench


def _mean_gap(stamps: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return sum(gaps) / max(1, len(gaps))

ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = ROOT / "runs" / "demo_fmnist_full" / "eps_0.1"


def _cfg(stage: str, runs_root: Path, steps: int, extra: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[
            "experiment=demo_fmnist_full", f"stage={stage}", f"runs_root={runs_root}",
            f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=0", "trainer.limit_test_batches=1",
            f"++stage_overrides.{stage}.epochs=1", *extra])


def _bare_step(stage: str, cfg, steps: int, warmup: int) -> tuple[float, float]:
    """The stage's arithmetic by hand: one batch of the same data, the same net and loss;
    (median, mean) seconds per step."""
    dm = datamodule_from(cfg)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    spec = dict(cfg["core_net" if stage == "core" else "cert_net"])
    net = build_net({**spec, "kind": "gate"} if stage == "gate" else spec, dm.info).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    eps = float(cfg.eps) * 1.05
    gate, label = None, (torch.arange(x.shape[0]) % 4 != 0).long()  # the demo's label balance, about 3:1
    if stage == "gate":
        from ace_lightning.stages.gate import GateConfig, GateStage
        config = GateConfig.from_dict({"optimizer": {"name": "adam", "lr": 1e-3}, "lr_schedule": {},
                                       "worst_case_negatives": False}, float(cfg.eps))
        gate = GateStage(net, config, float(cfg.eps))
    stamps = []
    for _ in range(steps + 1):
        stamps.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        if stage == "core":
            loss = nn.functional.cross_entropy(net(x), y)
        elif stage == "gate":
            loss = gate.gate_loss(x, label, eps, kappa=0.0, beta=None, pos_weight=1.0)[0] + 1e-5 * l1_penalty(net)
        else:
            robust, logits = robust_ce_loss(net, x, y, eps, "IBP", return_logits=True)
            loss = 0.5 * nn.functional.cross_entropy(logits, y) + 0.5 * robust + 1e-5 * l1_penalty(net)
        loss.backward()
        opt.step()
    return _median_gap(stamps, warmup), _mean_gap(stamps, warmup)


def training_stage(stage: str, steps: int = 40, warmup: int = 5, run_dir: Path = DEMO_RUN,
                   channels_last: bool = False) -> dict:
    """One stage of the demo for ``steps`` training steps (eps at its target from step 0: the
    cost of the steps after the ramp, most of them) against its bare loop (``channels_last``: the
    core stage in NHWC against the plain NCHW bare loop, i.e. the speed-up it buys)."""
    with tempfile.TemporaryDirectory() as tmp:
        extra: tuple[str, ...] = ("++stage_overrides.core.channels_last=true",) if channels_last else ()
        if stage in ("cert", "gate"):
            extra += (f"++stage_overrides.{stage}.warmup_epochs=0", f"++stage_overrides.{stage}.ramp_epochs=0")
        if stage == "gate":  # the demo's trained cert-net and its cached labels
            if not all((run_dir / s / "manifest.json").is_file() for s in ("core", "cert", "gate")):
                return {"stage": stage, "skipped": f"no trained demo run folder at {run_dir}: run make demo first"}
            copy = Path(tmp) / "demo_fmnist_full" / "eps_0.1"
            for s in ("core", "cert"):
                shutil.copytree(run_dir / s, copy / s, ignore=shutil.ignore_patterns("checkpoints"))
            (copy / "gate").mkdir()
            for f in (run_dir / "gate").glob("labels_*.pt"):
                shutil.copy(f, copy / "gate")
        cfg = _cfg(stage, Path(tmp), steps, extra)
        before = _bare_step(stage, cfg, steps, warmup)
        stamps = _Stamps(torch.device("cpu"))
        run_stage(cfg, callbacks=(stamps,))
        staged, staged_mean = _median_gap(stamps.t, warmup), _mean_gap(stamps.t, warmup)
        after = _bare_step(stage, cfg, steps, warmup)
        # the bare loop before and after the stage, the faster of the two: a shared machine's speed
        # drifts, and the faster bare loop gives the stage the larger (more conservative) ratio
        bare, bare_mean = min(before[0], after[0]), min(before[1], after[1])
    return {"stage": stage, "batch": int(cfg.data.batch_size), "steps_measured": steps - warmup - 1,
            "stage_step_s": staged, "bare_loop_step_s": bare, "ratio_stage_to_bare": staged / bare,
            "bare_loop_step_before_after_s": [before[0], after[0]],
            "stage_step_mean_s": staged_mean, "bare_loop_step_mean_s": bare_mean,
            "ratio_stage_to_bare_mean": staged_mean / bare_mean}


def certify_stage(run_dir: Path = DEMO_RUN) -> dict:
    """The demo's certify stage on a copy of its trained run folder: wall time / certification pass."""
    if not all((run_dir / s / "manifest.json").is_file() for s in ("core", "cert", "gate")):
        return {"skipped": f"no trained demo run folder at {run_dir}: run make demo first"}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "demo_fmnist_full" / "eps_0.1"
        for s in ("core", "cert", "gate"):
            shutil.copytree(run_dir / s, copy / s, ignore=shutil.ignore_patterns("checkpoints"))
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=["experiment=demo_fmnist_full", "stage=certify",
                                                          f"runs_root={tmp}", "trainer.enable_progress_bar=false"])
        t0 = time.perf_counter()
        manifest = run_stage(cfg)
        wall = time.perf_counter() - t0
    timing = manifest["timing_s"]
    return {"wall_s": wall, "certification_pass_s": timing["certification_all_splits"],
            "ratio_wall_to_certification": wall / timing["certification_all_splits"], "timing_s": timing,
            "table_points": {k: {m: v.get(m) for m in ("nat_acc", "cert_acc", "adv_acc")}
                             for k, v in manifest["metrics"].items()}}


def measure() -> dict:
    return {"core": training_stage("core"), "core_channels_last": training_stage("core", channels_last=True),
            "cert": training_stage("cert"), "gate": training_stage("gate"), "certify": certify_stage()}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
