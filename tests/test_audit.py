"""action=audit: the independent check of a run folder's certificates (docs/METHOD.md section 13).

A tiny run folder (real stages on synthetic data) must pass every check; the same folder with
records forged as a broken bound would write them must fail with exit code 1 and the forged
inputs named; the MILP must find the exact minimum that enumerating activation patterns finds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ace_lightning.ace import ACEModel
from ace_lightning.attacks.pgd import pgd_minimize
from ace_lightning.audit import AUDIT_FILE, audit_stage, certified_folders
from ace_lightning.audit_bounds import milp_check, reference_problem
from ace_lightning.audit_claims import AuditSettings, read_claims
from ace_lightning.bounds.milp import min_margin_milp, scipy_missing
from ace_lightning.errors import ConfigError, InputNotFoundError, StageInputError
from ace_lightning.nets.layers import Normalize
from ace_lightning.registry import run_stage
from ace_lightning.records import load_records, save_records
from exact_ranges import exact_output_range
from stage_utils import compose_cfg

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
RUN = "tiny/eps_0.03"
QUICK = AuditSettings(steps=10, restarts=1, milp_sample=0, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """core, cert (IBP), gate, certify (gate) and certify_entropy_cert (entropy selection on the
    cert-net) on 1x6x6 synthetic images with 3 classes: about a third of the test split certified."""
    root = tmp_path_factory.mktemp("audit_runs")
    base = ["data.subset=96", "data.dataset_kwargs.num_classes=3", "data.dataset_kwargs.input_shape=[1,6,6]",
            "eps=0.03", "net@cert_net=fc", "net@core_net=fc", "+cert_net.hidden=16", "+core_net.hidden=16",
            f"run_name={RUN}"]
    run_stage(compose_cfg(root, base + ["stage=core", "stage.epochs=8", "stage.optimizer.lr=5e-3",
                                        "stage.eval_pgd_steps=0"]))
    run_stage(compose_cfg(root, base + ["stage=cert", "stage.epochs=6", "stage.warmup_epochs=1", "stage.ramp_epochs=1",
                                        "stage.val_pgd_steps=0", "stage.optimizer.lr=5e-3"]))
    run_stage(compose_cfg(root, base + ["stage=gate", "stage.epochs=8", "stage.ramp_epochs=2",
                                        "stage.optimizer.lr=5e-3"]))
    certify = ["stage=certify", "stage.attack.steps=2", "stage.methods=[IBP,CROWN-IBP]", "stage.refine_methods=[]"]
    run_stage(compose_cfg(root, base + certify))
    run_stage(compose_cfg(root, base + certify + ["stage.selection=entropy", "stage.entropy_stage=cert"]))
    return root / RUN


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "ace_lightning.cli", "action=audit", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def _forge(run: Path, dst: Path, forge) -> Path:
    """A copy of the run folder whose certify/records.csv went through ``forge(columns, T)`` (a
    broken bound writing its records); ace_model.pt is untouched, so its sha256 still matches."""
    shutil.copytree(run, dst)
    stage = dst / "certify"
    cols = {k: np.array(v, copy=True) for k, v in load_records(stage / "records.csv").columns.items()}
    forge(cols, float(ACEModel.load(stage / "ace_model.pt").thresholds[0]))
    save_records(cols, stage / "records.csv")
    return dst


def _verdicts(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stdout.splitlines() if line.startswith("audit: ")]


def test_the_honest_folder_passes_every_check(run, tmp_path):
    res = _cli(f"run_dir={run}", "progress=false", "audit.milp_sample=6", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = _verdicts(res)
    assert len(lines) == 2 and all(line.startswith("audit: 0 violations in ") for line in lines), res.stdout
    report = json.loads((run / "certify" / AUDIT_FILE).read_text())
    n = report["certified"]
    assert n > 10 and report["violations"] == 0
    assert report["records_at_chosen_point"]["cert_acc"] == pytest.approx(n / report["inputs"])
    ref = report["reference"]
    assert ref["confirmed"] == ref["certified"] == n and not ref["unconfirmed"]
    cert = ref["pairs"][0]["cert_net"]
    assert cert["confirmed"] == cert["relied_on"] == n
    for method in cert["by_method"].values():  # float32 records (widened outward) against the float64 reference
        assert method["max_abs_diff"] < 1e-3 and method["max_recorded_above_reference"] <= 1e-6
    gate = ref["pairs"][0]["gate"]
    assert gate["confirmed"] == gate["relied_on"] > 0 and gate["methods"] == ["CROWN-IBP", "IBP"]
    assert gate["max_recorded_lb_above_reference"] <= 1e-6 and gate["max_recorded_ub_below_reference"] <= 1e-6
    attack = report["attack"]
    assert attack["violations"] == 0 and attack["composed"]["attacked"] == n
    assert attack["cert_net"][0]["attacked"] == n and attack["cert_net"][0]["min_gap"] >= 0
    assert sum(g["attacked"] for g in attack["gate"]) == gate["relied_on"]
    milp = report["milp"]["pairs"][0]
    assert milp["sampled"] == milp["solved"] == 6 and milp["violations"] == 0
    for entry in milp["inputs"]:  # exact minimum >= certified bound; the point found takes the minimum
        assert entry["exact"] >= entry["recorded"] - 1e-6
        assert entry["attained"] == pytest.approx(entry["exact"], abs=1e-6)
    assert milp["mean_gap_certified"] >= 0 and milp["certified_proved"] == milp["certified_sampled"] == 3
    assert report["autoattack"]["ran"] is False or report["autoattack"]["violations"] == 0
    entropy = json.loads((run / "certify_entropy_cert" / AUDIT_FILE).read_text())
    assert "entropy selection" in entropy["reference"]["pairs"][0]["gate"]["skipped"]
    assert entropy["violations"] == 0


def test_forged_certificates_fail_with_exit_code_1(run, tmp_path):
    """Records as an unsound bound would write them: correct but uncertified inputs the gate sends
    to the cert-net marked certified with margin 10 and a gate interval that starts at g(x)."""
    forged = []

    def forge(cols, T):
        rows = (cols["split"] == "test") & (cols["cert_correct"] == 1) & (cols["cert_ok"] == 0) & (cols["g"] >= T)
        forged.extend(cols["index"][rows].tolist())
        cols["cert_ok"][rows] = 1
        cols["cert_margin"][rows] = 10.0
        cols["cert_method"] = cols["cert_method"].astype(object)
        cols["cert_method"][rows] = "IBP"
        cols["lb_g"][rows] = cols["g"][rows]

    broken = _forge(run, tmp_path / "broken", forge)
    assert forged
    res = _cli(f"run_dir={broken}", "audit.stage=certify", "progress=false", "audit.milp_sample=0",
               cwd=tmp_path / "cwd")
    assert res.returncode == 1, res.stderr[-3000:]
    line, = _verdicts(res)
    report = json.loads((broken / "certify" / AUDIT_FILE).read_text())
    assert line.startswith(f"audit: {report['violations']} violations in ") and report["violations"] > 0
    assert set(report["violating_inputs"]) <= set(forged)
    assert report["reference"]["unconfirmed"] == sorted(forged)  # the reference reproduces none of them
    assert {e["index"] for e in report["reference"]["pairs"][0]["cert_net"]["unconfirmed"]} == set(forged)
    cert = report["attack"]["cert_net"][0]
    assert cert["violations"] == len(forged)  # no input keeps a margin of 10 on the whole ball
    assert {e["index"] for e in cert["listed"]} == set(forged)
    assert report["attack"]["gate"][0]["violations"] > 0  # points below lb_g = g(x)


def test_each_recorded_bound_is_attacked_on_its_own(run, tmp_path):
    def margins(cols, T):
        cols["cert_margin"][cols["cert_ok"] == 1] += 5.0

    report = audit_stage(_forge(run, tmp_path / "margins", margins) / "certify", QUICK)
    cert = report["attack"]["cert_net"][0]
    assert cert["violations"] == cert["attacked"] == report["certified"] > 0
    ref = report["reference"]["pairs"][0]["cert_net"]
    assert ref["confirmed"] == ref["relied_on"]  # the decisions still hold: only the values are off
    assert ref["by_method"]["IBP"]["max_abs_diff"] > 4.9

    def gate(cols, T):
        cols["lb_g"][cols["g"] >= T] = cols["g"][cols["g"] >= T]

    report = audit_stage(_forge(run, tmp_path / "gate", gate) / "certify", QUICK)
    fires = next(g for g in report["attack"]["gate"] if g["claim"] == "fires")
    assert fires["violations"] > 0.5 * fires["attacked"] > 0
    assert report["attack"]["cert_net"][0]["violations"] == 0
    assert report["reference"]["pairs"][0]["gate"]["unconfirmed"]


def test_user_errors_are_one_line_with_exit_code_2(run, tmp_path):
    res = _cli(f"run_dir={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: run folder not found")
    res = _cli(f"run_dir={run}", "audit.steps=0", cwd=tmp_path)
    assert res.returncode == 2 and "steps and restarts must be >= 1" in res.stderr.strip().splitlines()[-1]
    with pytest.raises(StageInputError, match="no complete certify stage"):
        certified_folders(run / "cert")
    with pytest.raises(InputNotFoundError):
        certified_folders(tmp_path / "nowhere")
    with pytest.raises(StageInputError, match="not a complete certify stage"):
        certified_folders(run, "gate")
    with pytest.raises(ConfigError, match="unknown knob"):
        AuditSettings.from_config({"stepz": 3})
    changed = tmp_path / "changed"
    shutil.copytree(run, changed)
    model = ACEModel.load(changed / "certify" / "ace_model.pt")
    model.set_thresholds([0.123])
    model.save(changed / "certify" / "ace_model.pt")
    with pytest.raises(StageInputError, match="changed after the certify stage wrote it"):
        audit_stage(changed / "certify", QUICK)


def test_nets_the_reference_cannot_bound_are_skipped_and_said_so(run):
    assert "MaxPool2d" in reference_problem(nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), torch.rand(1, 1, 4, 4), 10**6)
    report = audit_stage(run / "certify", AuditSettings(steps=5, restarts=1, milp_sample=2, reference_max_entries=1,
                                                        progress=False))
    for part in ("cert_net", "gate"):
        assert "too large for the dense reference" in report["reference"]["pairs"][0][part]["skipped"]
    assert report["reference"]["confirmed"] == report["certified"]  # taken from the records, as notes say
    assert len(report["reference"]["notes"]) == 2
    assert "too large" in report["milp"]["pairs"][0]["skipped"]
    assert report["violations"] == 0


def test_without_scipy_the_milp_says_so_in_one_line(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    assert "needs scipy" in scipy_missing()
    model = ACEModel.load(run / "certify" / "ace_model.pt").eval()
    claims = read_claims(load_records(run / "certify" / "records.csv", "test"), model.thresholds.double().numpy())
    out = milp_check(model, torch.zeros(len(claims.index), 1, 6, 6), torch.zeros(len(claims.index), dtype=torch.long),
                     claims, 0.03, AuditSettings())
    assert out["ran"] is False and "needs scipy" in out["reason"] and "\n" not in out["reason"]


def test_autoattack_runs_when_importable(run, monkeypatch):
    """With fra31's API (a stand-in module here; the real package is an optional extra): the
    composed model is attacked at every certified input, AutoAttack's points judged by the model."""
    seen = {}

    class AutoAttack:
        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", device="cuda"):
            seen.update(norm=norm, eps=eps, version=version, attacks=list(attacks_to_run), device=device)
            self.model = model

        def run_standard_evaluation(self, x, y, bs=250):
            seen["inputs"] = x.shape[0]
            return (x + 1.0).clamp(0, 1)  # far outside the ball: the audit projects it back

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=AutoAttack))
    AutoAttack.__module__ = "autoattack"
    report = audit_stage(run / "certify", AuditSettings(steps=2, restarts=1, milp_sample=0, reference=False,
                                                        progress=False))
    aa = report["autoattack"]
    assert aa["ran"] is True and aa["package"] == "autoattack" and aa["attacked"] == report["certified"]
    assert seen == {"norm": "Linf", "eps": 0.03, "version": "custom", "attacks": ["apgd-ce"], "device": "cpu",
                    "inputs": report["certified"]}  # apgd-t needs 4 classes: these data have 3
    assert aa["violations"] == 0  # a certified input stays correct at the projected point


