"""Operating points: thresholds chosen on the VALIDATION records (choosing on test would inflate
the numbers), for one threshold T, margin selection's per-class thresholds kappa and a cascade's
threshold vector.

Why a module of its own: the sweep (ace_lightning.sweep) gives every threshold's rates; which
thresholds to report, export and refine at is a separate decision with its own criteria, used by
the report and by the certify stage's refinement.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ace_lightning.errors import ConfigError
from ace_lightning.records import Records, as_records
from ace_lightning.sweep import METRICS, SWEEP_COLUMNS, evaluate, exact_thresholds, sweep, sweep_arrays

OPERATING_POINTS = (
    ("nat_within_1pt", "natural within 1 pt of core"),
    ("max_certified", "max certified"),
    ("max_natural", "max natural"),
    ("equal_weight", "equal weight (nat + cert)"),
)


def _metric_rows(rows: Sequence[Mapping[str, float]] | Mapping[str, np.ndarray]) -> list[Mapping[str, float]]:
    if isinstance(rows, Mapping):
        cols = [np.asarray(rows[name]).tolist() for name in SWEEP_COLUMNS]
        return [dict(zip(SWEEP_COLUMNS, values)) for values in zip(*cols)]
    return list(rows)


def choose_operating_points(val_rows: Sequence[Mapping[str, float]], core_nat: float,
                            tolerance: float = 0.01) -> list[dict[str, Any]]:
    """Operating points on the VALIDATION curve (choosing on test would inflate the numbers).

    Criteria, each a lexicographic key: natural within ``tolerance`` of the core's natural accuracy
    (max certified, then natural, among rows with nat >= core_nat - tolerance); max certified
    (then natural); max natural (then certified); equal weight (max nat + cert, then certified).
    Among rows tied on the key the median one by T is taken: it sits inside the flat stretch of
    the curve rather than at its edge, so the choice is less sensitive to the val sample.
    A criterion no row satisfies is left out.
    """
    rows = sorted(_metric_rows(val_rows), key=lambda r: r["threshold"])
    if not rows:
        raise ConfigError("threshold sweep with no rows: run sweep first")
    floor = core_nat - tolerance - 1e-12
    keys = {
        "nat_within_1pt": lambda r: (r["cert_acc"], r["nat_acc"]) if r["nat_acc"] >= floor else None,
        "max_certified": lambda r: (r["cert_acc"], r["nat_acc"]),
        "max_natural": lambda r: (r["nat_acc"], r["cert_acc"]),
        "equal_weight": lambda r: (round(r["nat_acc"] + r["cert_acc"], 12), r["cert_acc"]),
    }
    points = []
    for key, name in OPERATING_POINTS:
        scored = [(keys[key](r), r) for r in rows]
        scored = [(s, r) for s, r in scored if s is not None]
        if not scored:
            continue
        best = max(s for s, _ in scored)
        tied = [r for s, r in scored if s == best]
        row = tied[(len(tied) - 1) // 2]
        points.append({"key": key, "name": name, "threshold": row["threshold"],
                       "val": {m: row[m] for m in METRICS}})
    return points


def val_operating_thresholds(records: Union[Records, Mapping[str, Any]], grid: int | Sequence[float] | None = None,
                             tolerance: float = 0.01) -> list:
    """The finite thresholds of the operating points chosen on the val records (empty without
    val): where the certify stage refines gate intervals before it reports. A cascade's are
    threshold vectors (tuples, with infinite entries)."""
    rec = as_records(records)
    if "val" not in rec.splits:
        return []
    val = rec.split("val")
    core_nat = float(np.mean(val.core_correct))
    if val.n_pairs > 1:  # a cascade: threshold vectors
        return sorted({T for T in (choose_cascade_thresholds(val, f) for f in (core_nat - tolerance, -math.inf))
                       if T is not None})
    points = choose_operating_points(sweep(val, grid), core_nat, tolerance)
    return sorted(t for t in {float(p["threshold"]) for p in points} if math.isfinite(t))


def val_class_thresholds(records: Union[Records, Mapping[str, Any]], tolerance: float = 0.01
                         ) -> Optional[tuple[float, ...]]:
    """Margin selection's per-class operating point chosen on the val records (None for other
    selections): the certify stage refines each input at its own class's threshold."""
    rec = as_records(records)
    if "val" not in rec.splits:
        return None
    val = rec.split("val")
    point = class_threshold_point(val, float(np.mean(val.core_correct)), tolerance)
    return None if point is None else tuple(float(v) for v in point["class_thresholds"])


PER_CLASS = ("per_class", "per-class kappa, natural within 1 pt")
PER_CLASS_LEVELS = 60  # natural-accuracy floors of the per-class curve (and of a cascade's)
CASCADE_ROUNDS = 20


