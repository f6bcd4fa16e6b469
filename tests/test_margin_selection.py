"""Margin selection (docs/METHOD.md section 5b): the cert-net's own top-1 minus top-2 gap as the
selector, its bounds from the margin bounds, the rule with per-class thresholds against an
oracle written from the definition, the exact per-class choice against brute force, the
composed model's routing, save/load, and the certify stage end to end on tiny data."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ace_lightning import rule
from ace_lightning.ace import ACEModel, composed_certified
from ace_lightning.bounds.gap import gap, gap_bounds
from ace_lightning.operating import choose_class_thresholds
from ace_lightning.records import Records
from ace_lightning.sweep import METRICS, evaluate
from bound_checks import conv_net, fc_net, points_in_ball


# -- the gap's bounds --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
@pytest.mark.parametrize("name", ["fc", "conv"])
def test_gap_bounds_contain_every_point_and_fix_the_class_when_positive(name, method):
    net = (fc_net(in_shape=(1, 3, 3), hidden=(12, 10), classes=4) if name == "fc"
           else conv_net(bn=False, seed=3)).double().eval()
    shape = (1, 3, 3) if name == "fc" else (2, 6, 6)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand((6,) + shape, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    for eps in (0.002, 0.02, 0.1):
        g, lb, ub = gap_bounds(net, x, eps, method)
        pts = points_in_ball(net, x, eps)
        with torch.no_grad():
            logits = torch.stack([net(p) for p in pts])  # [N, B, K]
        gaps = gap(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape[:2])
        assert (gaps >= lb - 1e-9).all() and (gaps <= ub + 1e-9).all(), (eps, method)
        fixed = lb > 0
        cls = logits.argmax(-1)
        assert (cls[:, fixed] == cls[0, fixed]).all(), "lb > 0 means the class never changes"
        assert torch.equal(g, gap(net(x)))
    assert fixed.any() or True


def test_gap_bounds_are_tight_at_eps_zero():
    net = fc_net(in_shape=(1, 3, 3), hidden=(12,), classes=4).double().eval()
    x = torch.rand(8, 1, 3, 3, dtype=torch.float64)
    g, lb, ub = gap_bounds(net, x, 0.0, "IBP")
    assert torch.allclose(lb, g, atol=1e-9) and torch.allclose(ub, g, atol=1e-9)


# -- the rule with class thresholds, against an oracle -------------------------------------------

def oracle_margin(cols: dict, kappa: np.ndarray, T: float) -> tuple[np.ndarray, np.ndarray]:
    """From the definition (docs/METHOD.md 5b), one input at a time: the cert-net answers at a
    point where class c is on top iff gap >= kappa_c + T. The records say: the gap lies in
    [lb, ub]; lb > 0 means class c (the class at x) is on top everywhere, lb = 0 that any class
    may be, with any gap in [0, ub]. Fire is possible iff some allowed (class, gap) fires, silence
    iff some allowed one does not. Returns (certified, natural) per input (one pair)."""
    n = len(cols["g"])
    cert, nat = np.zeros(n, bool), np.zeros(n, bool)
    for i in range(n):
        g, lb, ub, c = (float(cols["g"][i]), float(cols["lb_g"][i]), float(cols["ub_g"][i]),
                        int(cols["cert_pred"][i]))
        fires_at_x = g >= kappa[c] + T
        nat[i] = bool(cols["cert_correct"][i]) if fires_at_x else bool(cols["core_correct"][i])
        decided = math.isfinite(lb) and math.isfinite(ub) and lb <= g <= ub
        if not decided:
            fire = silent = True
        elif lb > 0:
            fire, silent = ub >= kappa[c] + T, lb < kappa[c] + T
        else:
            fire = any(ub >= k + T for k in kappa)
            silent = any(0.0 < k + T for k in kappa)  # a class with a positive threshold, gap near 0
        nan = any(math.isnan(float(cols[name][i])) for name in ("g", "lb_g", "ub_g"))
        ok = (not fire or bool(cols["cert_ok"][i])) and (not silent or bool(cols["core_ok"][i]))
        cert[i] = ok and not nan
    return cert, nat


def margin_records(rng: np.random.Generator, n: int, k: int) -> dict:
    g = np.round(rng.exponential(1.0, n), 1)
    lb = np.where(rng.random(n) < 0.6, np.round(g * rng.random(n), 1), 0.0)
    ub = g + np.round(rng.exponential(1.0, n), 1)
    kind = rng.integers(0, 10, n)
    lb, ub = np.where(kind == 1, ub, lb), np.where(kind == 1, lb, ub)  # inverted
    ub = np.where(kind == 2, np.inf, ub)
    lb = np.where(kind == 3, np.nan, lb)
    cc = rng.random(n) < 0.8
    return {"g": g, "lb_g": lb, "ub_g": ub, "cert_pred": rng.integers(0, k, n), "cert_correct": cc,
            "cert_ok": cc & (lb > 0) & (rng.random(n) < 0.9), "core_correct": rng.random(n) < 0.9,
            "core_ok": rng.random(n) < 0.2, "selection": np.full(n, "margin")}


def test_rule_with_class_thresholds_matches_the_oracle():
    rng = np.random.default_rng(0)
    k = 4
    for trial in range(40):
        cols = margin_records(rng, 50, k)
        kappa = rng.choice([-1.0, 0.0, 0.3, 0.5, 1.0, 2.0, np.inf], k)
        T = float(rng.choice([-0.5, 0.0, 0.2]))
        want_cert, want_nat = oracle_margin(cols, kappa, T)
        got = composed_certified(cols["cert_ok"][:, None], cols["core_ok"], cols["lb_g"][:, None],
                                 cols["ub_g"][:, None], [T], g=cols["g"][:, None], kappa=kappa[None],
                                 cls=cols["cert_pred"][:, None])
        assert np.array_equal(got.numpy(), want_cert), (trial, kappa, T)
        ev = evaluate(cols, T, kappa=kappa)
        assert ev["cert_acc"] == want_cert.mean() and ev["nat_acc"] == want_nat.mean()
        reach = rule.reachable_at(cols["g"][None], cols["lb_g"][None], cols["ub_g"][None], [T], kappa[None],
                                  cols["cert_pred"][None])
        assert not (want_cert & ~cols["cert_ok"] & reach[:, 0]).any()


def test_one_threshold_for_all_classes_is_the_scalar_rule():
    """kappa = 0 for every class: margin selection is the plain interval rule on (gap, lb, ub)."""
    rng = np.random.default_rng(1)
    cols = margin_records(rng, 200, 5)
    for T in (-1.0, 0.0, 0.3, 1.0, 5.0):
        scalar = evaluate(cols, T)
        per_class = evaluate(cols, T, kappa=np.zeros(5))
        assert {m: scalar[m] for m in METRICS} == {m: per_class[m] for m in METRICS}


# -- the exact per-class choice --------------------------------------------------------------------

def test_class_thresholds_are_the_exact_optimum_on_val():
    """The knapsack over classes finds the best kappa vector: compared with every combination of
    each class's breakpoints (natural within the tolerance, then most certified, then natural)."""
    rng = np.random.default_rng(0)
    for trial in range(25):
        n, k = 40, 3
        cols = margin_records(rng, n, k)
        cols["lb_g"] = np.nan_to_num(np.minimum(cols["lb_g"], cols["g"]), nan=0.0)  # decided records
        cols["ub_g"] = np.maximum(cols["ub_g"], cols["g"])
        cols["ub_g"][~np.isfinite(cols["ub_g"])] = 100.0
        cols["cert_ok"] = cols["cert_correct"] & (cols["lb_g"] > 0)
        cols["core_ok"] = np.zeros(n, bool)
        rec = Records(cols)
        core, tol = float(np.mean(cols["core_correct"])), 0.05
        got = choose_class_thresholds(rec, core, tol, k)
        cls, g, lb = cols["cert_pred"], cols["g"], cols["lb_g"]
        cands = [np.unique(np.concatenate([[0.0, np.inf], g[cls == c], lb[cls == c]])) for c in range(k)]
        best = None
        for kap in itertools.product(*cands):
            ev = evaluate(rec, 0.0, kappa=list(kap))
            if ev["nat_acc"] >= core - tol - 1e-12:
                key = (ev["cert_acc"], ev["nat_acc"])
                best = key if best is None or key > best else best
        if best is None:
            assert got is None
            continue
        ev = evaluate(rec, 0.0, kappa=got["class_thresholds"])
        assert (ev["cert_acc"], ev["nat_acc"]) == best, trial


