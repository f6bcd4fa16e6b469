"""The demo's work in steps of its stages, so two machines (or two demo configs) can be compared by
work rather than by minutes (machines of this kind differ up to 2.7x in speed).

For an experiment config: per training stage, the epochs, the training steps (epochs x batches of
the training split), the validation batches and their PGD steps; for the certify stage, the inputs it
bounds and the attack's budget. Where a run folder of that config exists, each stage's wall time from
its manifest and the seconds per training step it implies (the figure to compare machines by).

    python benchmarks/demo_work.py                 # the steps (and wall times of runs/ folders if there)
    python benchmarks/demo_work.py --run [--threads N]  # also runs both demos, one after the other, in a
                                                   # temporary runs root: wall times and their ratio (a
                                                   # quiet machine: 18 minutes on a 2-core CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra import compose, initialize_config_dir

from ace_lightning.config import CONF_DIR, to_dict

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("core", "cert", "gate", "entropy")
# the demo as it was when issue 25 was filed (7.9 minutes on the lead's machine): gate selection,
# core 4 epochs, cert-net 24, gate 12; experiment=demo_fmnist_full keeps its nets and epochs
BEFORE = ("demo_fmnist_full", ("++stage_overrides.certify.selection=gate",))


def _compose(experiment: str, overrides: Sequence[str]) -> Any:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={experiment}", "stage=pipeline", *overrides])


def _split_sizes(cfg: Any) -> dict[str, int]:
    from ace_lightning.config import datamodule_from

    dm = datamodule_from(cfg)
    dm.setup("fit")
    return {"train_batches": len(dm.train_dataloader()), "val_batches": len(dm.val_dataloader()),
            "val_inputs": len(dm.val_dataloader().dataset)}


def stage_work(experiment: str, overrides: Sequence[str] = (), run_dir: Optional[Path] = None) -> dict:
    """Steps per stage of ``experiment`` (and wall seconds from ``run_dir``'s manifests if there)."""
    from ace_lightning.registry import pipeline_stages, stage_config

    cfg = _compose(experiment, overrides)
    sizes = _split_sizes(cfg)
    out: dict[str, Any] = {"experiment": experiment, "overrides": list(overrides), **sizes, "stages": {}}
    total = val_attack = 0
    for name in pipeline_stages(cfg):
        st = to_dict(stage_config(cfg, name)["stage"])
        rec: dict[str, Any] = {}
        if name in TRAINING:
            epochs = int(st["epochs"])
            pgd = int(st.get("val_pgd_steps", st.get("eval_pgd_steps", 0)) or 0)
            rec = {"epochs": epochs, "train_steps": epochs * sizes["train_batches"],
                   "val_batches": epochs * sizes["val_batches"], "val_pgd_steps_per_batch": pgd}
            # at most: the validation attack runs only on inputs not already certified
            rec["val_attack_steps_max"] = rec["val_batches"] * pgd
            total += rec["train_steps"]
            val_attack += rec["val_attack_steps_max"]
        elif name == "certify":
            attack = st.get("attack") or {}
            rec = {"methods": list(st.get("methods") or []), "splits": list(st.get("splits") or []),
                   "attack_steps_x_restarts": int(attack.get("steps", 0)) * int(attack.get("restarts", 0))
                   if attack.get("enabled", True) else 0,
                   # the composed model's attacked operating points (all: every point chosen on val)
                   "attack_points": list(attack["points"]) if attack.get("points") is not None else "all"}
        folder = "certify_margin" if name == "certify" and st.get("selection") == "margin" else name
        manifest = run_dir / folder / "manifest.json" if run_dir is not None else None
        if manifest is not None and manifest.is_file():
            wall = json.loads(manifest.read_text()).get("wall_s")
            rec["wall_s"] = wall
            if wall and rec.get("train_steps"):
                rec["s_per_train_step"] = wall / rec["train_steps"]
        out["stages"][name] = rec
    out["train_steps"] = total
    out["val_attack_steps_max"] = val_attack
    walls = [r.get("wall_s") for r in out["stages"].values()]
    if walls and all(w is not None for w in walls):
        out["wall_s"] = sum(walls)
    return out


def run_demo(experiment: str, overrides: Sequence[str], runs_root: Path, threads: Optional[int] = None) -> float:
    """Run one demo pipeline into ``runs_root`` (a subprocess, progress bars off); its wall seconds."""
    env = dict(os.environ, WANDB_MODE="disabled")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "ace_lightning.train", "stage=pipeline", f"experiment={experiment}",
           f"runs_root={runs_root}", "trainer.enable_progress_bar=false", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(run_dir: Path = ROOT / "runs" / "demo_fmnist" / "eps_0.1",
            before_dir: Optional[Path] = None, run: bool = False, threads: Optional[int] = None) -> dict:
    """The demo now against the demo of issue 25 (``BEFORE``): steps, and their ratio; with ``run``
    both demos are run here, one after the other, and their wall times compared too."""
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="demo_work_") as tmp:
        if run:
            walls["demo"] = run_demo("demo_fmnist", (), Path(tmp), threads)
            walls["demo_before"] = run_demo(BEFORE[0], BEFORE[1], Path(tmp), threads)
            run_dir = Path(tmp) / "demo_fmnist" / "eps_0.1"
            before_dir = Path(tmp) / "demo_fmnist_full" / "eps_0.1"
        now = stage_work("demo_fmnist", run_dir=run_dir)
        before = stage_work(BEFORE[0], BEFORE[1], run_dir=before_dir)
    both = lambda w: w["train_steps"] + w["val_attack_steps_max"]  # noqa: E731
    out = {"demo": now, "demo_before": before,
           "ratio_train_steps": now["train_steps"] / max(1, before["train_steps"]),
           "ratio_train_and_val_attack_steps": both(now) / max(1, both(before))}
    if walls:
        out.update({"wall_s": walls, "threads": threads or "default",
                    "ratio_wall": walls["demo"] / walls["demo_before"]})
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run both demos here and time them")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    result = measure(run=args.run, threads=args.threads)
    if args.run:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from timing import cpu_capability, cpu_model

        result["machine"] = {"cpu_model": cpu_model(), "cpu_capability": cpu_capability(),
                             "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    text = json.dumps(result, indent=2)
    if args.out is not None:
        from ace_lightning.atomic import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text)
