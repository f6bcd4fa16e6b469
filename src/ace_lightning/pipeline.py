"""``make reproduce-cifar``: the paper's CIFAR-10 experiments, each one pipeline job
(``stage=pipeline``, the stages in order in one process, exactly what ``ace-train stage=pipeline
experiment=<name>`` runs), then the obtained numbers next to the paper's (docs/METHOD.md section 9)
in reproduce.json/.md. With SMOKE=1 (or --smoke) the same pipelines run with ``debug=smoke``.

    make reproduce-cifar [SMOKE=1] [ARGS="--only cifar10_acenet_ibp_2_255 -- data.data_dir=/data/cifar10"]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir

from ace_lightning.registry import run_stage
from ace_lightning.atomic import atomic_write_text
from ace_lightning.config import CONF_DIR
from ace_lightning.console import log, setup_console
from ace_lightning.errors import USER_ERRORS, CommandParser, fail_on

# (experiment, stages, the paper's numbers to print beside ours)
REPRODUCE = [
    ("cifar10_acenet_ibp_2_255", ["core", "cert", "gate", "certify"],
     "ACE paper headline (COLT cert-net, EfficientNet-B0 core), 2/255: 90.1 nat / 27.5 cert; "
     "IBP large net alone: 70.2 / 44.1", {"nat": 90.1, "cert": 27.5}),
    ("cifar10_aceentropy_ibp_2_255", ["core", "cert", "entropy", "certify"],
     "ACE paper headline, 2/255: 90.1 / 27.5 (entropy selection, C2 cert-net)", {"nat": 90.1, "cert": 27.5}),
    ("cifar10_acenet_ibp_8_255", ["core", "cert", "gate", "certify"],
     "IBP large net alone, 8/255: 49.5 / 31.6; CROWN-IBP: about 46 / 33.1", {"nat": 49.5, "cert": 31.6}),
    # today's cert-nets (docs/METHOD.md section 11): no ACE with them has been published; the
    # reference is the single CNN7 (CTBench, ICML'25), which the composition's curve must beat
    ("cifar10_acenet_sabr_2_255", ["core", "cert", "gate", "certify"],
     "SABR CNN7 alone, 2/255 (CTBench): 77.9 / 63.6", {"nat": 77.9, "cert": 63.6}),
    ("cifar10_acenet_mtlibp_2_255", ["core", "cert", "gate", "certify"],
     "MTL-IBP CNN7 alone, 2/255 (CTBench): 78.8 / 64.4", {"nat": 78.8, "cert": 64.4}),
    ("cifar10_acenet_sabr_8_255", ["core", "cert", "gate", "certify"],
     "IBP large net alone, 8/255: 49.5 / 31.6 (SABR's paper setting, lambda 0.7)", {"nat": 49.5, "cert": 31.6}),
    ("cifar10_acenet_mtlibp_8_255", ["core", "cert", "gate", "certify"],
     "IBP large net alone, 8/255: 49.5 / 31.6 (MTL-IBP's paper setting, alpha 0.5)", {"nat": 49.5, "cert": 31.6}),
]

SMOKE_OVERRIDES = ["debug=smoke"]  # conf/debug/smoke.yaml


def compose_pipeline(experiment: str, stages: Sequence[str], overrides: Sequence[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={experiment}", "stage=pipeline",
                                                       f"stage.stages=[{','.join(stages)}]", *overrides])


def run_pipeline(experiment: str, stages: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One pipeline job; returns {stage: manifest} (each with its stage's wall-clock seconds)."""
    log.info(f"{experiment}: stages {', '.join(stages)}")
    out = run_stage(compose_pipeline(experiment, stages, overrides))["stages"]
    for manifest in out.values():
        manifest["pipeline_wall_s"] = manifest.get("wall_s")
    return out


def _point(manifest: dict, key: str) -> dict:
    return (manifest.get("metrics") or {}).get(key) or {}


def reproduce(smoke: bool = False, runs_root: str | None = None, only: Sequence[str] | None = None,
              extra: Sequence[str] = ()) -> list[dict]:
    overrides = list(extra)
    if smoke:
        overrides += SMOKE_OVERRIDES
    if runs_root:
        overrides.append(f"runs_root={runs_root}")
    rows = []
    for experiment, stages, paper, expected in REPRODUCE:
        if only and experiment not in only:
            continue
        manifests = run_pipeline(experiment, stages, overrides)
        certify = manifests["certify"]
        row = {"experiment": experiment, "paper": paper, "expected_nat": expected["nat"],
               "expected_cert": expected["cert"], "smoke": smoke}
        for key in ("nat_within_1pt", "max_certified", "core_alone", "cert_alone"):
            p = _point(certify, key)
            row[key] = {k: p.get(k) for k in ("nat_acc", "cert_acc", "adv_acc", "cert_route_rate", "threshold")}
        row["wall_s"] = {s: m.get("pipeline_wall_s") for s, m in manifests.items()}
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    def pct(v):
        return f"{100 * v:5.1f}" if isinstance(v, (int, float)) else "  -  "

    lines = [f"{'experiment':32s} {'point':16s} {'nat':>6s} {'cert':>6s} {'adv':>6s}   paper (nat / cert)"]
    for r in rows:
        for key in ("core_alone", "cert_alone", "nat_within_1pt", "max_certified"):
            p = r[key]
            paper = f"   {r['expected_nat']:.1f} / {r['expected_cert']:.1f}" if key == "nat_within_1pt" else ""
            lines.append(f"{r['experiment']:32s} {key:16s} {pct(p.get('nat_acc'))} {pct(p.get('cert_acc'))} "
                         f"{pct(p.get('adv_acc'))}{paper}")
        lines.append(f"{'':32s} {r['paper']}")
    if rows and rows[0].get("smoke"):
        lines.append("SMOKE run: tiny subset, one epoch: the numbers only show that the pipeline runs.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser("ace_lightning.pipeline", __doc__)
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                        help="debug=smoke: a tiny subset, one epoch (default: on when SMOKE=1)")
    parser.add_argument("--runs-root", default=None, help="where the run folders and reproduce.json/.md go (runs)")
    parser.add_argument("--only", nargs="*", default=None, choices=[e for e, *_ in REPRODUCE], metavar="EXPERIMENT",
                        help="only these experiments: " + ", ".join(e for e, *_ in REPRODUCE))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.data_dir=/data/cifar10")
    args = parser.parse_args(argv)
    setup_console()
    try:
        rows = reproduce(args.smoke, args.runs_root, args.only, args.overrides)
    except USER_ERRORS as err:
        fail_on(err)
    table = format_rows(rows)
    print(table)  # the command's product
    root = Path(args.runs_root or "runs")
    atomic_write_text(root / "reproduce.json", json.dumps(rows, indent=2))
    atomic_write_text(root / "reproduce.md", "```\n" + table + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
