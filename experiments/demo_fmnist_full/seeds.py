"""The longer demo (`experiment=demo_fmnist_full`) over seeds 0, 1, 2: the paper's gate against
margin selection on the same nets, mean +- sample standard deviation (test split). Writes seeds.md.

Each seeds/seed<n>/ holds copies of a run folder's certify_margin/table.txt (margin selection),
certify/table.txt (the gate) and compare/compare.md (the curves' mean certified accuracy). Seed 0
is the run every earlier table was measured on (runs/demo_fmnist/eps_0.1 until issue 25: its gate
table as recorded in README.md, its curve means in ../margin_fmnist/table.md, setup "demo");
seeds 1 and 2 were run on 2026-12-07 with the default torch threads, nothing else running, on
another machine than seed 0 (torch's CPU kernels: AVX512):

    ace-train -m stage=pipeline experiment=demo_fmnist_full seed=1,2
    ace-train -m stage=pipeline experiment=demo_fmnist_full seed=1,2 ++stage_overrides.certify.selection=gate
    python -m ace_lightning.cli action=compare 'runs=[runs/demo_fmnist_full/eps_0.1_seed1]' \
        out_dir=runs/demo_fmnist_full/eps_0.1_seed1/compare 'methods=[IBP,CROWN-IBP]'   # and seed 2

    python experiments/demo_fmnist_full/seeds.py
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
# (column, table file, row, values taken: natural / certified / adversarial)
ROWS = (("core", "certify_margin", "core alone", 1), ("cert-net", "certify_margin", "cert-net alone", 2),
        ("gate (the paper's), natural within 1 pt", "certify", "natural within 1 pt of core", 3),
        ("margin, one kappa, natural within 1 pt", "certify_margin", "natural within 1 pt of core", 3),
        ("margin, one kappa per class (exported)", "certify_margin", "per-class kappa, natural within 1 pt", 3))
CURVES = (("gate", re.compile(r"ACE IBP \[[^\]]*\]$")), ("margin, one kappa", re.compile(r", margin\], one T$")),
          ("margin, per class", re.compile(r", margin\], per-class kappa$")))


def table_row(path: Path, point: str) -> list[float]:
    """natural, certified, adversarial of ``point`` in a certify stage's table.txt."""
    for line in path.read_text().splitlines():
        if line.startswith(point + "  "):
            cells = line[len(point):].split()
            return [float(c) if c != "-" else float("nan") for c in cells[1:4]]
    raise ValueError(f"{path}: no row {point!r}")


def curve_means(seed: int) -> dict[str, float]:
    """Mean certified accuracy of each curve, from the most accurate certified net to the core."""
    if seed == 0:
        rows = [line.split("|")[1:4] for line in (HERE.parent / "margin_fmnist" / "table.md").read_text().splitlines()
                if line.startswith("| demo | ACE")]
        pairs = [(r[1].strip(), float(r[2])) for r in rows]
    else:
        md = (HERE / "seeds" / f"seed{seed}" / "compare" / "compare.md").read_text()
        pairs = [(m.group(1).strip(), float(m.group(2))) for m in re.finditer(r"^\| (ACE [^|]*) \| ([\d.]+) \|$", md, re.M)]
    return {name: value for name, pat in CURVES for curve, value in pairs if pat.search(curve)}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def main() -> str:
    per_seed = {s: {col: table_row(HERE / "seeds" / f"seed{s}" / folder / "table.txt", row)[:n]
                    for col, folder, row, n in ROWS} for s in SEEDS}
    curves = {s: curve_means(s) for s in SEEDS}
    head = ["seed", *(col for col, *_ in ROWS)]
    lines = ["Test split, thresholds chosen on val; natural / certified / adversarial. "
             "Mean +- sample standard deviation over seeds 0, 1, 2.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in SEEDS:
        lines.append(f"| {s} | " + " | ".join(" / ".join(f"{v:.2f}" for v in per_seed[s][col]) for col, *_ in ROWS) + " |")
    cells = []
    for col, _, _, n in ROWS:
        cells.append(" / ".join(mean_std([per_seed[s][col][k] for s in SEEDS]) for k in range(n)))
    lines.append("| mean +- std | " + " | ".join(cells) + " |")
    lines += ["", "Mean certified accuracy along each curve, from the most accurate certified single network "
              "to the core (`action=compare`):", "", "| seed | " + " | ".join(name for name, _ in CURVES) + " |",
              "|" + "---|" * (len(CURVES) + 1)]
    for s in SEEDS:
        lines.append(f"| {s} | " + " | ".join(f"{curves[s][name]:.2f}" for name, _ in CURVES) + " |")
    lines.append("| mean +- std | " + " | ".join(mean_std([curves[s][name] for s in SEEDS]) for name, _ in CURVES) + " |")
    text = "\n".join(lines) + "\n"
    (HERE / "seeds.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main())
