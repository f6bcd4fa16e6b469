"""Stage throughput against arithmetic, in the same run (issue: every stage close to the cost of
its own arithmetic).

- Training stages (core, cert): the real stage (the demo's config, its datamodule, Lightning,
  logging, progress bar) for a number of steps; its time per training step is the median gap
  between consecutive batch starts. The bare loop runs the same net, batch size and loss by
  hand on one batch of the same data. Ratio = stage step / bare step (target: cert <= 1.3).
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

ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = ROOT / "runs" / "demo_fmnist" / "eps_0.1"


def _cfg(stage: str, runs_root: Path, steps: int, extra: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[
            "experiment=demo_fmnist", f"stage={stage}", f"runs_root={runs_root}",
            f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=0", "trainer.limit_test_batches=1",
            f"++stage_overrides.{stage}.epochs=1", *extra])


def _bare_step(stage: str, cfg, steps: int, warmup: int) -> float:
    """The stage's arithmetic by hand: one batch of the same data, the same net and loss."""
    dm = datamodule_from(cfg)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    net = build_net(dict(cfg["core_net" if stage == "core" else "cert_net"]), dm.info).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    eps = float(cfg.eps) * 1.05
    stamps = []
    for _ in range(steps + 1):
        stamps.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        if stage == "core":
            loss = nn.functional.cross_entropy(net(x), y)
        else:
            robust, logits = robust_ce_loss(net, x, y, eps, "IBP", return_logits=True)
            loss = 0.5 * nn.functional.cross_entropy(logits, y) + 0.5 * robust + 1e-5 * l1_penalty(net)
        loss.backward()
        opt.step()
    return _median_gap(stamps, warmup)


def training_stage(stage: str, steps: int = 40, warmup: int = 5) -> dict:
    """One stage of the demo for ``steps`` training steps (eps at its target from step 0: the
    cost of the steps after the ramp, most of them) against its bare loop."""
    with tempfile.TemporaryDirectory() as tmp:
        extra = ("++stage_overrides.cert.warmup_epochs=0", "++stage_overrides.cert.ramp_epochs=0") \
            if stage == "cert" else ()
        cfg = _cfg(stage, Path(tmp), steps, extra)
        stamps = _Stamps(torch.device("cpu"))
        run_stage(cfg, callbacks=(stamps,))
        staged = _median_gap(stamps.t, warmup)
        bare = _bare_step(stage, cfg, steps, warmup)
    return {"stage": stage, "batch": int(cfg.data.batch_size), "steps_measured": steps - warmup - 1,
            "stage_step_s": staged, "bare_loop_step_s": bare, "ratio_stage_to_bare": staged / bare}


def certify_stage(run_dir: Path = DEMO_RUN) -> dict:
    """The demo's certify stage on a copy of its trained run folder: wall time / certification pass."""
    if not all((run_dir / s / "manifest.json").is_file() for s in ("core", "cert", "gate")):
        return {"skipped": f"no trained demo run folder at {run_dir}: run make demo first"}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "demo_fmnist" / "eps_0.1"
        for s in ("core", "cert", "gate"):
            shutil.copytree(run_dir / s, copy / s, ignore=shutil.ignore_patterns("checkpoints"))
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=["experiment=demo_fmnist", "stage=certify",
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
    return {"core": training_stage("core"), "cert": training_stage("cert"), "certify": certify_stage()}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