def choose_cascade_thresholds(val: Records, floor: float) -> Optional[tuple[float, ...]]:
    """A cascade's threshold vector chosen on val: the most certified inputs (then the most
    natural) among the vectors with natural accuracy >= ``floor``, by coordinate ascent where each
    step is the exact sweep of one pair's threshold with the others fixed (every breakpoint; the
    median of tied thresholds), stopping when a round changes nothing (each accepted step improves
    the key, so it ends). Coordinate ascent finds a local optimum, so it starts from every corner
    where one pair answers everything (and from the core alone) and keeps the best. None: no vector
    tried meets the floor."""
    n = val.n_pairs
    starts = [tuple([math.inf] * n)] + [tuple(-math.inf if j == k else math.inf for j in range(n)) for k in range(n)]
    found = [_cascade_ascent(val, floor, list(T)) for T in starts]
    found = [f for f in found if f is not None]
    return max(found, key=lambda f: f[0])[1] if found else None


def _cascade_ascent(val: Records, floor: float, T: list[float]) -> Optional[tuple[tuple[float, float], tuple[float, ...]]]:
    now = evaluate(val, tuple(T))
    best = (now["cert_acc"], now["nat_acc"]) if now["nat_acc"] >= floor else None
    for _ in range(CASCADE_ROUNDS):
        changed = False
        for k in range(len(T)):
            grid = exact_thresholds(val, pair=k + 1)
            arr = sweep_arrays(val, grid, pair=k + 1, fixed=tuple(T))
            ok = np.flatnonzero(arr["nat_acc"] >= floor)
            if ok.size == 0:
                continue
            keys = list(zip(arr["cert_acc"][ok], arr["nat_acc"][ok]))
            top = max(keys)
            tied = [int(ok[j]) for j, key in enumerate(keys) if key == top]
            if best is None or top > best:
                T[k], best, changed = float(grid[tied[(len(tied) - 1) // 2]]), top, True
        if not changed:
            break
    return (best, tuple(T)) if best is not None else None


def cascade_curve(val: Records, test: Optional[Records] = None, levels: int = PER_CLASS_LEVELS
                  ) -> dict[str, list[dict[str, float]]]:
    """A cascade's front: for natural-accuracy floors from its least to its most accurate single
    branch (val), the vector ``choose_cascade_thresholds`` picks on val, evaluated on val and test
    (rows as the sweep's, ``threshold`` = the val floor)."""
    accs = [float(np.mean(val.core_correct))] + [float(np.mean(c)) for c in val.cert_correct]
    floors = np.unique(np.round(np.linspace(min(accs), max(accs), levels), 6))
    out: dict[str, list[dict[str, float]]] = {"val": [], **({"test": []} if test is not None else {})}
    seen = set()
    for floor in floors:
        T = choose_cascade_thresholds(val, float(floor))
        if T is None or T in seen:
            continue
        seen.add(T)
        for name, part in (("val", val), ("test", test)):
            if part is not None:
                ev = evaluate(part, T)
                out[name].append({"threshold": float(floor), **{m: ev[m] for m in METRICS}})
    return out


def class_threshold_curve(val: Records, test: Optional[Records] = None, levels: int = PER_CLASS_LEVELS
                          ) -> dict[str, list[dict[str, float]]]:
    """Margin selection's per-class curve: for natural-accuracy floors from the cert-net alone to
    the core alone (val), the kappa vector ``choose_class_thresholds`` picks on val, evaluated on
    val and on test. Rows as the sweep's, with ``threshold`` = the val floor. Empty for other
    selections."""
    if val.n_pairs != 1 or val.selection[0] != "margin":
        return {}
    lo, hi = float(np.mean(val.cert_correct[0])), float(np.mean(val.core_correct))
    floors = np.unique(np.round(np.linspace(min(lo, hi), max(lo, hi), levels), 6))
    out: dict[str, list[dict[str, float]]] = {"val": [], **({"test": []} if test is not None else {})}
    seen = set()
    for floor in floors:
        chosen = choose_class_thresholds(val, float(floor), 0.0)
        if chosen is None or tuple(chosen["class_thresholds"]) in seen:
            continue
        seen.add(tuple(chosen["class_thresholds"]))
        for name, part in (("val", val), ("test", test)):
            if part is not None:
                ev = evaluate(part, 0.0, kappa=chosen["class_thresholds"])
                out[name].append({"threshold": float(floor), **{m: ev[m] for m in METRICS}})
    return out


def class_threshold_point(val: Records, core_nat: float, tolerance: float = 0.01) -> Optional[dict[str, Any]]:
    """The per-class operating point of margin-selection records (one pair), chosen on val
    (``choose_class_thresholds``); None for other selections or when no vector meets the criterion."""
    if val.n_pairs != 1 or val.selection[0] != "margin":
        return None
    chosen = choose_class_thresholds(val, core_nat, tolerance)
    if chosen is None:
        return None
    ev = evaluate(val, 0.0, kappa=chosen["class_thresholds"])
    return {"key": PER_CLASS[0], "name": PER_CLASS[1], "threshold": 0.0,
            "class_thresholds": chosen["class_thresholds"], "val": {m: ev[m] for m in METRICS}}


def _pareto(nat: np.ndarray, cert: np.ndarray) -> list[int]:
    """Indices of the options no other option beats on both counts (one per distinct pair): a
    dominated option never helps the knapsack, whatever the other classes choose."""
    order = np.lexsort((-cert, -nat))  # natural descending, then certified descending
    keep, top = [], -1
    for j in order:
        if cert[j] > top:
            keep.append(int(j))
            top = int(cert[j])
    return keep


def choose_class_thresholds(val: Union[Records, Mapping[str, Any]], core_nat: float, tolerance: float = 0.01,
                            num_classes: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Margin selection's per-class thresholds kappa (one pair, T = 0), chosen exactly on the val
    records for the criterion of ``nat_within_1pt``: the most certified inputs among the kappa
    vectors whose natural accuracy is within ``tolerance`` of the core's (then the most natural).

    Why exact is cheap: with no certified core (the usual case) an input is certified iff its
    class c is certified constant with gap >= kappa_c (lb > 0 and lb >= kappa_c, cert_ok), and
    answered by the cert-net iff gap(x) >= kappa_c: both depend on its own class's kappa only. So
    each class has a curve of (natural, certified) counts over its breakpoints, and the best
    combination under a bound on the total natural count is a multiple-choice knapsack, solved
    exactly by dynamic programming over that count (classes x breakpoints x inputs). Certificates
    through a certified core are not counted in the choice (they can only add to the result,
    which ``evaluate`` computes exactly). Within a class, among the kappas that give the chosen
    counts the median is taken (the middle of the flat stretch, as for one threshold). None when
    no vector meets the criterion."""
    rec = as_records(val)
    if rec.n_pairs != 1:
        raise ConfigError("class thresholds are chosen for one (cert-net, margin) pair")
    cls = np.asarray(rec["cert_pred"], dtype=np.int64) if "cert_pred" in rec else None
    if cls is None:
        raise ConfigError("class thresholds need the records' cert_pred column: re-run certify")
    k = int(num_classes or cls.max() + 1)
    g, lb = rec.g[0], rec.lb_g[0]
    ok = rec.decided[0] & ~rec.poisoned & rec.cert_ok[0] & (lb > 0)
    gain = rec.cert_correct[0].astype(np.int64) - rec.core_correct.astype(np.int64)
    base_nat = int(np.count_nonzero(rec.core_correct))
    options, kappas = [], []  # per class: (nat gain, certified) per candidate, and the candidates
    for c in range(k):
        mine = cls == c
        gc, lbc, gainc = g[mine], lb[mine], gain[mine]
        cand = np.unique(np.concatenate([[0.0, np.inf], gc[gc > 0], lbc[ok[mine]]]))
        cand = cand[~np.isnan(cand)]
        order = np.argsort(gc, kind="stable")
        suffix = np.concatenate([np.cumsum(gainc[order][::-1])[::-1], [0]])
        nat = suffix[np.searchsorted(gc[order], cand, side="left")]  # gain of the inputs with g >= kappa
        lbs = np.sort(lbc[ok[mine]])
        cert = lbs.size - np.searchsorted(lbs, cand, side="left")  # certified: lb >= kappa
        options.append((nat.astype(np.int64), cert.astype(np.int64)))
        kappas.append(cand)
    # DP over the total natural gain (state i: gain offset + i): the best certified count, the choices
    width = 1 + sum(int(nat.max() - nat.min()) for nat, _ in options)
    best = np.full(width, -1, np.int64)
    best[0] = 0
    offset, choice = 0, []
    for nat, cert in options:
        cmin = int(nat.min())
        new, pick = np.full(width, -1, np.int64), np.full(width, -1, np.int64)
        for j in _pareto(nat, cert):
            shift = int(nat[j]) - cmin
            value = np.where(best[:width - shift] >= 0, best[:width - shift] + int(cert[j]), -1)
            better = value > new[shift:]
            new[shift:][better] = value[better]
            pick[shift:][better] = j
        best, offset = new, offset + cmin
        choice.append(pick)
    totals = base_nat + offset + np.arange(width)  # natural count of each DP state
    floor = (core_nat - tolerance - 1e-12) * rec.n
    feasible = (best >= 0) & (totals >= floor)
    if not feasible.any():
        return None
    top = best[feasible].max()
    state = int(np.flatnonzero(feasible & (best == top)).max())  # most certified, then most natural
    kappa = np.empty(k)
    for c in range(k - 1, -1, -1):  # back-track the choices
        j = int(choice[c][state])
        nat, cert = options[c]
        same = np.flatnonzero((nat == nat[j]) & (cert == cert[j]))
        kappa[c] = kappas[c][same[(len(same) - 1) // 2]]
        state -= int(nat[j]) - int(nat.min())
    return {"class_thresholds": kappa.tolist(), "certified_count": int(top)}
