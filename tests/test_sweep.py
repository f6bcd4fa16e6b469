"""Threshold sweep and report from certification records (ace-method 4.3, 4.5, 7).

The sweep is checked against literal per-input loops of the paper's rules (equality, not approx),
exact thresholds against dense probing, and the report files by reading them back.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import warnings

import numpy as np
import pytest

from record_factory import synthetic_records
from rule_oracle import brute_cascade, brute_single
from ace_lightning.operating import choose_operating_points
from ace_lightning.records import NO_RECORDS, Records, load_records, save_records
from ace_lightning.report import PLOT_DPI, PLOT_SIZE, format_table, write_sweep_outputs
from ace_lightning.sweep import (
    METRICS,
    SWEEP_COLUMNS,
    evaluate,
    exact_thresholds,
    reference_points,
    report_at,
    sweep,
    sweep_arrays,
)

UP = lambda x: float(np.nextafter(x, np.inf))  # noqa: E731


# --------------------------------------------------------------------------- brute-force oracles


def metrics(row):
    return tuple(row[m] for m in METRICS)


# --------------------------------------------------------------------------- hand-computed case


def hand_records():
    """8 inputs; at T = 0.5 each exercises one branch of the rule (comments: nat, cert)."""
    rows = [  # g, lb, ub, cert_correct, cert_ok, core_correct, core_ok
        (0.9, 0.6, 0.95, 1, 1, 0, 0),  # certifiably routed to cert-net, cert_ok: 1, 1
        (0.7, 0.3, 0.8, 1, 1, 1, 1),  # undecided, both certified: 1, 1
        (0.6, 0.4, 0.9, 1, 1, 1, 0),  # undecided, only cert-net certified: 1, 0
        (0.2, 0.1, 0.3, 0, 0, 1, 1),  # certifiably routed to core, core_ok: 1, 1
        (0.5, 0.5, 0.7, 1, 1, 0, 0),  # g = lb = T: routed and certifiably routed to cert-net: 1, 1
        (0.4, 0.2, 0.5, 1, 0, 1, 1),  # ub = T: not certifiably core (ub < T fails), undecided: 1, 0
        (0.3, 0.2, 0.4, 1, 1, 0, 0),  # certifiably core, core not certified (cert_ok no help): 0, 0
        (0.8, 0.55, 0.9, 0, 0, 1, 1),  # certifiably cert-net, not certified (core_ok no help): 0, 0
    ]
    names = ("g", "lb_g", "ub_g", "cert_correct", "cert_ok", "core_correct", "core_ok")
    cols = {name: np.array([r[j] for r in rows]) for j, name in enumerate(names)}
    cols["split"] = np.array(["test"] * len(rows))
    return cols


@pytest.mark.parametrize("T, expected", [
    (0.5, (6, 4, 5, 3, 3)),
    (UP(0.5), (5, 4, 4, 2, 3)),  # input 4 falls to the core (uncertified), input 5 certifiably core
    (-math.inf, (6, 5, 8, 8, 0)),  # all cert-net: mean cert_correct, mean cert_ok
    (math.inf, (5, 4, 0, 0, 0)),  # all core: mean core_correct, mean core_ok
])
def test_hand_case(T, expected):
    cols = hand_records()
    got = evaluate(cols, T)
    assert metrics(got) == tuple(e / 8 for e in expected)
    assert metrics(got) == metrics(brute_single(cols, T))
    rows = {r["threshold"]: r for r in sweep(cols, grid=[T])}
    assert metrics(rows[T]) == metrics(got)


def test_reference_points_hand_case():
    core, cert = reference_points(hand_records())
    assert (core["nat_acc"], core["cert_acc"], core["threshold"]) == (5 / 8, 4 / 8, math.inf)
    assert (cert["nat_acc"], cert["cert_acc"], cert["threshold"]) == (6 / 8, 5 / 8, -math.inf)


# --------------------------------------------------------------------------- sweep == brute force


@pytest.mark.parametrize("sound, decimals, seed", [(True, 1, 0), (False, 1, 1), (True, None, 2), (False, None, 3)])
def test_sweep_matches_brute_force(sound, decimals, seed):
    cols = synthetic_records(120, seed=seed, sound=sound, decimals=decimals)
    rows = sweep(cols, grid=7, exact=True)
    exact = exact_thresholds(cols)
    assert set(exact.tolist()) <= {r["threshold"] for r in rows}
    assert [r["threshold"] for r in rows] == sorted(r["threshold"] for r in rows)
    for row in rows:
        oracle = brute_single(cols, row["threshold"])
        assert metrics(row) == metrics(oracle), row["threshold"]
        assert metrics(evaluate(cols, row["threshold"])) == metrics(oracle)


def test_sound_records_properties():
    """cert <= nat needs sound records (cert_ok => cert_correct, core_ok => core_correct,
    lb_g <= g <= ub_g); routing falls as T rises."""
    rows = sweep(synthetic_records(300, seed=4, sound=True, decimals=1))
    for row in rows:
        assert row["cert_acc"] <= row["nat_acc"]
        assert row["cert_route_certified_rate"] <= row["cert_route_rate"]
    route = [r["cert_route_rate"] for r in rows]
    assert route == sorted(route, reverse=True) and route[0] == 1.0 and route[-1] == 0.0


def test_unsound_records_can_certify_above_natural():
    """cert <= nat is not a property of the rule: records with cert_ok but not cert_correct
    (an unsound certifier) are counted as given."""
    cols = hand_records()
    cols["cert_correct"] = np.zeros(8, int)
    assert evaluate(cols, -math.inf)["cert_acc"] > evaluate(cols, -math.inf)["nat_acc"]


# --------------------------------------------------------------------------- exact thresholds


@pytest.mark.parametrize("sound, seed", [(True, 5), (False, 6)])
def test_exact_thresholds_capture_every_change(sound, seed):
    cols = synthetic_records(60, seed=seed, sound=sound, decimals=1)
    exact = exact_thresholds(cols)
    assert exact[0] == -math.inf and exact[-1] == math.inf and np.all(np.diff(exact) > 0)
    values = np.concatenate([cols["g"], cols["lb_g"], cols["ub_g"]]).astype(float)
    mids = (exact[1:-2] + exact[2:-1]) / 2
    probes = np.unique(np.concatenate([values, np.nextafter(values, np.inf), np.nextafter(values, -np.inf),
                                       mids, [-math.inf, math.inf, -1e300, 1e300],
                                       np.random.default_rng(seed).uniform(-4, 4, 50)]))
    at_exact = sweep_arrays(cols, exact)
    for T in probes:
        j = int(np.searchsorted(exact, T, side="left"))  # smallest exact threshold >= T
        assert metrics(evaluate(cols, T)) == tuple(at_exact[m][j] for m in METRICS), T
    # the -inf end is a real threshold: it equals the piece below the smallest value
    assert tuple(at_exact[m][0] for m in METRICS) == tuple(at_exact[m][1] for m in METRICS)


def test_exact_thresholds_use_ub_itself_not_next_float():
    """Curve pieces are (s, s']; taking nextafter(ub) with g and lb misses the piece between a
    g value and a larger ub: here T in (0, 1] routes to the core without a certificate."""
    cols = {"g": [0.0], "lb_g": [0.0], "ub_g": [1.0], "cert_correct": [0], "cert_ok": [0],
            "core_correct": [1], "core_ok": [1]}
    pieces = {(evaluate(cols, T)["nat_acc"], evaluate(cols, T)["cert_acc"]) for T in exact_thresholds(cols)}
    assert pieces == {(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)}
    naive = [-math.inf, 0.0, UP(1.0), math.inf]
    assert (1.0, 0.0) not in {(evaluate(cols, T)["nat_acc"], evaluate(cols, T)["cert_acc"]) for T in naive}


# --------------------------------------------------------------------------- cascades


def test_cascade_evaluate_matches_semantic_oracle():
    cols = synthetic_records(80, n_pairs=3, seed=7, sound=True, decimals=1)
    rng = np.random.default_rng(7)
    vals = np.concatenate([cols[f"{c}_{i}"] for c in ("g", "lb_g", "ub_g") for i in (1, 2, 3)])
    for _ in range(40):
        T = tuple(float(v) for v in rng.choice(vals, 3))  # thresholds on record values: ties
        assert metrics(evaluate(cols, T)) == metrics(brute_cascade(cols, T, 3)), T


def test_cascade_of_one_pair_is_the_single_rule():
    cols = synthetic_records(100, seed=8, sound=False, decimals=1)
    suffixed = {(k + "_1" if k in ("g", "lb_g", "ub_g", "cert_correct", "cert_ok", "cert_pred") else k): v
                for k, v in cols.items()}
    for T in exact_thresholds(cols):
        assert metrics(evaluate(suffixed, (T,))) == metrics(evaluate(cols, T)) == metrics(brute_single(cols, T))


def test_cascade_sweep_one_pair_with_others_fixed():
    cols = synthetic_records(80, n_pairs=2, seed=9, sound=False, decimals=1)
    fixed = (0.3, -0.2)
    for pair in (1, 2):
        rows = sweep(cols, grid=5, pair=pair, fixed=fixed)
        assert set(exact_thresholds(cols, pair=pair).tolist()) <= {r["threshold"] for r in rows}
        for row in rows:
            T = list(fixed)
            T[pair - 1] = row["threshold"]
            assert metrics(row) == metrics(evaluate(cols, tuple(T)))
    with pytest.raises(ValueError, match="fixed="):
        sweep(cols)
    with pytest.raises(ValueError, match="2 \\(cert-net, gate\\) pair"):
        evaluate(cols, 0.5)


# --------------------------------------------------------------------------- operating points


def test_choose_operating_points():
    rows = [  # threshold, nat, cert
        (-math.inf, 0.70, 0.50), (0.1, 0.75, 0.50), (0.2, 0.80, 0.45), (0.3, 0.86, 0.40),
        (0.4, 0.89, 0.30), (0.5, 0.89, 0.30), (0.6, 0.89, 0.30), (0.7, 0.91, 0.10), (math.inf, 0.90, 0.05),
    ]
    rows = [dict(zip(("threshold", "nat_acc", "cert_acc"), r), cert_route_rate=0.0,
                 cert_route_certified_rate=0.0, undecided_rate=0.0) for r in rows]
    chosen = {p["key"]: p["threshold"] for p in choose_operating_points(rows, core_nat=0.90)}
    assert chosen["nat_within_1pt"] == 0.5  # nat >= 0.89: three tied rows, the median one
    assert chosen["max_certified"] == 0.1  # cert 0.50 twice: the higher natural wins
    assert chosen["max_natural"] == 0.7
    assert chosen["equal_weight"] == 0.3  # 1.26
    assert "nat_within_1pt" not in {p["key"] for p in choose_operating_points(rows[:3], core_nat=0.90)}


def test_report_at_and_adversarial_column():
    at = report_at(hand_records(), {"chosen": 0.5, "other": 0.6})
    assert at[0]["name"] == "chosen" and metrics(at[0]) == metrics(evaluate(hand_records(), 0.5))
    assert all("adv_acc" not in p for p in at)  # records carry no attack: the certify stage adds it
    assert "adversarial" not in format_table(at)
    at[0]["adv_acc"] = 0.5  # as attack_and_check adds it to the points
    table = format_table(at)
    assert "adversarial" in table and "50.00" in table


def test_format_table_generic_columns():
    points = reference_points(hand_records()) + [
        {"name": "p", "threshold": 0.5, "nat_acc": 0.75, "cert_acc": 0.5, "cert_route_rate": 0.625,
         "adv_correct_at_T": 0.4}]
    lines = format_table(points, title="test").splitlines()
    assert lines[0] == "test" and len(lines) == 3 + len(points)
    assert "adv_correct_at_T" in lines[1] and "natural" in lines[1] and "routed" in lines[1]
    assert "+inf" in lines[3] and "-inf" in lines[4] and "40.00" in lines[5]
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width


# --------------------------------------------------------------------------- files


def test_csv_round_trip(tmp_path):
    cols = synthetic_records(50, seed=10, decimals=None)
    cols["g"][0], cols["ub_g"][1] = -math.inf, math.inf
    path = save_records(cols, tmp_path / "records.csv")
    rec = load_records(path)
    for name in ("g", "lb_g", "ub_g"):
        assert np.array_equal(rec[name], cols[name])
    assert rec["split"].dtype.kind == "U" and rec["index"].dtype == np.int64
    assert sweep(rec) == sweep(cols)
    val = load_records(path, split="val")
    assert len(val) == int(np.sum(cols["split"] == "val")) and val.splits == {"val"}


def test_parquet_round_trip_equals_csv(tmp_path):
    """Parquet is part of the install ([test] extra), so this path is exercised in CI."""
    cols = synthetic_records(50, seed=11, decimals=None)
    cols["lb_g"][2] = -math.inf
    csv_rec = load_records(save_records(cols, tmp_path / "records.csv"))
    pq_rec = load_records(save_records(cols, tmp_path / "records.parquet"))
    for name in cols:
        assert np.array_equal(np.asarray(pq_rec[name]), np.asarray(csv_rec[name])), name
    assert pq_rec.splits == csv_rec.splits
    assert sweep(pq_rec) == sweep(csv_rec)


def test_write_sweep_outputs(tmp_path):
    import matplotlib.image

    cols = synthetic_records(400, seed=11, decimals=2)
    path = save_records(cols, tmp_path / "records.csv")
    out = write_sweep_outputs(path, tmp_path / "sweep", grid=21)
    files = sorted(os.listdir(tmp_path / "sweep"))
    assert files == ["operating_points.json", "pareto.png", "sweep_test.csv", "sweep_val.csv"]  # no temp files
    test = load_records(path, split="test")
    with open(out["sweep_test"], newline="") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == SWEEP_COLUMNS
    assert [[float(v) for v in r] for r in table[1:]] == [[r[c] for c in SWEEP_COLUMNS] for r in sweep(test, grid=21)]
    text = open(out["operating_points"]).read()
    assert "Infinity" not in text and "NaN" not in text
    summary = json.loads(text)
    assert {p["key"] for p in summary["operating_points"]} == {"nat_within_1pt", "max_certified", "max_natural", "equal_weight"}
    assert [p["name"] for p in summary["reference_points"]] == ["core alone", "cert-net alone"]
    for point in summary["operating_points"]:
        assert metrics(point["test"]) == metrics(evaluate(test, point["threshold"]))  # chosen on val, evaluated on test
    within = next(p for p in summary["operating_points"] if p["key"] == "nat_within_1pt")
    assert within["val"]["nat_acc"] >= summary["core_nat_val"] - 0.01
    image = matplotlib.image.imread(out["pareto"])
    assert image.shape[:2] == (round(PLOT_SIZE[1] * PLOT_DPI), round(PLOT_SIZE[0] * PLOT_DPI))
    assert "max certified" in format_table(out["points"])


def test_write_sweep_outputs_without_val(tmp_path):
    cols = synthetic_records(100, seed=12, splits=("test",))
    (tmp_path / "sweep_val.csv").write_text("stale\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_sweep_outputs(cols, tmp_path)
    assert any("no 'val' records" in str(w.message) for w in caught)
    assert not (tmp_path / "sweep_val.csv").exists() and os.path.exists(out["sweep_test"])
    assert json.loads(open(out["operating_points"]).read())["operating_points"] == []


def test_sweep_cost_times_each_exact_sweep_and_returns_the_best(monkeypatch):
    """The benchmarks' timer: the clock is read right before and after each real exact sweep of
    the records, and the fastest repeat is returned (a scripted clock makes the times exact)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ace_costs as bench

    cols = synthetic_records(200, seed=13)
    exact_rows = sweep(cols, exact=True)
    assert exact_rows != sweep(cols, exact=False)  # so the rows below tell which sweep was timed
    now, durations, events, calls = [100.0], iter([0.75, 0.25, 0.5, 2.0]), [], []

    class ScriptedClock:
        @staticmethod
        def perf_counter():
            events.append("clock")
            return now[0]

    def timed_sweep(records, *args, **kwargs):
        events.append("sweep")
        rows = sweep(records, *args, **kwargs)  # the real sweep
        calls.append((args, kwargs, rows))
        now[0] += next(durations)  # it takes this long on the scripted clock
        return rows

    monkeypatch.setattr(bench, "time", ScriptedClock)
    monkeypatch.setattr(bench, "sweep", timed_sweep)
    assert bench.sweep_cost(cols, repeats=3) == 0.25
    assert events == ["clock", "sweep", "clock"] * 3  # nothing else is inside the timed span
    assert [(a, k) for a, k, _ in calls] == [((), {"exact": True})] * 3
    assert all(rows == exact_rows for *_, rows in calls)
    events.clear()
    assert bench.sweep_cost(cols, repeats=0) == 2.0  # at least one sweep
    assert events == ["clock", "sweep", "clock"]


# --------------------------------------------------------------------------- errors


def _write(path, text):
    path.write_text(text)
    return path


def _one_line_error(exc_info):
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def test_error_missing_columns(tmp_path):
    path = _write(tmp_path / "r.csv", "index,split,g,ub_g,cert_correct,core_correct,core_ok\n0,test,0.1,0.2,1,1,0\n")
    with pytest.raises(ValueError) as err:
        load_records(path)
    assert "cert_ok, lb_g" in _one_line_error(err)


@pytest.mark.parametrize("text", ["", "index,split,g,lb_g,ub_g,cert_correct,cert_ok,core_correct,core_ok\n"])
def test_error_no_records(tmp_path, text):
    with pytest.raises(ValueError) as err:
        load_records(_write(tmp_path / "r.csv", text))
    assert _one_line_error(err) == NO_RECORDS
    with pytest.raises(ValueError, match="no records"):
        Records({name: [] for name in ("g", "lb_g", "ub_g", "cert_correct", "cert_ok", "core_correct", "core_ok")})


def test_error_wrong_split(tmp_path):
    path = save_records(hand_records(), tmp_path / "r.csv")
    with pytest.raises(ValueError) as err:
        load_records(path, split="val")
    assert _one_line_error(err) == "records hold split(s) {'test'}, asked for 'val'"


def test_error_bad_values_and_grid(tmp_path):
    cols = hand_records()
    with pytest.raises(ValueError, match="threshold grid is empty"):
        sweep(cols, grid=[], exact=False)
    with pytest.raises(ValueError, match="threshold grid is empty"):
        sweep(cols, grid=0)
    # a NaN gate value or bound is accepted and never certified (ace_lightning.rule)
    nan = dict(cols, lb_g=np.where(np.arange(8) == 1, np.nan, cols["lb_g"]))
    assert evaluate(nan, 0.5)["cert_acc"] == evaluate(cols, 0.5)["cert_acc"] - 1 / 8
    with pytest.raises(ValueError, match="column g: value 'x' is not a number"):
        evaluate(dict(cols, g=np.array(["x"] + ["0.1"] * 7)), 0.5)
    with pytest.raises(ValueError, match="column cert_ok: value 2"):
        evaluate(dict(cols, cert_ok=np.array([2] + [0] * 7)), 0.5)
    with pytest.raises(FileNotFoundError, match="run certify first"):
        load_records(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="line 3 has"):
        load_records(_write(tmp_path / "short.csv", "g,lb_g,ub_g,cert_correct,cert_ok,core_correct,core_ok\n"
                                                    "0,0,0,1,1,1,1\n0,0,0,1\n"))


def test_parquet_needs_pyarrow(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        path = _write(tmp_path / "r.parquet", "not parquet")
        with pytest.raises(ValueError, match="pyarrow"):
            load_records(path)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = synthetic_records(30, seed=14)
        pq.write_table(pa.table({k: np.asarray(v) for k, v in cols.items()}), tmp_path / "r.parquet")
        assert sweep(load_records(tmp_path / "r.parquet")) == sweep(cols)