# -- the composed model ------------------------------------------------------------------------------

INFO = {"name": "synthetic", "input_shape": [1, 6, 6], "num_classes": 4, "mean": [0.5], "std": [0.3]}
SPEC = {"data": INFO, "eps": 0.05, "core_net": {"name": "fc", "kind": "cert", "hidden": 16},
        "branches": [{"selection": "margin", "threshold": 0.0, "cert_net": {"name": "fc", "kind": "cert", "hidden": 12}}]}


def test_margin_model_routes_by_its_class_thresholds_and_keeps_them(tmp_path):
    torch.manual_seed(0)
    model = ACEModel.from_spec(SPEC).eval()
    x = torch.rand(64, 1, 6, 6)
    with torch.no_grad():
        logits = model.certs[0](x)
    m = float(gap(logits).median())
    kappa = [float("inf"), 0.0, m, 0.5 * m]  # this random net predicts class 2 everywhere
    model.set_class_thresholds(0, kappa)
    model.set_thresholds([0.1 * m])
    want_fire = gap(logits) >= torch.tensor(kappa, dtype=torch.float64)[logits.argmax(-1)] + 0.1 * m
    _, branch = model.route(x)
    assert torch.equal(branch == 0, want_fire) and want_fire.any() and (~want_fire).any()
    torch.testing.assert_close(model(x), model.forward_all(x))
    model.spec = {**SPEC, "branches": [{**SPEC["branches"][0], "class_thresholds": kappa, "threshold": 0.1 * m}]}
    loaded = ACEModel.load(model.save(tmp_path / "m.pt"))
    assert loaded.selection == ["margin"] and torch.equal(loaded.class_thresholds, model.class_thresholds)
    _, again = loaded.route(x)
    assert torch.equal(again, branch)
    with pytest.raises(ValueError, match="class thresholds are for margin"):
        ACEModel.from_spec({**SPEC, "branches": [{"selection": "entropy", "threshold": 0.0,
                                                  "cert_net": SPEC["branches"][0]["cert_net"]}]}).set_class_thresholds(0, kappa)


