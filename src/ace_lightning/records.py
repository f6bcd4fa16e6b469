"""The certify stage's records: one row per input, the columns that describe it, and their files.

Why a module of its own: the certify stage writes records, the sweep, the report, the audit and
the CLI read them; the layout (column names, the ``_i`` suffix of a cascade's pair columns, method
codes) and the file formats live here once, so writer and readers cannot drift apart.

A row (docs/METHOD.md section 4.5): index, split, label; core_pred, core_correct, core_ok; per pair
(suffixed ``_1.._n`` for a cascade of n > 1 pairs, unsuffixed for one pair) cert_pred,
cert_correct, cert_ok, cert_margin, cert_method, gate_method, selection, g, lb_g, ub_g; rechecked,
recheck_flipped (float64 decided / changed a decision) and dtype (the arithmetic that decided).
Flags are 0/1; methods are names (``METHODS`` codes while in tensors, -1: none).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from ace_lightning import rule
from ace_lightning.atomic import atomic_write, atomic_write_text
from ace_lightning.errors import ConfigError, InputNotFoundError

NO_RECORDS = "threshold sweep with no records: run certify first"
CORE_FLAGS = ("core_correct", "core_ok")
PAIR_FLAGS = ("cert_correct", "cert_ok")
PAIR_GATE = ("g", "lb_g", "ub_g")


def pair_suffix(i: int, n_pairs: int) -> str:
    """The column suffix of pair ``i`` (1-based): '' for single-pair records, '_i' in a cascade."""
    return "" if n_pairs == 1 else f"_{i}"


def pair_suffixes(n_pairs: int) -> list[str]:
    """Every pair's column suffix, in pair order."""
    return [pair_suffix(i, n_pairs) for i in range(1, n_pairs + 1)]


# Method codes: the bound layer's import is deferred, so reading records (the sweep, the CLI's
# action=sweep) needs numpy only.

def method_codes() -> dict[str, int]:
    """Method name -> its code in certify_batch's tensors: the index into bounds.METHODS, so codes
    order the methods cheap to tight."""
    from ace_lightning.bounds import METHODS

    return {name: k for k, name in enumerate(METHODS)}


def method_name(code: int) -> str:
    """The name a code stands for in the records ('none': ladder.NO_METHOD, no method)."""
    from ace_lightning.bounds import METHODS
    from ace_lightning.bounds.ladder import NO_METHOD

    return "none" if int(code) == NO_METHOD else METHODS[int(code)]


def split_set(values: Iterable[str]) -> str:
    return "{" + ", ".join(repr(str(v)) for v in sorted(set(values))) + "}"


class Records:
    """Per-input certification records as numpy columns, validated once.

    Why a class: the sweep needs the flags as bool arrays and the gate columns as float arrays with
    the cascade pairs stacked, (n_pairs, N); every other column (index, split, label,
    preds, methods, ...) is kept as given in ``columns`` for reports.
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
            raise ConfigError(f"records hold split(s) {split_set(self.splits)}, asked for {name!r}")
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


def record_columns(merged: Mapping[str, Any], split_names: Sequence[str],
                   selections: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Tensors of certify_batch -> record columns: method codes as names, the deciding dtype
    (float64 where the pass was float64 or the input was re-checked), flags as 0/1, and each
    pair's selection kind (``selections``: the sweep reads margin selection's class thresholds
    from it)."""
    import torch

    cols = {k: v.numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in merged.items()}
    n = len(next(iter(cols.values())))
    for i, kind in enumerate(selections):
        cols["selection" + pair_suffix(i + 1, len(selections))] = np.full(n, kind)
    if "split" in cols and cols["split"].dtype.kind in "iu":
        cols["split"] = np.array([split_names[int(s)] for s in cols["split"]])
    for k in [k for k in cols if k.startswith(("cert_method", "gate_method"))]:
        cols[k] = np.array([method_name(c) for c in cols[k]])
    wide = cols.pop("float64").astype(bool) | cols["rechecked"].astype(bool)
    cols["dtype"] = np.where(wide, "float64", "float32")
    for k, v in list(cols.items()):
        if v.dtype == np.bool_:
            cols[k] = v.astype(np.int64)
    return cols


def write_records(cols: Mapping[str, np.ndarray], stage_dir: Path) -> Path:
    """records.csv, and records.parquet when pyarrow is installed (never a stale one beside it)."""
    records_path = Path(stage_dir) / "records.csv"
    save_records(cols, records_path)
    parquet = Path(stage_dir) / "records.parquet"
    if parquet_available():  # the same records for pandas/polars/duckdb users
        save_records(cols, parquet)
    else:
        parquet.unlink(missing_ok=True)
    return records_path
