"""Threshold sweep of a composed ACE model from per-input certification records (ace-method 4.5).

The threshold T enters no bound, so one certify pass that stores per input the correctness and
certificates of core and cert-net plus the gate value g and its bounds [lb_g, ub_g] over the ball
gives the composition's natural and certified accuracy at *every* T analytically. Nothing here
evaluates a network. The records themselves: ace_lightning.records; thresholds chosen on val:
ace_lightning.operating.

Rule for one (cert-net, gate) pair at threshold T (ace-method 4.3):
  answer      cert-net iff g >= T, else core
  certified   (lb_g >= T and cert_ok) or (ub_g < T and core_ok) or (cert_ok and core_ok)
Cascades of n pairs (columns suffixed _1.._n, thresholds a tuple): the first pair with g_i >= T_i
answers, else the core. An input is certified when it is certifiably routed to a branch that is
certified (pair i: ub_g_k < T_k for all k < i and lb_g_i >= T_i; core: ub_g_k < T_k for all k), or
when every branch that may answer (pair i: lb_g_k < T_k for all k < i and ub_g_i >= T_i; core:
lb_g_k < T_k for all k) is certified. If contradictory bounds (lb_g > ub_g) leave no branch that
may answer, every branch must be certified; with this reading n = 1 is exactly the rule above.

Every per-input outcome depends on T only through the three comparisons g >= T, lb_g >= T,
ub_g >= T (ub_g < T is the negation of the last). All curves are therefore step functions that are
constant on each interval (s_k, s_k+1] between consecutive distinct values s of g, lb_g, ub_g,
and `sweep` counts them for all thresholds at once from sorted keys (no loop over T).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ace_lightning import rule
from ace_lightning.errors import ConfigError
from ace_lightning.records import Records, as_records

METRICS = ("nat_acc", "cert_acc", "cert_route_rate", "cert_route_certified_rate", "undecided_rate")
SWEEP_COLUMNS = ("threshold",) + METRICS
DEFAULT_GRID = 101

Threshold = Union[float, Sequence[float]]


# --------------------------------------------------------------------------- the rule


def _outcomes(rec: Records, fire_g: np.ndarray, fire_lb: np.ndarray, fire_ub: np.ndarray) -> dict[str, np.ndarray]:
    """Per-input outcomes given, per pair, g >= T, lb_g >= T and ub_g >= T as (n_pairs, N) bools
    (the sweep passes them forced to 0/1 for the swept pair): the rule of ace_lightning.rule, with
    each interval's validity (rule.decided) fixed by the records, not by T."""
    ok, bad = rec.decided, rec.poisoned
    fire_g = fire_g & ~np.isnan(rec.g)  # a NaN gate value never fires (the model's g >= T)
    nat = rec.core_correct.copy()
    none_fired = np.ones(rec.n, bool)  # no earlier gate fires at x
    for i in range(rec.n_pairs):
        nat = np.where(none_fired & fire_g[i], rec.cert_correct[i], nat)
        none_fired &= ~fire_g[i]
    sure, may = rule.surely_fires(ok, fire_lb), rule.may_fire(ok, fire_ub)
    _, _, sure_answer = rule.branch_outcomes(sure, may)
    route_cert = np.logical_or.reduce(sure_answer)
    route_core = ~np.logical_or.reduce(may)  # no pair may fire anywhere on the ball
    return {
        "nat_acc": nat,
        "cert_acc": rule.certified(sure, may, rec.cert_ok, rec.core_ok, bad),
        "cert_route_rate": ~none_fired,
        "cert_route_certified_rate": route_cert,
        "undecided_rate": ~(route_cert | route_core),
    }


def _threshold_vector(rec: Records, T: Threshold) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(T, dtype=np.float64))
    if arr.ndim != 1 or arr.shape[0] != rec.n_pairs:
        raise ConfigError(f"records hold {rec.n_pairs} (cert-net, gate) pair(s); got threshold {T!r}")
    if np.isnan(arr).any():
        raise ConfigError(f"threshold {T!r} is NaN")
    return arr