def test_model_files_from_before_margin_selection_still_load(tmp_path):
    spec = {**SPEC, "branches": [{"selection": "entropy", "threshold": -0.5, "cert_net": SPEC["branches"][0]["cert_net"]}]}
    model = ACEModel.from_spec(spec)
    path = model.save(tmp_path / "old.pt")
    blob = torch.load(path, weights_only=True)
    del blob["state_dict"]["class_thresholds"]
    blob["state_dict"]["thresholds"] = blob["state_dict"]["thresholds"].float()  # they were float32
    torch.save(blob, path)
    loaded = ACEModel.load(path)
    assert loaded.thresholds.dtype == torch.float64 and float(loaded.thresholds[0]) == -0.5


# -- the pipeline without a gate stage --------------------------------------------------------------

def test_pipeline_without_a_gate_stage_certifies_margin_selection(tmp_path):
    """stage.stages=[core, cert, certify] with selection=margin: records in certify_margin/, a
    per-class operating point chosen on val, exported into ace_model.pt, whose predict agrees
    with the records at the exported class thresholds; no soundness violation."""
    import json

    from ace_lightning.registry import run_stage
    from ace_lightning.records import load_records
    from stage_utils import compose_cfg

    from ace_lightning.registry import default_stages

    for selection, stages in (("gate", ["core", "cert", "gate", "certify"]), ("margin", ["core", "cert", "certify"])):
        assert default_stages(compose_cfg(tmp_path, ["stage=pipeline", f"++stage_overrides.certify.selection={selection}"])) == stages
    cfg = compose_cfg(tmp_path, ["stage=pipeline", "run_name=m",  # stage.stages: those margin selection needs
                                 "net@cert_net=fc", "net@core_net=fc", "eps=0.03",
                                 "++stage_overrides.core.epochs=2", "++stage_overrides.cert.epochs=3",
                                 "++stage_overrides.cert.warmup_epochs=0", "++stage_overrides.cert.ramp_epochs=1",
                                 "++stage_overrides.certify.selection=margin",
                                 "++stage_overrides.certify.attack.certified_sample=null"])
    run_stage(cfg)
    out = tmp_path / "m" / "certify_margin"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["soundness_violations"] == 0
    assert not (tmp_path / "m" / "gate").exists()
    points = {p["key"]: p for p in json.loads((out / "operating_points.json").read_text())["operating_points"]}
    chosen = manifest["chosen_operating_point"]
    model = ACEModel.load(out / "ace_model.pt")
    assert model.selection == ["margin"]
    if "per_class" in points:
        assert chosen["key"] == "per_class"
        kappa = [float(v) for v in chosen["class_thresholds"]]
        assert torch.equal(model.class_thresholds[0], torch.tensor(kappa, dtype=torch.float64))
    test = load_records(out / "records.csv", split="test")
    kappa = model.class_thresholds[0].numpy()
    want = rule.certified_at(test.g, test.lb_g, test.ub_g, model.thresholds.numpy(), test.cert_ok, test.core_ok,
                             kappa[None], np.asarray(test["cert_pred"])[None])
    ev = evaluate(test, float(model.thresholds[0]), kappa=kappa)
    assert ev["cert_acc"] == want.mean()