def _fc(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5),
                         nn.ReLU(), nn.Linear(5, 4)).double().eval()


@pytest.mark.parametrize("seed", range(5))
def test_milp_minimum_equals_enumerated_exact_minimum(seed):
    """min over the ball of min_j z_y - z_j: the MILP against the exact range of every margin from
    LPs over all activation regions (tests/exact_ranges.py)."""
    net = _fc(seed)
    x = torch.rand(1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
    y, eps = int(net(x).argmax()), 0.3
    eye = torch.eye(4, dtype=torch.float64)
    C = torch.stack([eye[y] - eye[j] for j in range(4) if j != y]).unsqueeze(0)
    lo, _ = exact_output_range(net, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), C=C, max_relus=11)
    res = min_margin_milp(net, x, y, eps)
    assert res.status == "optimal" and res.unstable > 0
    assert res.minimum == pytest.approx(lo.min().item(), abs=1e-6)
    assert res.attained == pytest.approx(lo.min().item(), abs=1e-6)  # the solver's point takes it
    assert res.dual_bound <= res.minimum + 1e-9
    assert ((res.point - x).abs().max() <= eps + 1e-12) and res.point.min() >= 0 and res.point.max() <= 1
    skipped = min_margin_milp(net, x, y, eps, max_unstable=res.unstable - 1)
    assert skipped.status == "skipped" and "milp_max_unstable" in skipped.reason


def test_pgd_minimize_reaches_the_corner_and_stops_at_a_counterexample():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]]).view(2, 1, 2, 1)
    x = torch.full((2, 1, 2, 1), 0.5)
    value, point = pgd_minimize(lambda z, idx: (z * w[idx]).flatten(1).sum(1), x, 0.1, steps=10, restarts=2,
                                step_size=0.5)
    want = (0.5 * w - 0.1 * w.abs()).flatten(1).sum(1)
    torch.testing.assert_close(value, want)
    assert (point - x).abs().max() <= 0.1 + 1e-7
    calls = []
    value, _ = pgd_minimize(lambda z, idx: calls.append(len(idx)) or (z * w[idx]).flatten(1).sum(1), x, 0.1,
                            steps=10, stop_below=torch.tensor([1e9, -1e9]))
    assert calls[0] == 2 and all(c == 1 for c in calls[1:])  # input 0 stops at x: it is below 1e9
