"""Threshold sweep of a composed ACE model from per-input certification records (ace-method 4.5).

The threshold T enters no bound, so one certify pass that stores per input the correctness and
certificates of core and cert-net plus the gate value g and its bounds [lb_g, ub_g] over the ball
gives the composition's natural and certified accuracy at *every* T analytically. Nothing here
evaluates a network.

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

import csv
import math
import os
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ace_lightning import rule
from ace_lightning.atomic import atomic_write, atomic_write_text
from ace_lightning.errors import ConfigError, InputNotFoundError

NO_RECORDS = "threshold sweep with no records: run certify first"
METRICS = ("nat_acc", "cert_acc", "cert_route_rate", "cert_route_certified_rate", "undecided_rate")
SWEEP_COLUMNS = ("threshold",) + METRICS
CORE_FLAGS = ("core_correct", "core_ok")
PAIR_FLAGS = ("cert_correct", "cert_ok")
PAIR_GATE = ("g", "lb_g", "ub_g")
DEFAULT_GRID = 101

Threshold = Union[float, Sequence[float]]


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _split_set(values: Iterable[str]) -> str:
    return "{" + ", ".join(repr(str(v)) for v in sorted(set(values))) + "}"


class Records:
    """Per-input certification records as numpy columns, validated once.

    Why a class: the sweep needs the flags as bool arrays and the gate columns as float arrays with
    the cascade pairs stacked, (n_pairs, N); every other column (index, split, label, preds,
    adv_*) is kept as given in ``columns`` for reports.
    """

    def __init__(self, columns: Mapping[str, Any], source: str = "records") -> None:
        cols = {str(k).strip(): np.asarray(v) for k, v in columns.items()}
        self.source = source
        if "g" in cols and "g_1" in cols:
            raise ConfigError(f"{source} mixes single-pair column 'g' with cascade column 'g_1'")
        n_pairs = 0
        while f"g_{n_pairs + 1}" in cols:
            n_pairs += 1
        self.n_pairs = n_pairs or 1
        self.suffixed = n_pairs > 0
        required = list(CORE_FLAGS) + [self.pair_column(name, i) for i in range(1, self.n_pairs + 1)
                                       for name in PAIR_FLAGS + PAIR_GATE]
        missing = [name for name in required if name not in cols]
        if missing:
            raise ConfigError(f"{source} lacks column(s) {', '.join(missing)}: certify writes them; re-run certify")
        flat = [name for name, arr in cols.items() if arr.ndim != 1]
        if flat:
            raise ConfigError(f"{source}: column(s) {', '.join(flat)} are not one value per input")
        lengths = {name: arr.shape[0] for name, arr in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"{source}: columns differ in length ({', '.join(f'{k}={v}' for k, v in lengths.items())})")
        self.n = next(iter(lengths.values()))
        if self.n == 0:
            raise ConfigError(NO_RECORDS)
        self.columns = cols
        self.core_correct = _flags(cols, "core_correct")
        self.core_ok = _flags(cols, "core_ok")
        pc = self.pair_column
        self.cert_correct = np.stack([_flags(cols, pc("cert_correct", i)) for i in self.pairs])
        self.cert_ok = np.stack([_flags(cols, pc("cert_ok", i)) for i in self.pairs])
        self.g = np.stack([_numbers(cols, pc("g", i)) for i in self.pairs])
        self.lb_g = np.stack([_numbers(cols, pc("lb_g", i)) for i in self.pairs])
        self.ub_g = np.stack([_numbers(cols, pc("ub_g", i)) for i in self.pairs])
        self.selection = [str(cols[pc("selection", i)][0]) if pc("selection", i) in cols else None
                          for i in self.pairs]  # gate | entropy | margin (None: not recorded)
        self.decided = rule.decided(self.g, self.lb_g, self.ub_g)  # per pair: the interval is usable
        self.poisoned = rule.poisoned(self.g, self.lb_g, self.ub_g)  # a NaN: never certified

    @property
    def pairs(self) -> range:
        return range(1, self.n_pairs + 1)

    def pair_column(self, name: str, i: int) -> str:
        """'cert_ok' for single-pair records, 'cert_ok_2' for pair 2 of a cascade."""
        return f"{name}_{i}" if self.suffixed else name

    def __len__(self) -> int:
        return self.n

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def splits(self) -> set[str]:
        return set(np.unique(self.columns["split"]).astype(str)) if "split" in self.columns else set()

    def select(self, mask: np.ndarray) -> "Records":
        return Records({k: v[mask] for k, v in self.columns.items()}, source=self.source)

    def split(self, name: str) -> "Records":
        """The records of one split; a one-line error when the file holds other splits only."""
        if "split" not in self.columns:
            raise ConfigError(f"{self.source} has no 'split' column, asked for {name!r}")
        mask = self.columns["split"].astype(str) == name
        if not mask.any():
            raise ConfigError(f"records hold split(s) {_split_set(self.splits)}, asked for {name!r}")
        return self.select(mask)


def _flags(cols: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """0/1 column as bool; accepts ints, floats 0.0/1.0, bools and 'true'/'false' strings."""
    arr = cols[name]
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "USO":
        low = np.char.lower(np.char.strip(arr.astype(str)))
        arr = np.where(low == "true", "1", np.where(low == "false", "0", low))
        try:
            arr = arr.astype(np.float64)
        except ValueError:
            bad = next(v for v in arr if v not in ("0", "1") and not _is_number(v))
            raise ConfigError(f"column {name}: value {bad!r} is not 0/1") from None
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"column {name}: value {arr[i].item()!r} at row {i} is not 0/1")
    return arr.astype(bool)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numbers(cols: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Gate value or bound as float64. NaN and +-inf are accepted: the rule treats such an
    interval as undecided (and a NaN as never certified), see ace_lightning.rule."""
    try:
        return cols[name].astype(np.float64)
    except ValueError:
        bad = next(v for v in cols[name] if not _is_number(str(v)))
        raise ConfigError(f"column {name}: value {str(bad)!r} is not a number") from None


