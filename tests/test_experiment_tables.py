"""The experiment scripts' seed tables (experiments/margin_fmnist, experiments/compose_fmnist): rows of
several seeds are grouped by setup, their numbers given as mean +- sample std with n and the seeds,
and a curve keeps its group although each seed's run folder gives it another name."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(nat: float, cert: float, adv=None) -> dict:
    return {"T": 1.0, "class_thresholds": None, "nat_acc": nat, "cert_acc": cert, "adv_acc": adv}


def test_margin_table_seeds_means_points_and_curves_over_seeds(tmp_path):
    run = _load("experiments/margin_fmnist/run.py", "margin_run")
    nat, cert, curve = [0.9030, 0.9056, 0.9097], [0.6024, 0.5975, 0.5686], [0.667, 0.676, 0.663]
    for seed in (0, 1, 2):
        row = {"name": "cotrained", "seed": seed, "eps": 0.1,
               "margin": {"nat_within_1pt": _point(nat[seed], cert[seed], 0.6)},
               "mean_certified": {f"ACE IBP [cotrained/eps_0.1{run.suffix(seed)}, margin], one T": curve[seed]}}
        (tmp_path / f"cotrained{run.suffix(seed)}.json").write_text(json.dumps(row))
    (tmp_path / "mtl003.json").write_text(json.dumps({"name": "mtl003", "eps": 0.03,  # seed 0, no "seed" key
                                                       "gate": {"nat_within_1pt": _point(0.9031, 0.7246)}}))
    text = run.table_seeds(tmp_path)
    m = lambda v: f"{100 * statistics.mean(v):.2f} +- {100 * statistics.stdev(v):.2f}"  # noqa: E731
    assert f"| cotrained | 0.1 | margin | nat_within_1pt | 3 | 0 1 2 | {m(nat)} | {m(cert)} | 60.00 +- 0.00 |" in text
    assert "| mtl003 | 0.03 | gate | nat_within_1pt | 1 | 0 | 90.31 | 72.46 | - |" in text
    # three run folders, one curve: the seed suffix is not part of its name
    assert f"| cotrained | 0.1 | ACE IBP [cotrained/eps_0.1, margin], one T | 3 | 0 1 2 | {m(curve)} |" in text
    assert sum(line.startswith("| cotrained |") for line in text.splitlines()) == 2  # a point and a curve
    assert "_seed" not in text
    # one row per run in table.md, with its seed
    assert "| cotrained | 2 | 0.1 | margin | nat_within_1pt | 90.97 | 56.86 | 60.00 |" in run.table(tmp_path)


def test_compose_table_seeds_means_over_seeds(tmp_path):
    run = _load("experiments/compose_fmnist/run.py", "compose_run")
    for seed, (nat, cert) in enumerate([(0.9031, 0.5964), (0.9059, 0.6002)]):
        row = {"name": "demo_select_negwrong_entropy", "eps": 0.1, "seed": seed, "selection": "entropy",
               "cert_alone": _point(0.84, 0.75), "core_alone": _point(0.9166, 0.0),
               "nat_within_1pt": _point(nat, cert, 0.62)}
        (tmp_path / f"demo_select_negwrong_entropy_eps0.1{run.suffix(seed)}.json").write_text(json.dumps(row))
    text = run.table_seeds(tmp_path)
    assert ("| 0.1 | demo_select_negwrong_entropy | 2 | 0 1 | 84.00 +- 0.00 / 75.00 +- 0.00 | 91.66 +- 0.00 | "
            "90.45 +- 0.20 / 59.83 +- 0.27 | 62.00 +- 0.00 |") in text
    assert "| 0.1 | demo_select_negwrong_entropy | 1 | 84.00 / 75.00 | 91.66 | 90.59 / 60.02 |" in run.table(tmp_path)


@pytest.mark.parametrize("script", ["experiments/margin_fmnist/run.py"])
def test_unknown_setup_is_one_line_and_nonzero(script):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(ROOT / script), "nosuchsetup", "--table-only"], capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith("unknown setup(s) nosuchsetup; known: cotrained, demo, "
                                                          "mtl003, cascade")
