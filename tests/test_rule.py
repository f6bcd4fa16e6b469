"""Property tests of the certification rule (ace_lightning.rule) against an oracle written from
its definition (tests/rule_oracle.py): random cascades of 1-3 pairs whose intervals are inverted,
NaN, infinite, do not contain g, or tie with the threshold. Every implementation is checked:
composed_certified (the model, predict, the attack), the sweep's evaluate and its vectorised
sweep_arrays, and reachable_at (what the attack must try). The old rule (kept below, verbatim)
fails the same test: the generator produces the cases that matter."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rule_oracle import brute_cascade
from ace_lightning import rule
from ace_lightning.ace import composed_certified
from ace_lightning.records import Records
from ace_lightning.sweep import METRICS, evaluate, exact_thresholds, sweep_arrays

POOL = (-1.0, -0.5, 0.0, 0.5, 1.0)  # thresholds come from here too: ties at T are frequent


def random_cascade(rng: np.random.Generator, n_pairs: int, n: int) -> dict[str, np.ndarray]:
    """Records whose intervals are anything: sound, inverted, NaN, +-inf, or missing g."""
    cols = {"core_correct": rng.random(n) < 0.7, "core_ok": rng.random(n) < 0.3}
    for i in range(1, n_pairs + 1):
        g = rng.choice(POOL, n)
        lb = g - rng.choice((0.0, 0.5, 1.0), n)
        ub = g + rng.choice((0.0, 0.5, 1.0), n)
        kind = rng.integers(0, 8, n)
        lb, ub = np.where(kind == 1, ub, lb), np.where(kind == 1, lb, ub)          # inverted
        lb = np.where(kind == 2, np.nan, lb)                                          # NaN
        ub = np.where(kind == 3, np.inf, ub)                                          # +inf
        lb = np.where(kind == 4, -np.inf, lb)                                         # -inf
        lb = np.where(kind == 5, g + 0.5, lb)                                         # g below lb
        g = np.where(kind == 6, np.nan, g)                                            # NaN at x
        cols[f"g_{i}"], cols[f"lb_g_{i}"], cols[f"ub_g_{i}"] = g, lb, ub
        cols[f"cert_correct_{i}"] = rng.random(n) < 0.7
        cols[f"cert_ok_{i}"] = rng.random(n) < 0.6
    return cols


def stacked(cols, name, n_pairs):
    return np.stack([np.asarray(cols[f"{name}_{i}"], dtype=float) for i in range(1, n_pairs + 1)], axis=1)


def oracle_certified(cols, T, n_pairs):
    """Per input, from the oracle (one input at a time)."""
    n = len(cols["core_ok"])
    return np.array([brute_cascade({k: v[k0:k0 + 1] for k, v in cols.items()}, T, n_pairs)["cert_acc"] == 1.0
                     for k0 in range(n)])


def old_composed_certified(cert_ok, core_ok, lb_g, ub_g, thresholds):
    """The rule before issue 21, verbatim: an inverted interval counts as 'cannot fire' and
    'cannot stay off' at once, so no branch is reachable and the input is certified."""
    batch, n = lb_g.shape
    certified = torch.ones(batch, dtype=torch.bool)
    reachable = torch.ones(batch, dtype=torch.bool)
    for k in range(n):
        may_fire = reachable & (ub_g[:, k] >= thresholds[k])
        certified &= ~may_fire | cert_ok[:, k].bool()
        reachable &= ~(lb_g[:, k] >= thresholds[k])
    certified &= ~reachable | core_ok.bool()
    return certified


@pytest.mark.parametrize("n_pairs", [1, 2, 3])
def test_every_implementation_of_the_rule_agrees_with_the_oracle(n_pairs):
    rng = np.random.default_rng(n_pairs)
    for trial in range(12):
        cols = random_cascade(rng, n_pairs, 60)
        T = tuple(float(v) for v in rng.choice(POOL + (-math.inf, math.inf), n_pairs))
        want = oracle_certified(cols, T, n_pairs)
        got = composed_certified(stacked(cols, "cert_ok", n_pairs), cols["core_ok"], stacked(cols, "lb_g", n_pairs),
                                 stacked(cols, "ub_g", n_pairs), list(T), g=stacked(cols, "g", n_pairs))
        assert np.array_equal(got.numpy(), want), (trial, T)
        assert tuple(evaluate(cols, T)[m] for m in METRICS) == tuple(brute_cascade(cols, T, n_pairs)[m] for m in METRICS)
        reach = rule.reachable_at(*(stacked(cols, c, n_pairs).T for c in ("g", "lb_g", "ub_g")), T)
        for k in range(len(cols["core_ok"])):  # what the attack must try: every branch that may answer
            options = []
            for i in range(n_pairs):
                g, lb, ub = (float(cols[f"{c}_{i + 1}"][k]) for c in ("g", "lb_g", "ub_g"))
                decided = math.isfinite(lb) and math.isfinite(ub) and lb <= g <= ub
                options.append([s for s in (True, False) if not decided or (ub >= T[i] if s else lb < T[i])])
            possible = {next((i for i, s in enumerate(st) if s), n_pairs) for st in itertools.product(*options)}
            assert set(np.flatnonzero(reach[k]).tolist()) == possible
        # the vectorised sweep over one pair's threshold (the others fixed) agrees at every breakpoint
        for pair in range(1, n_pairs + 1):
            grid = exact_thresholds(cols, pair=pair) if n_pairs > 1 else exact_thresholds(
                {k[:-2] if k.endswith("_1") else k: v for k, v in cols.items()})
            rec = cols if n_pairs > 1 else {k[:-2] if k.endswith("_1") else k: v for k, v in cols.items()}
            arrays = sweep_arrays(rec, grid, pair=pair, fixed=T if n_pairs > 1 else None)
            for j, t in enumerate(grid):
                full = list(T)
                full[pair - 1] = float(t)
                oracle = brute_cascade(cols, tuple(full), n_pairs)
                assert tuple(arrays[m][j] for m in METRICS) == tuple(oracle[m] for m in METRICS), (pair, t)


def test_the_old_rule_fails_the_same_oracle():
    """The generator produces the cases that broke the old rule (inverted intervals certified
    with neither branch certified): the property test above would have caught it."""
    rng = np.random.default_rng(0)
    disagreements = 0
    for _ in range(20):
        cols = random_cascade(rng, 2, 60)
        T = tuple(float(v) for v in rng.choice(POOL, 2))
        want = oracle_certified(cols, T, 2)
        old = old_composed_certified(torch.as_tensor(stacked(cols, "cert_ok", 2)).bool(),
                                     torch.as_tensor(cols["core_ok"]), torch.as_tensor(stacked(cols, "lb_g", 2)),
                                     torch.as_tensor(stacked(cols, "ub_g", 2)), torch.as_tensor(T)).numpy()
        disagreements += int((old & ~want).sum())  # the old rule certified what the definition does not
    assert disagreements > 0


def test_the_inverted_interval_of_the_audit_is_not_certified_anywhere():
    """The audit's case: lb_g >= T > ub_g with neither branch certified was certified by the
    model's rule; either branch certified was certified by the sweep's."""
    assert not composed_certified(cert_ok=[[False]], core_ok=[False], lb_g=[[1.0]], ub_g=[[0.9]],
                                  thresholds=[0.95]).any()
    for cert_ok, core_ok in ((0, 0), (1, 0), (0, 1)):
        cols = {"g": [0.95], "lb_g": [1.0], "ub_g": [0.9], "cert_correct": [1], "cert_ok": [cert_ok],
                "core_correct": [1], "core_ok": [core_ok]}
        for T in exact_thresholds(cols):  # every breakpoint the sweep can pick
            assert evaluate(cols, T)["cert_acc"] == 0.0, (cert_ok, core_ok, T)
    both = {"g": [0.95], "lb_g": [1.0], "ub_g": [0.9], "cert_correct": [1], "cert_ok": [1], "core_correct": [1],
            "core_ok": [1]}
    assert all(evaluate(both, T)["cert_acc"] == 1.0 for T in exact_thresholds(both))  # every branch certified


def test_records_flag_their_undecided_intervals():
    rec = Records({"g": [0.0, 0.0, np.nan, 0.0], "lb_g": [-1.0, 1.0, -1.0, -np.inf], "ub_g": [1.0, 0.5, 1.0, 1.0],
                   "cert_correct": [1] * 4, "cert_ok": [1] * 4, "core_correct": [1] * 4, "core_ok": [0] * 4})
    assert rec.decided[0].tolist() == [True, False, False, False]
    assert rec.poisoned.tolist() == [False, False, True, False]