def _parse_column(values: Sequence[str]) -> np.ndarray:
    """CSV text -> int, then float, else str array (ids and labels stay ints, split stays text)."""
    arr = np.asarray(values, dtype=str)
    for dtype in (np.int64, np.float64):
        try:
            return arr.astype(dtype)
        except (ValueError, OverflowError):
            continue
    return arr


def as_records(records: Union[Records, Mapping[str, Any], str, os.PathLike]) -> Records:
    """Accept Records, a mapping of columns, or a path (loaded with `load_records`)."""
    if isinstance(records, Records):
        return records
    if isinstance(records, (str, os.PathLike)):
        return load_records(records)
    return Records(records)


def load_records(path: Union[str, os.PathLike], split: str | None = None) -> Records:
    """Records from the certify stage's CSV (or Parquet when pyarrow is importable)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"records file not found: {path} (run certify first)")
    if path.endswith(".parquet"):
        table = _parquet("reading", path).read_table(path)
        columns = {name: np.asarray(table.column(name).to_numpy()) for name in table.column_names}
        if table.num_rows == 0:
            raise ConfigError(NO_RECORDS)
    else:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: tolerate a BOM
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [row for row in reader if row]
        if not header or not rows:
            raise ConfigError(NO_RECORDS)
        for k, row in enumerate(rows, start=2):
            if len(row) != len(header):
                raise ConfigError(f"{path}: line {k} has {len(row)} fields, the header has {len(header)}")
        columns = {name.strip(): _parse_column(col) for name, col in zip(header, zip(*rows))}
        if "split" in columns:
            columns["split"] = columns["split"].astype(str)
    records = Records(columns, source=path)
    return records.split(split) if split is not None else records


def parquet_available() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _parquet(verb: str, path: str):
    """pyarrow.parquet, or the one-line error saying how to get it."""
    if not parquet_available():
        raise ConfigError(f"{verb} {path} needs pyarrow (pip install pyarrow), or use CSV records")
    import pyarrow.parquet as pq

    return pq


def save_records(records: Union[Records, Mapping[str, Any]], path: Union[str, os.PathLike]) -> str:
    """Write records atomically: CSV (floats with repr, so every value reads back bit-exact), or
    Parquet when ``path`` ends in .parquet (needs pyarrow)."""
    cols = records.columns if isinstance(records, Records) else {k: np.asarray(v) for k, v in records.items()}
    names = list(cols)
    if os.fspath(path).endswith(".parquet"):
        pq = _parquet("writing", os.fspath(path))
        import pyarrow as pa

        table = pa.table({n: np.asarray(cols[n]) for n in names})
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def text(v: Any) -> str:
        if isinstance(v, (bool, np.bool_)):
            return str(int(v))
        if isinstance(v, (float, np.floating)):
            return repr(float(v))
        return str(v)
    def write(fh) -> None:
        writer = csv.writer(fh)
        writer.writerow(names)
        writer.writerows([text(v) for v in row] for row in zip(*(cols[n].tolist() for n in names)))
    return atomic_write_text(path, write)


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


def sweep_cost(records: Union[Records, Mapping[str, Any]], repeats: int = 5) -> float:
    """Seconds for one exact sweep (best of ``repeats``), for benchmarks; not a test criterion."""
    rec = as_records(records)
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        sweep(rec, exact=True)
        best = min(best, time.perf_counter() - start)
    return best


def synthetic_records(n: int, *, n_pairs: int = 1, seed: int = 0, sound: bool = True,
                      decimals: int | None = 2, splits: Sequence[str] = ("val", "test")) -> dict[str, np.ndarray]:
    """Random records for tests and benchmarks. ``sound`` makes them consistent with a real
    certifier (cert_ok => cert_correct, core_ok => core_correct, lb_g <= g <= ub_g); ``decimals``
    rounds the gate columns so that ties, including ties with T, are frequent."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {
        "index": np.arange(n),
        "split": np.asarray(splits)[rng.integers(0, len(splits), n)],
        "label": rng.integers(0, 10, n),
    }
    core_correct = rng.random(n) < 0.9
    core_ok = core_correct & (rng.random(n) < 0.1) if sound else rng.random(n) < 0.1
    cols["core_pred"] = np.where(core_correct, cols["label"], (cols["label"] + 1) % 10)
    cols["core_correct"], cols["core_ok"] = core_correct.astype(int), core_ok.astype(int)
    for i in range(1, n_pairs + 1):
        sfx = f"_{i}" if n_pairs > 1 else ""
        cert_correct = rng.random(n) < 0.7
        cert_ok = cert_correct & (rng.random(n) < 0.75) if sound else rng.random(n) < 0.5
        g = np.where(cert_ok, rng.normal(1.0, 1.0, n), rng.normal(-1.0, 1.0, n))
        w1, w2 = rng.exponential(0.5, n), rng.exponential(0.5, n)
        lb, ub = (g - w1, g + w2) if sound else (g + rng.normal(0, 0.5, n), g + rng.normal(0, 0.5, n))
        if decimals is not None:
            g, lb, ub = np.round(g, decimals), np.floor(lb * 10**decimals) / 10**decimals, np.ceil(ub * 10**decimals) / 10**decimals
            if not sound:
                lb, ub = np.round(lb, decimals), np.round(ub, decimals)
        cols["cert_pred" + sfx] = np.where(cert_correct, cols["label"], (cols["label"] + 2) % 10)
        cols["cert_correct" + sfx], cols["cert_ok" + sfx] = cert_correct.astype(int), cert_ok.astype(int)
        cols["g" + sfx], cols["lb_g" + sfx], cols["ub_g" + sfx] = g, lb, ub
    return cols


