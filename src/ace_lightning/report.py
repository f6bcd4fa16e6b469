"""Sweep outputs a user reads: the val and test curves (CSV), operating points chosen on val and
evaluated on test (JSON), the natural-vs-certified Pareto plot (PNG) and a table for stdout.

Everything is computed from the certify stage's records (ace_lightning.records) by the sweep and
the operating points chosen on val (ace_lightning.sweep, ace_lightning.operating); files are
written atomically (temp file + os.replace) so a crashed run never leaves a half-written file.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping, Sequence, Union

import numpy as np

from ace_lightning.atomic import atomic_write, atomic_write_text
from ace_lightning.operating import (
    OPERATING_POINTS,
    cascade_curve,
    choose_cascade_thresholds,
    choose_operating_points,
    class_threshold_curve,
    class_threshold_point,
)
from ace_lightning.records import Records, as_records, split_set
from ace_lightning.sweep import METRICS, SWEEP_COLUMNS, Threshold, evaluate, reference_points, report_at, sweep
from ace_lightning.errors import ConfigError

SWEEP_FILES = {"val": "sweep_val.csv", "test": "sweep_test.csv"}
PER_CLASS_FILES = {"val": "sweep_val_per_class.csv", "test": "sweep_test_per_class.csv"}  # margin selection
POINTS_FILE = "operating_points.json"
PLOT_FILE = "pareto.png"
PLOT_SIZE = (8.0, 6.0)  # inches
PLOT_DPI = 100  # -> 800 x 600 pixels; no bbox_inches="tight", so the size is fixed

# (key, header, shown as percent) of the table's leading columns; other numeric keys follow.
TABLE_COLUMNS = (("nat_acc", "natural", True), ("cert_acc", "certified", True),
                 ("adv_acc", "adversarial", True), ("cert_route_rate", "routed", True))
TABLE_HIDDEN = {"key", "name", "threshold", "cert_route_certified_rate", "undecided_rate", "val", "test"}


def _json_value(value: Any) -> Any:
    """Strict JSON: +-inf thresholds become the strings 'inf' / '-inf'."""
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_sweep_csv(path: str, rows: Sequence[Mapping[str, float]]) -> str:
    def write(fh) -> None:
        fh.write(",".join(SWEEP_COLUMNS) + "\n")
        for row in rows:
            fh.write(",".join(repr(float(row[c])) for c in SWEEP_COLUMNS) + "\n")
    return atomic_write_text(path, write)


def _fmt_threshold(T: Any, per_class: bool = False) -> str:
    if per_class:
        return "per-class"
    if T is None:
        return "-"
    if isinstance(T, (tuple, list)):
        return "(" + ", ".join(_fmt_threshold(t) for t in T) + ")"
    T = float(T)
    if math.isinf(T):
        return "+inf" if T > 0 else "-inf"
    return f"{T:.4g}"


def format_table(points: Sequence[Mapping[str, Any]], title: str | None = None) -> str:
    """Fixed-width table, one row per point: natural, certified, adversarial (only when some point
    has it), routing rate to the cert-net(s), then any other numeric per-point metric (in percent
    when its name says acc, correct or rate)."""
    keys = [k for k, _, _ in TABLE_COLUMNS if k != "adv_acc" or any("adv_acc" in p for p in points)]
    extra: list[str] = []
    for p in points:
        for k, v in p.items():
            if (k not in TABLE_HIDDEN and k not in keys and k not in extra
                    and isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)):
                extra.append(k)
    headers = {k: h for k, h, _ in TABLE_COLUMNS}
    percent = ({k for k, _, pct in TABLE_COLUMNS if pct}
               | {k for k in extra if any(word in k for word in ("acc", "correct", "rate"))})

    def cell(p: Mapping[str, Any], k: str) -> str:
        v = p.get(k)
        if v is None:
            return "-"
        return f"{100 * float(v):.2f}" if k in percent else f"{float(v):.4g}"

    cols = ["point", "T"] + [headers.get(k, k) for k in keys + extra]
    body = [[str(p.get("name", p.get("key", ""))), _fmt_threshold(p.get("threshold"), p.get("class_thresholds") is not None)]
            + [cell(p, k) for k in keys + extra] for p in points]
    widths = [max(len(r[j]) for r in [cols] + body) for j in range(len(cols))]
    line = lambda r: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [title] if title else []
    out += [line(cols), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    return "\n".join(out)


def _annotated_rows(rows: Sequence[Mapping[str, float]], k: int = 4) -> list[Mapping[str, float]]:
    """A handful of curve points (routing rates near 1/(k+1) .. k/(k+1)) to label with their T."""
    finite = [r for r in rows if math.isfinite(r["threshold"])]
    picked: list[Mapping[str, float]] = []
    for target in np.linspace(0, 1, k + 2)[1:-1]:
        if finite:
            best = min(finite, key=lambda r: abs(r["cert_route_rate"] - target))
            if best not in picked:
                picked.append(best)
    return picked


def plot_pareto(path: str, rows_test: Sequence[Mapping[str, float]] | None,
                rows_val: Sequence[Mapping[str, float]] | None,
                references: Sequence[Mapping[str, Any]], points: Sequence[Mapping[str, Any]],
                extra: Sequence[tuple[str, Sequence[Mapping[str, float]]]] = ()) -> str:
    """Natural (x) vs certified (y) accuracy over T: test curve solid, val curve dashed, core
    alone and cert-net alone as distinct markers, operating points and a few curve points labelled
    with their T; ``extra`` curves (label, rows) dotted (margin selection's per-class curve). Uses
    the Agg canvas directly, so no global matplotlib backend is changed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pct = lambda rows, k: [100 * r[k] for r in rows]  # noqa: E731
    if rows_test:
        ax.plot(pct(rows_test, "nat_acc"), pct(rows_test, "cert_acc"), "-", color="C0", lw=1.5, label="ACE over T (test)")
    if rows_val:
        ax.plot(pct(rows_val, "nat_acc"), pct(rows_val, "cert_acc"), "--", color="C1", lw=1.0, label="ACE over T (val)")
    for j, (label, rows) in enumerate(extra):
        ax.plot(pct(rows, "nat_acc"), pct(rows, "cert_acc"), ":", color=f"C{8 + j}", lw=1.8, label=label)
    markers = iter(["s", "^", "v", "D", "P", "X"])
    for ref in references:
        ax.plot(100 * ref["nat_acc"], 100 * ref["cert_acc"], next(markers, "o"), ms=9, mec="black",
                label=ref["name"], zorder=5)
    curve = rows_test or rows_val or []
    for r in _annotated_rows(curve):
        ax.plot(100 * r["nat_acc"], 100 * r["cert_acc"], ".", color="gray", zorder=4)
        ax.annotate(f"T={_fmt_threshold(r['threshold'])}", (100 * r["nat_acc"], 100 * r["cert_acc"]),
                    textcoords="offset points", xytext=(6, -10), fontsize=7, color="gray")
    offsets = [(8, 8), (8, -16), (-50, 8), (-50, -16), (8, 20)]
    for j, p in enumerate(points):
        t = _fmt_threshold(p["threshold"], p.get("class_thresholds") is not None)
        ax.plot(100 * p["nat_acc"], 100 * p["cert_acc"], "*", ms=13, color=f"C{j + 2}", mec="black", zorder=6,
                label=f"{p['name']} (T={t})")
        ax.annotate(f"T={t}", (100 * p["nat_acc"], 100 * p["cert_acc"]),
                    textcoords="offset points", xytext=offsets[j % len(offsets)], fontsize=8)
    return save_pareto_axes(fig, ax, "ACE: natural vs certified accuracy over the gate threshold T", path)


def save_pareto_axes(fig, ax, title: str, path) -> str:
    """Label a natural-vs-certified accuracy plot and write it atomically as PNG."""
    ax.set_xlabel("natural accuracy (%)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return atomic_write(str(path), lambda tmp: fig.savefig(tmp, format="png", dpi=PLOT_DPI))


def write_sweep_outputs(records_path_or_records: Union[str, os.PathLike, Records, Mapping[str, Any]],
                        out_dir: Union[str, os.PathLike], grid: int | Sequence[float] | None = None, *,
                        exact: bool = True, pair: int = 1, fixed: Threshold | None = None,
                        tolerance: float = 0.01) -> dict[str, Any]:
    """Write sweep_val.csv, sweep_test.csv, operating_points.json and pareto.png into ``out_dir``.

    Operating points are chosen on the val curve and evaluated on the test records; both curves
    are written so the gap between them is visible. Without val records no point is chosen (a
    warning says why); a split that is absent gets no CSV (a stale one is removed).
    Returns the written paths and ``points``: reference and operating points with their test
    numbers (val numbers when there are no test records), ready for `format_table`.
    """
    rec = as_records(records_path_or_records)
    if "split" not in rec:
        raise ConfigError("records have no 'split' column: certify must mark each input 'val' or 'test'")
    parts = {name: rec.split(name) for name in ("val", "test") if name in rec.splits}
    if not parts:
        raise ConfigError(f"records hold split(s) {split_set(rec.splits)}, need 'val' and/or 'test'")
    rows: dict[str, list[dict[str, float]]] = {}
    cascade = rec.n_pairs > 1 and fixed is None  # the cascade's front, threshold vectors chosen on val
    if cascade:
        if "val" not in parts:
            raise ConfigError("a cascade's thresholds are chosen on val: the records need the val split")
        rows = cascade_curve(parts["val"], parts.get("test"))
    else:
        for name in parts:  # every sweep before the first file is touched: a bad grid loses nothing
            rows[name] = sweep(parts[name], grid, exact=exact, pair=pair, fixed=fixed)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, Any] = {}
    for name, filename in SWEEP_FILES.items():
        path = os.path.join(out_dir, filename)
        if name in rows:
            written[f"sweep_{name}"] = _write_sweep_csv(path, rows[name])
        elif os.path.exists(path):
            os.unlink(path)
    class_curve = class_threshold_curve(parts["val"], parts.get("test")) if "val" in parts else {}
    for name, filename in PER_CLASS_FILES.items():  # margin selection: kappa per class, chosen on val
        path = os.path.join(out_dir, filename)
        if class_curve.get(name):
            written[f"sweep_{name}_per_class"] = _write_sweep_csv(path, class_curve[name])
        elif os.path.exists(path):
            os.unlink(path)

    val, test = parts.get("val"), parts.get("test")
    core_nat_val = float(np.mean(val.core_correct)) if val is not None else None
    chosen: list[dict[str, Any]] = []
    if val is not None and cascade:
        for (key, name), floor in zip(OPERATING_POINTS[:2], (core_nat_val - tolerance, -math.inf)):
            T = choose_cascade_thresholds(val, floor)
            if T is not None:
                ev = evaluate(val, T)
                chosen.append({"key": key, "name": name, "threshold": list(T), "val": {m: ev[m] for m in METRICS}})
    elif val is not None:
        chosen = choose_operating_points(rows["val"], core_nat_val, tolerance)
        per_class = class_threshold_point(val, core_nat_val, tolerance)
        if per_class is not None:  # margin selection: one kappa per class, chosen exactly on val
            chosen.append(per_class)
    else:
        warnings.warn("no 'val' records: operating points are not chosen (choosing them on test would "
                      "inflate the numbers); certify the validation split to get them", stacklevel=2)
    if test is not None:
        for point, ev in zip(chosen, report_at(test, chosen, pair=pair, fixed=fixed)):
            point["test"] = {k: v for k, v in ev.items() if k not in ("key", "name", "threshold", "class_thresholds")}

    refs = {name: reference_points(part) for name, part in parts.items()}
    references = []
    for j, ref in enumerate(next(iter(refs.values()))):
        entry = {"key": ref["key"], "name": ref["name"], "threshold": ref["threshold"]}
        for name in parts:
            entry[name] = {k: v for k, v in refs[name][j].items() if k not in ("key", "name", "threshold")}
        references.append(entry)

    summary = {
        "note": "operating points are chosen on the val curve and evaluated on test records; "
                "choosing on test would inflate the numbers",
        "records": rec.source,
        "n_val": len(val) if val is not None else 0,
        "n_test": len(test) if test is not None else 0,
        "n_pairs": rec.n_pairs,
        "swept_pair": pair,
        "fixed_thresholds": None if fixed is None else list(np.atleast_1d(np.asarray(fixed, float))),
        "tolerance": tolerance,
        "core_nat_val": core_nat_val,
        "reference_points": references,
        "operating_points": chosen,
    }
    points_path = os.path.join(out_dir, POINTS_FILE)
    written["operating_points"] = atomic_write_text(
        points_path, lambda fh: json.dump(_json_value(summary), fh, indent=2, allow_nan=False))

    shown = "test" if test is not None else "val"
    table_refs = [dict(key=r["key"], name=r["name"], threshold=r["threshold"], **r[shown]) for r in references]
    table_points = [dict(key=p["key"], name=p["name"], threshold=p["threshold"], **p.get(shown, p["val"]),
                         **({"class_thresholds": p["class_thresholds"]} if "class_thresholds" in p else {}))
                    for p in chosen]
    extra = [(f"per-class kappa, chosen on val ({shown})", class_curve[shown])] if class_curve.get(shown) else []
    written["pareto"] = plot_pareto(os.path.join(out_dir, PLOT_FILE), rows.get("test"), rows.get("val"),
                                    table_refs, table_points, extra)
    written["points"] = table_refs + table_points
    written["shown_split"] = shown
    return written

