"""One table across every certified run under a runs root (Hydra sweeps over datasets and
epsilons produce one run folder per combination): summary.csv and summary.md, rewritten
atomically after each certify stage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ace_lightning.stages.common import atomic_write_text

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
