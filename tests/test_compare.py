"""action=compare: ACE's curve against the single networks of several run folders, and the
dominance rule behind its sentence (unit-tested on hand-made points)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ace_lightning.compare import dominance, single_front
from ace_lightning.registry import run_stage
from stage_utils import compose_cfg

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")


def test_single_front_is_the_best_certified_at_least_as_natural():
    singles = [{"nat_acc": 0.90, "cert_acc": 0.00}, {"nat_acc": 0.85, "cert_acc": 0.60},
               {"nat_acc": 0.80, "cert_acc": 0.70}, {"nat_acc": 0.82, "cert_acc": 0.50}]
    front = single_front(singles)
    assert front(0.95) == -math.inf
    assert front(0.88) == 0.00 and front(0.85) == 0.60 and front(0.83) == 0.60
    assert front(0.81) == 0.60 and front(0.80) == 0.70 and front(0.5) == 0.70


def test_dominance_intervals_and_gain():
    front = single_front([{"nat_acc": 0.90, "cert_acc": 0.0}, {"nat_acc": 0.80, "cert_acc": 0.70}])
    curve = [{"nat_acc": 0.80, "cert_acc": 0.70}, {"nat_acc": 0.84, "cert_acc": 0.65},
             {"nat_acc": 0.88, "cert_acc": 0.40}, {"nat_acc": 0.91, "cert_acc": 0.10}]
    spans = dominance(curve, front)
    assert len(spans) == 1
    s = spans[0]
    assert (s["nat_from"], s["nat_to"]) == (0.84, 0.91)
    assert s["max_gain"] == pytest.approx(0.65) and s["at_nat"] == 0.84
    assert dominance([{"nat_acc": 0.80, "cert_acc": 0.70}], front) == []  # ties do not dominate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run folders: an IBP pipeline (core, cert, gate, certify) and an MTL-IBP cert-net alone."""
    root = tmp_path_factory.mktemp("compare_runs")
    base = ["data.subset=96", "data.dataset_kwargs.num_classes=3", "data.dataset_kwargs.input_shape=[1,12,12]",
            "eps=0.05", "net@cert_net=fc", "net@core_net=fc"]
    cert = ["stage=cert", "stage.epochs=3", "stage.warmup_epochs=1", "stage.ramp_epochs=1", "stage.val_pgd_steps=0",
            "stage.optimizer.lr=5e-3"]
    ibp = base + ["run_name=ibp/eps_0.05"]
    run_stage(compose_cfg(root, ibp + ["stage=core", "stage.epochs=2", "stage.eval_pgd_steps=0"]))
    run_stage(compose_cfg(root, ibp + cert))
    run_stage(compose_cfg(root, ibp + ["stage=gate", "stage.epochs=2", "stage.ramp_epochs=1"]))
    run_stage(compose_cfg(root, ibp + ["stage=certify", "stage.attack.steps=2", "stage.methods=[IBP,CROWN-IBP]",
                                       "stage.refine_methods=[]"]))
    # a second composition of the same cert-net: entropy selection on cert/ (certify_entropy_cert/)
    run_stage(compose_cfg(root, ibp + ["stage=certify", "stage.attack.steps=2", "stage.methods=[IBP,CROWN-IBP]",
                                       "stage.refine_methods=[]", "stage.selection=entropy",
                                       "stage.entropy_stage=cert"]))
    run_stage(compose_cfg(root, base + ["run_name=mtl/eps_0.05"] + cert + ["stage.method=MTL-IBP", "stage.alpha=0.2"]))
    return root


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ace_lightning.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def test_compare_writes_plot_table_and_sentence(runs, tmp_path):
    out = tmp_path / "cmp"
    res = _cli("action=compare", f"runs=[{runs / 'ibp' / 'eps_0.05'},{runs / 'mtl' / 'eps_0.05'}]",
               f"out_dir={out}", "methods=[IBP,CROWN-IBP]", "attack_steps=3", "progress=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "compare.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("cert-net") == 2 and kinds.count("core") == 1 and kinds.count("ace") >= 2
    ace_names = {r["name"].split(" [")[1] for r in rows if r["kind"] == "ace"}
    assert ace_names == {"ibp/eps_0.05]", "ibp/eps_0.05, entropy_cert]"}  # both compositions of the folder
    assert {r["method"] for r in rows if r["kind"] == "cert-net"} == {"IBP", "MTL-IBP"}
    assert all(0 <= float(r["cert_acc"]) <= float(r["nat_acc"]) <= 1 for r in rows)
    assert (out / "compare.png").stat().st_size > 1000
    md = (out / "compare.md").read_text()
    assert "ACE" in md and ("dominates" in md or "never certified more often" in md)
    if any(float(r["cert_acc"]) > 0 for r in rows if r["kind"] == "cert-net"):
        assert "The most accurate certified single network" in md
    # the single networks' evaluations are cached beside their weights, keyed by the settings
    cache = json.loads((runs / "mtl" / "eps_0.05" / "cert" / "evaluation_test.json").read_text())
    assert cache["key"]["settings"]["methods"] == ["IBP", "CROWN-IBP"]
    ibp_row = next(r for r in rows if r["kind"] == "cert-net" and r["method"] == "IBP")
    records = list(csv.DictReader(open(runs / "ibp" / "eps_0.05" / "certify" / "records.csv")))
    test = [r for r in records if r["split"] == "test"]
    assert float(ibp_row["cert_acc"]) == pytest.approx(sum(int(r["cert_ok"]) for r in test) / len(test))


def test_compare_refuses_bad_input_in_one_line(runs, tmp_path):
    res = _cli("action=compare", "runs=[]", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: action=compare needs runs")
    res = _cli("action=compare", f"runs=[{tmp_path}]", cwd=tmp_path)
    assert res.returncode == 2 and "has no cert/ stage" in res.stderr.strip().splitlines()[-1]
    res = _cli("action=compare", f"runs=[{runs / 'mtl' / 'eps_0.05'}]", "attack_steps=0", cwd=tmp_path)
    assert res.returncode == 2 and "attack_steps" in res.stderr.strip().splitlines()[-1]


def test_the_headline_compares_against_the_most_accurate_certified_network():
    """Above the most accurate certified network only the core (0% certified) remains: the sentence
    says where the composition dominates, claims no gain over 0% certified, and puts its operating
    point against that network (not against the core)."""
    from ace_lightning.compare import headline

    top = {"name": "IBP [run]", "nat_acc": 0.80, "cert_acc": 0.70}
    front = single_front([{"nat_acc": 0.90, "cert_acc": 0.0}, top])
    curve = [{"nat_acc": 0.80, "cert_acc": 0.70}, {"nat_acc": 0.84, "cert_acc": 0.65},
             {"nat_acc": 0.88, "cert_acc": 0.40}, {"nat_acc": 0.91, "cert_acc": 0.10}]
    ops = [{"key": "max_certified", "name": "max certified", "test": {"nat_acc": 0.80, "cert_acc": 0.70}},
           {"key": "nat_within_1pt", "name": "natural within 1 pt of core", "test": {"nat_acc": 0.88, "cert_acc": 0.40}}]
    text = headline("ACE IBP [run]", dominance(curve, front), ops, top)
    assert text.startswith("- ACE IBP [run]: dominates the best single network for 84.00-91.00% natural;")
    assert "up to" not in text  # the front there is the core: a gain over 0% certified says nothing
    assert ("at its operating point 'natural within 1 pt of core' (88.00% natural, 40.00% certified) it is "
            "+8.00 points natural and -30.00 certified against the most accurate certified single network, "
            "IBP [run] (80.00% / 70.00%).") in text
    below = single_front([{"nat_acc": 0.90, "cert_acc": 0.0}, {"nat_acc": 0.86, "cert_acc": 0.30}, top])
    spans = dominance(curve, below)  # at 84% the best network at least as accurate certifies 30%
    assert "(up to +35.00 points certified over a certified single network, at 84.00%)" in \
        headline("ACE", spans, ops, top)


def test_mean_certified_is_the_average_of_the_best_certified_at_each_natural_accuracy():
    from ace_lightning.compare import mean_certified

    curve = [{"nat_acc": 0.80, "cert_acc": 0.70}, {"nat_acc": 0.85, "cert_acc": 0.60},
             {"nat_acc": 0.90, "cert_acc": 0.40}, {"nat_acc": 0.88, "cert_acc": 0.30}]  # the last is dominated
    # on [0.80, 0.92]: 0.60 up to 0.85, 0.40 up to 0.90, 0 above (no point that accurate)
    want = (0.05 * 0.60 + 0.05 * 0.40 + 0.02 * 0.0) / 0.12
    assert abs(mean_certified(curve, 0.80, 0.92) - want) < 1e-12
    assert mean_certified(curve, 0.86, 0.90) == 0.40
    assert mean_certified(curve, 0.90, 0.90) == 0.0
    dense = [{"nat_acc": n, "cert_acc": 1 - n} for n in np.linspace(0, 1, 2001)]
    assert abs(mean_certified(dense, 0.2, 0.6) - 0.6) < 1e-3  # the integral of 1 - n over [0.2, 0.6] / 0.4