def evaluate(records: Union[Records, Mapping[str, Any]], T: Threshold,
             kappa: Optional[Sequence[Any]] = None) -> dict[str, Any]:
    """All rates of the composition at one threshold T (a tuple for cascades). ``kappa``: margin
    selection's class thresholds, one vector of K per pair (None for a pair without), with the
    records' cert_pred as each input's class (rule.per_input_thresholds)."""
    rec = as_records(records)
    t = _threshold_vector(rec, T)
    kap, cls = _class_thresholds(rec, kappa)
    with np.errstate(invalid="ignore"):
        t_g, t_lb, t_ub = rule.per_input_thresholds(t, rec.n, kap, cls, rec.lb_g)
        out = _outcomes(rec, rec.g >= t_g, rec.lb_g >= t_lb, rec.ub_g >= t_ub)
    row: dict[str, Any] = {"threshold": float(t[0]) if rec.n_pairs == 1 else tuple(float(v) for v in t)}
    row.update({name: int(np.count_nonzero(out[name])) / rec.n for name in METRICS})
    return row


def _class_thresholds(rec: Records, kappa: Optional[Sequence[Any]]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(kappa [n, K] with NaN rows for pairs without, classes [n, N]) or (None, None)."""
    if kappa is None:
        return None, None
    rows = [kappa] if rec.n_pairs == 1 and np.ndim(kappa[0] if len(kappa) else 0) == 0 else list(kappa)
    if len(rows) != rec.n_pairs:
        raise ConfigError(f"class thresholds: one vector (or None) per pair, {rec.n_pairs} pair(s), got {len(rows)}")
    k = max(len(r) for r in rows if r is not None)
    kap = np.stack([np.full(k, np.nan) if r is None else np.asarray(r, dtype=np.float64) for r in rows])
    missing = [rec.pair_column("cert_pred", i) for i in rec.pairs if rec.pair_column("cert_pred", i) not in rec]
    if missing:
        raise ConfigError(f"class thresholds need the records' {', '.join(missing)} column(s): re-run certify")
    cls = np.stack([np.asarray(rec[rec.pair_column("cert_pred", i)], dtype=np.int64) for i in rec.pairs])
    if cls.size and (cls.min() < 0 or cls.max() >= k):
        raise ConfigError(f"records hold classes outside 0..{k - 1}: {k} class thresholds are too few")
    return kap, cls


# --------------------------------------------------------------------------- the sweep


def _check_pair(rec: Records, pair: int, fixed: Threshold | None) -> np.ndarray:
    if not 1 <= pair <= rec.n_pairs:
        raise ConfigError(f"pair {pair} out of range: records hold {rec.n_pairs} pair(s)")
    if rec.n_pairs == 1:
        return np.zeros(1)
    if fixed is None:
        raise ConfigError(f"sweeping pair {pair} of a {rec.n_pairs}-pair cascade needs the other thresholds: fixed=(T_1, ..., T_{rec.n_pairs})")
    return _threshold_vector(rec, fixed)


def exact_thresholds(records: Union[Records, Mapping[str, Any]], pair: int = 1) -> np.ndarray:
    """Every threshold where a curve can change, ascending, with -inf (all cert-net) and +inf
    (all core) ends.

    The predicates are g >= T, lb_g >= T and ub_g < T, each constant on intervals (s, s'] between
    consecutive distinct values s < s' of g, lb_g, ub_g: the value at T = s' is the value on the
    whole interval (ub_g < T flips between ub_g and the next float above it, so T = ub_g still
    belongs to the interval below). Evaluating at every s plus +inf therefore yields every
    distinct value. Mixing conventions (g, lb_g and nextafter(ub_g)) would miss the piece between
    a g value and a larger ub value.
    """
    rec = as_records(records)
    if not 1 <= pair <= rec.n_pairs:
        raise ConfigError(f"pair {pair} out of range: records hold {rec.n_pairs} pair(s)")
    i = pair - 1
    values = np.concatenate([rec.g[i], rec.lb_g[i], rec.ub_g[i], [-np.inf, np.inf]])
    return np.unique(values[~np.isnan(values)])


def threshold_grid(records: Union[Records, Mapping[str, Any]], grid: int | Sequence[float] | None = None,
                   *, exact: bool = True, pair: int = 1) -> np.ndarray:
    """Thresholds to sweep, ascending: an int k gives k quantiles of g (even steps in routing rate,
    where a linspace would waste points on a gate concentrated near 0 or 1); a list is used as
    given. The -inf/+inf ends are always included so each curve reaches its reference points."""
    rec = as_records(records)
    if not 1 <= pair <= rec.n_pairs:
        raise ConfigError(f"pair {pair} out of range: records hold {rec.n_pairs} pair(s)")
    i = pair - 1
    if grid is None:
        grid = DEFAULT_GRID
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        if grid < 1:
            raise ConfigError("threshold grid is empty")
        g = rec.g[i][np.isfinite(rec.g[i])]
        points = np.quantile(g, np.linspace(0.0, 1.0, int(grid))) if g.size else np.empty(0)
    else:
        points = np.asarray(list(grid), dtype=np.float64).ravel()
        if points.size == 0:
            raise ConfigError("threshold grid is empty")
        if np.isnan(points).any():
            raise ConfigError("threshold grid contains NaN")
    parts = [points, [-np.inf, np.inf]]
    if exact:
        parts.append(exact_thresholds(rec, pair))
    return np.unique(np.concatenate(parts))


def sweep_arrays(records: Union[Records, Mapping[str, Any]], thresholds: Sequence[float] | np.ndarray,
                 *, pair: int = 1, fixed: Threshold | None = None) -> dict[str, np.ndarray]:
    """Rates at many thresholds of one pair (the others fixed), vectorised.

    Per input, each outcome is a 0/1 function F(a, b, c) of a = [g >= T], b = [lb_g >= T],
    c = [ub_g >= T]. Its Moebius expansion F = sum_S coef_S prod_{s in S} x_s turns each product
    into [min_{s in S} v_s >= T], so a count over inputs is a weighted count of keys >= T: one sort
    and one searchsorted per subset S (7), shared by all metrics; integer counts, exact.
    """
    rec = as_records(records)
    base = _check_pair(rec, pair, fixed)
    i = pair - 1
    T = np.asarray(thresholds, dtype=np.float64).ravel()
    if T.size == 0:
        raise ConfigError("threshold grid is empty")
    if np.isnan(T).any():
        raise ConfigError("threshold grid contains NaN")
    t = base[:, None]
    fire = [rec.g >= t, rec.lb_g >= t, rec.ub_g >= t]
    table = {name: np.empty((8, rec.n), np.int64) for name in METRICS}  # F[mask], bit0 g, bit1 lb, bit2 ub
    for mask in range(8):
        for bit, f in enumerate(fire):
            f[i] = bool(mask >> bit & 1)
        for name, value in _outcomes(rec, *fire).items():
            table[name][mask] = value
    values = (rec.g[i], rec.lb_g[i], rec.ub_g[i])
    counts = {name: np.full(T.shape, int(table[name][0].sum()), np.int64) for name in METRICS}
    for S in range(1, 8):
        coefs = {}
        for name in METRICS:
            coef = np.zeros(rec.n, np.int64)
            R = S
            while True:  # every subset R of S, sign (-1)^{|S| - |R|}
                coef += table[name][R] if bin(S ^ R).count("1") % 2 == 0 else -table[name][R]
                if R == 0:
                    break
                R = (R - 1) & S
            if coef.any():
                coefs[name] = coef
        if not coefs:
            continue
        key = np.minimum.reduce([values[b] for b in range(3) if S >> b & 1])
        key = np.where(np.isnan(key), np.inf, key)  # NaN rows have coefficient 0 (the rule ignores their bits)
        order = np.argsort(key, kind="stable")
        idx = np.searchsorted(key[order], T, side="left")  # first key >= T
        for name, coef in coefs.items():
            suffix = np.concatenate([np.cumsum(coef[order][::-1])[::-1], [0]])
            counts[name] += suffix[idx]
    out = {"threshold": T}
    out.update({name: counts[name] / rec.n for name in METRICS})
    return out


def sweep(records: Union[Records, Mapping[str, Any]], grid: int | Sequence[float] | None = None, *,
          exact: bool = True, pair: int = 1, fixed: Threshold | None = None) -> list[dict[str, float]]:
    """Rows (threshold + rates) over a grid of T, ascending (from all cert-net to all core).

    ``grid``: None (101 quantiles of g), an int, or explicit thresholds; with ``exact`` the exact
    thresholds are merged in, so the curve has every distinct value. For a cascade, ``pair``
    selects the swept threshold and ``fixed`` holds the full threshold tuple (entry ``pair``
    ignored).
    """
    rec = as_records(records)
    _check_pair(rec, pair, fixed)
    arrays = sweep_arrays(rec, threshold_grid(rec, grid, exact=exact, pair=pair), pair=pair, fixed=fixed)
    cols = [arrays[name].tolist() for name in SWEEP_COLUMNS]
    return [dict(zip(SWEEP_COLUMNS, values)) for values in zip(*cols)]


# --------------------------------------------------------------------------- chosen thresholds on test


def report_at(test_records: Union[Records, Mapping[str, Any]],
              thresholds: Sequence[Any] | Mapping[str, float], *, pair: int = 1,
              fixed: Threshold | None = None) -> list[dict[str, Any]]:
    """Evaluate chosen thresholds on the TEST records. ``thresholds``: floats, a mapping
    name -> T, or the points of `choose_operating_points`. For a cascade the swept pair's T is
    put into ``fixed``, or each point carries its whole threshold vector (a list)."""
    rec = as_records(test_records)
    vectors = not isinstance(thresholds, Mapping) and all(
        isinstance(t.get("threshold") if isinstance(t, Mapping) else t, (list, tuple)) for t in thresholds)
    base = None if vectors and fixed is None else _check_pair(rec, pair, fixed)  # whole vectors need no fixed
    if isinstance(thresholds, Mapping):
        items = [{"name": k, "threshold": v} for k, v in thresholds.items()]
    else:
        items = [dict(t) if isinstance(t, Mapping) else {"threshold": t} for t in thresholds]
    out = []
    for item in items:
        T = item["threshold"]
        if isinstance(T, (list, tuple)):  # a cascade's whole threshold vector
            full = tuple(float(t) for t in T)
        else:
            T = float(T)
            full = T if rec.n_pairs == 1 else tuple(np.where(np.arange(rec.n_pairs) == pair - 1, T, base).tolist())
        row = {k: v for k, v in item.items() if k in ("key", "name", "class_thresholds")}
        row.update(evaluate(rec, full, kappa=item.get("class_thresholds")))
        row["threshold"] = T
        out.append(row)
    return out


def reference_points(records: Union[Records, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Core alone and each cert-net alone: the networks by themselves, not the composition at an
    extreme T (at T = +inf an input with ub_g = +inf would still count as undecided)."""
    rec = as_records(records)
    rate = lambda a: int(np.count_nonzero(a)) / rec.n  # noqa: E731
    core = {"key": "core_alone", "name": "core alone", "threshold": math.inf,
            "nat_acc": rate(rec.core_correct), "cert_acc": rate(rec.core_ok),
            "cert_route_rate": 0.0, "cert_route_certified_rate": 0.0, "undecided_rate": 0.0}
    points = [core]
    for i in rec.pairs:
        suffix = f" {i}" if rec.n_pairs > 1 else ""
        p = {"key": f"cert_alone{suffix.replace(' ', '_')}", "name": f"cert-net{suffix} alone",
             "threshold": -math.inf if rec.n_pairs == 1 else None,
             "nat_acc": rate(rec.cert_correct[i - 1]), "cert_acc": rate(rec.cert_ok[i - 1]),
             "cert_route_rate": 1.0, "cert_route_certified_rate": 1.0, "undecided_rate": 0.0}
        points.append(p)
    return points
