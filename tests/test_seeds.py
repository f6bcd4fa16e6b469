"""Seeds: the run folder's name carries the seed (none for seed 0, so older run folders stay seed
0's), a bad seed is one line, and the summary aggregates runs that differ only in their seed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from ace_lightning.config import CONF_DIR
from ace_lightning.summary import run_seed, seed_groups, write_summary


def _run_dir(overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return str(compose(config_name="train", overrides=overrides).run_dir)


def test_the_seed_is_part_of_the_run_folder_name_except_seed_zero():
    assert _run_dir(["eps=0.1"]) == "runs/fashion_mnist/eps_0.1"
    assert _run_dir(["eps=0.1", "seed=0"]) == "runs/fashion_mnist/eps_0.1"
    assert _run_dir(["eps=0.1", "seed=2"]) == "runs/fashion_mnist/eps_0.1_seed2"
    assert _run_dir(["experiment=demo_fmnist", "seed=1"]) == "runs/demo_fmnist/eps_0.1_seed1"


def test_a_seed_that_is_no_integer_is_one_line_with_exit_code_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ace_lightning.train", "stage=core", "seed=abc",
                          f"runs_root={tmp_path}"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "seed" in res.stderr
    assert list(tmp_path.iterdir()) == []


def _certified(root, run, seed, nat, cert):
    folder = root / run / "certify_margin"
    folder.mkdir(parents=True)
    metrics = {"nat_within_1pt": {"threshold": 1.0, "nat_acc": nat, "cert_acc": cert, "adv_acc": None,
                                  "cert_route_rate": 0.7}}
    (folder / "manifest.json").write_text(json.dumps({"status": "complete", "eps": 0.1, "selection": "margin",
                                                      "metrics": metrics}))
    (root / run / "job.json").write_text(json.dumps({"status": "complete", "seed": seed, "started": 0}))


def test_runs_that_differ_only_in_seed_are_aggregated_with_mean_std_and_n(tmp_path):
    _certified(tmp_path, "demo/eps_0.1", 0, 0.90, 0.60)
    _certified(tmp_path, "demo/eps_0.1_seed1", 1, 0.91, 0.62)
    _certified(tmp_path, "demo/eps_0.1_seed2", 2, 0.92, 0.61)
    _certified(tmp_path, "other/eps_0.1", 0, 0.50, 0.40)  # one seed: no aggregate
    rows = write_summary(tmp_path)
    (group,) = seed_groups(rows)
    assert (group["run"], group["n"], group["seeds"]) == ("demo/eps_0.1", 3, "0 1 2")
    assert group["nat_acc"] == pytest.approx(0.91) and group["nat_acc_std"] == pytest.approx(0.01)
    assert group["cert_acc"] == pytest.approx(0.61) and group["cert_acc_std"] == pytest.approx(0.01)
    assert group["adv_acc"] is None  # not attacked: no number rather than a made-up one
    md = (tmp_path / "summary_seeds.md").read_text()
    assert "| demo/eps_0.1 |" in md and "91.00 +- 1.00" in md and "61.00 +- 1.00" in md
    assert "other" not in md
    assert (tmp_path / "summary_seeds.csv").read_text().splitlines()[0].startswith("run,data,eps,selection,point,n")


def test_run_seed_reads_the_job_record_then_the_name():
    assert run_seed("a/eps_0.1_seed3") == 3 and run_seed("a/eps_0.1") == 0
    assert run_seed("a/eps_0.1", {"seed": 5}) == 5
    assert run_seed("x_seed0") == 0