def test_a_cascade_is_certified_swept_attacked_and_exported_from_its_run_folder(tmp_path):
    """Two cert-nets in one run folder (cert/ and cert_2/, stage.folder), composed as a cascade
    of two margin-selection pairs: records with a column per pair, threshold vectors chosen on val
    (coordinate ascent), every reported vector refined, attacked, exported; predict agrees."""
    import json

    from ace_lightning.registry import run_stage
    from ace_lightning.records import load_records
    from stage_utils import compose_cfg

    base = ["run_name=c", "net@cert_net=fc", "net@core_net=fc", "eps=0.03"]
    run_stage(compose_cfg(tmp_path, base + ["stage=core", "stage.epochs=2"]))
    for folder, seed in (("cert", 0), ("cert_2", 1)):
        run_stage(compose_cfg(tmp_path, base + ["stage=cert", f"stage.folder={folder}", f"seed={seed}",
                                                "stage.epochs=3", "stage.warmup_epochs=0", "stage.ramp_epochs=1"]))
    cascade = "[{cert:cert,selection:margin},{cert:cert_2,selection:margin}]"
    manifest = run_stage(compose_cfg(tmp_path, base + ["stage=certify", f"++stage_overrides.certify.cascade={cascade}",
                                                       "++stage_overrides.certify.attack.certified_sample=null"]))
    out = tmp_path / "c" / "certify_cascade"
    assert manifest["status"] == "complete" and manifest["soundness_violations"] == 0
    points = json.loads((out / "operating_points.json").read_text())["operating_points"]
    assert points and all(len(p["threshold"]) == 2 for p in points)
    refined = [tuple(t) for t in manifest["precision"]["refined_at"]["thresholds"]]
    for p in points:
        T = tuple(float(t) for t in p["threshold"])
        assert T in refined or not any(math.isfinite(t) for t in T)
    model = ACEModel.load(out / "ace_model.pt")
    assert model.num_branches == 2 and model.selection == ["margin", "margin"]
    chosen = [float(t) for t in manifest["chosen_operating_point"]["threshold"]]
    assert model.thresholds.tolist() == chosen
    test = load_records(out / "records.csv", split="test")
    assert "g_2" in test and test.n_pairs == 2
    assert evaluate(test, tuple(chosen))["cert_acc"] == manifest["chosen_operating_point"]["test"]["cert_acc"]
    assert (tmp_path / "c" / "cert_2" / "cert.pt").is_file() and not (tmp_path / "c" / "cert_2" / "certify").exists()