# --------------------------------------------------------------------------- operating points

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


def adversarial_accuracy(records: Records, T: Threshold) -> float | None:
    """Composed adversarial accuracy at T, only when the records carry it for exactly that T
    (columns adv_correct and adv_threshold): an attack result at another T says nothing here."""
    if "adv_correct" not in records or "adv_threshold" not in records or records.n_pairs != 1:
        return None
    at = np.unique(np.asarray(records["adv_threshold"], dtype=np.float64))
    if at.size != 1 or at[0] != float(np.asarray(T, dtype=np.float64).ravel()[0]):
        return None
    return int(np.count_nonzero(_flags(records.columns, "adv_correct"))) / records.n


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
        adv = adversarial_accuracy(rec, full)
        if adv is not None:
            row["adv_acc"] = adv
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
    if "adv_correct_core" in rec:
        core["adv_acc"] = rate(_flags(rec.columns, "adv_correct_core"))
    points = [core]
    for i in rec.pairs:
        suffix = f" {i}" if rec.n_pairs > 1 else ""
        p = {"key": f"cert_alone{suffix.replace(' ', '_')}", "name": f"cert-net{suffix} alone",
             "threshold": -math.inf if rec.n_pairs == 1 else None,
             "nat_acc": rate(rec.cert_correct[i - 1]), "cert_acc": rate(rec.cert_ok[i - 1]),
             "cert_route_rate": 1.0, "cert_route_certified_rate": 1.0, "undecided_rate": 0.0}
        adv_col = rec.pair_column("adv_correct_cert", i)
        if adv_col in rec:
            p["adv_acc"] = rate(_flags(rec.columns, adv_col))
        points.append(p)
    return points
