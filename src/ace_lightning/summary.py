"""One table across every certified run under a runs root (Hydra sweeps over datasets and
epsilons produce one run folder per combination): summary.csv and summary.md, rewritten
atomically after each certify stage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ace_lightning.atomic import atomic_write_text

COLUMNS = ("run", "data", "eps", "selection", "point", "threshold", "nat_acc", "cert_acc", "adv_acc",
           "cert_route_rate")


def collect(runs_root: Path) -> list[dict[str, Any]]:
    rows = []
    for manifest in sorted(Path(runs_root).glob("**/certify*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("status") != "complete":
            continue
        run = str(manifest.parent.parent.relative_to(runs_root))
        data = m.get("config", {}).get("spec", {}).get("data", {}).get("name", "")
        for key, metrics in (m.get("metrics") or {}).items():
            rows.append({"run": run, "data": data, "eps": m.get("eps"), "selection": m.get("selection"),
                         "point": key, **{c: metrics.get(c) for c in COLUMNS[5:]}})
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(runs_root: Path) -> list[dict[str, Any]]:
    runs_root = Path(runs_root)
    rows = collect(runs_root)
    if not rows:
        return rows
    csv_lines = [",".join(COLUMNS)] + [",".join(_fmt(r.get(c)) for c in COLUMNS) for r in rows]
    atomic_write_text(runs_root / "summary.csv", "\n".join(csv_lines) + "\n")
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append(f"{100 * v:.1f}%" if c.endswith(("_acc", "_rate")) and isinstance(v, float) else _fmt(v))
        md.append("| " + " | ".join(cells) + " |")
    atomic_write_text(runs_root / "summary.md", "\n".join(md) + "\n")
    return rows


def stage_times(run_dir: Path) -> dict[str, float]:
    """Wall-clock seconds of each completed stage of one run folder (from the manifests)."""
    out = {}
    for manifest in sorted(Path(run_dir).glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("status") == "complete" and "wall_s" in m:
            out[manifest.parent.name] = float(m["wall_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m ace_lightning.summary [--no-table] RUN_DIR``: the certify table and the stage
    times. The table and the times are this command's product, so they are printed (stdout), not
    logged; ``--no-table`` leaves the table out, for a caller whose certify stage just printed it
    (``make demo``)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    with_table = "--no-table" not in args
    args = [a for a in args if a != "--no-table"]
    if len(args) != 1:
        print("usage: python -m ace_lightning.summary [--no-table] RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    table = run_dir / "certify" / "table.txt"
    if not table.is_file():
        print(f"error: {table} not found: run the certify stage first", file=sys.stderr)
        return 2
    if with_table:
        print(table.read_text().rstrip() + "\n")
    times = stage_times(run_dir)
    print("wall-clock per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) +
          f"; total {sum(times.values()) / 60:.1f} min")
    print(f"Pareto plot: {run_dir / 'certify' / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
