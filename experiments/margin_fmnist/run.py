"""Margin selection against the trained gate on Fashion-MNIST (issue "a selection whose
certificate is free"): the same core and cert-net composed with each selection, certified the
same way, compared on one plot (action=compare) with one number per curve (mean certified
accuracy from the most accurate certified single network up to the core).

    python experiments/margin_fmnist/run.py demo        # eps 0.1, the demo's nets: gate vs margin
    python experiments/margin_fmnist/run.py cotrained   # eps 0.1, a cert-net co-trained for selection
    python experiments/margin_fmnist/run.py mtl003      # eps 0.03, MTL-IBP alpha 0.1, 24 epochs
    python experiments/margin_fmnist/run.py cascade     # eps 0.1, an MTL-IBP net before the demo's IBP net
    python experiments/margin_fmnist/run.py --table-only

Run folders under runs/margin/<name>/eps_<eps>/ (the core is copied from the demo's run folder:
it is trained naturally, eps plays no part); results/<name>.json and table.md here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEMO = ROOT / "runs" / "demo_fmnist_full" / "eps_0.1"
EPOCHS_24 = ["stage_overrides.cert.epochs=24", "stage_overrides.cert.warmup_epochs=1",
             "stage_overrides.cert.ramp_epochs=10", "stage_overrides.cert.lr_schedule.step_epochs=5"]
CERTIFY_TIGHT = ["stage_overrides.certify.methods=[IBP,CROWN-IBP,CROWN]",
                 "stage_overrides.certify.refine_methods=[CROWN]"]
SETUPS = {
    # name: (experiment, eps, cert overrides, gate overrides, certify overrides)
    "demo": ("demo_fmnist_full", 0.1, [], [], []),
    "cotrained": ("demo_fmnist_select", 0.1, [], None, []),
    "mtl003": ("fmnist_mtlibp", 0.03, ["stage_overrides.cert.alpha=0.1", *EPOCHS_24],
               ["stage_overrides.gate.method=IBP", "++stage_overrides.gate.label_method=[IBP,CROWN-IBP]"],
               CERTIFY_TIGHT),
}


def _train(args: list[str], log: Path) -> float:
    env = dict(os.environ, WANDB_MODE="disabled")
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        res = subprocess.run([sys.executable, "-m", "ace_lightning.train", *args], cwd=ROOT, env=env, stdout=fh,
                             stderr=subprocess.STDOUT)
    if res.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: see {log}")
    return time.perf_counter() - t0


def run(name: str, runs_root: Path) -> dict:
    experiment, eps, cert, gate, certify = SETUPS[name]
    run_dir = runs_root / "margin" / name / f"eps_{eps}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "core").exists():
        shutil.copytree(DEMO / "core", run_dir / "core")
    for stage in ("cert", "gate") if name == "demo" else ():  # the demo's own nets
        if not (run_dir / stage).exists():
            shutil.copytree(DEMO / stage, run_dir / stage)
    base = [f"experiment={experiment}", f"eps={eps}", f"runs_root={runs_root}", f"run_name=margin/{name}/eps_{eps}",
            "trainer.enable_progress_bar=false", *cert]
    log = run_dir / "run.log"
    seconds = {"cert": _train(["stage=cert", *base], log)}
    selections = ["margin"] + (["gate"] if gate is not None else [])
    for selection in selections:
        stages = "[gate,certify]" if selection == "gate" else "[certify]"
        seconds[selection] = _train(["stage=pipeline", f"stage.stages={stages}", *base, *(gate or []), *certify,
                                     f"++stage_overrides.certify.selection={selection}",
                                     "++stage_overrides.certify.attack.points=[nat_within_1pt,per_class]"], log)
    out = run_dir / "compare"
    env = dict(os.environ, WANDB_MODE="disabled")
    methods = "[IBP,CROWN-IBP,CROWN]" if certify else "[IBP,CROWN-IBP]"
    subprocess.run([sys.executable, "-m", "ace_lightning.cli", "action=compare", f"runs=[{run_dir}]",
                    f"out_dir={out}", f"methods={methods}", "progress=false"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    row = {"name": name, "eps": eps, "experiment": experiment, "overrides": {"cert": cert, "gate": gate,
                                                                             "certify": certify},
           "seconds": seconds, "compare": (out / "compare.md").read_text()}
    for selection in selections:
        folder = run_dir / ("certify" if selection == "gate" else "certify_margin")
        points = json.loads((folder / "operating_points.json").read_text())
        row[selection] = {p["key"]: {"T": p["threshold"], "class_thresholds": p.get("class_thresholds"),
                                     **{k: p["test"].get(k) for k in ("nat_acc", "cert_acc", "adv_acc")}}
                          for group in ("reference_points", "operating_points") for p in points[group] if "test" in p}
    means = out / "compare_means.csv"
    if means.is_file():
        import csv

        with open(means) as fh:
            row["mean_certified"] = {r["curve"]: float(r["mean_certified"]) for r in csv.DictReader(fh)}
    return row


EPOCHS_12 = ["stage_overrides.cert.epochs=12", "stage_overrides.cert.warmup_epochs=1",
             "stage_overrides.cert.ramp_epochs=5", "stage_overrides.cert.lr_schedule.step_epochs=3"]


def cascade(runs_root: Path) -> dict:
    """eps 0.1, in the demo setup's run folder: a more accurate, less certifiable MTL-IBP net
    (alpha 0.03, 12 epochs; cert_mtl/) first, the demo's IBP net second, both with margin
    selection; its front against each pair alone (compare)."""
    run_dir = runs_root / "margin" / "demo" / "eps_0.1"
    if not (run_dir / "certify_margin").is_dir():
        run("demo", runs_root)
    base = ["eps=0.1", f"runs_root={runs_root}", "run_name=margin/demo/eps_0.1", "trainer.enable_progress_bar=false"]
    log = run_dir / "cascade.log"
    seconds = {"cert_mtl": _train(["stage=cert", "experiment=fmnist_mtlibp", "stage.folder=cert_mtl",
                                   "stage_overrides.cert.alpha=0.03", *EPOCHS_12, *base], log)}
    pairs = "[{cert:cert_mtl,selection:margin},{cert:cert,selection:margin}]"
    seconds["certify_cascade"] = _train(["stage=certify", "experiment=demo_fmnist_full", *base,
                                         f"++stage_overrides.certify.cascade={pairs}",
                                         "++stage_overrides.certify.attack.points=[nat_within_1pt]"], log)
    out = run_dir / "compare_cascade"
    subprocess.run([sys.executable, "-m", "ace_lightning.cli", "action=compare", f"runs=[{run_dir}]", f"out_dir={out}",
                    "methods=[IBP,CROWN-IBP]", "progress=false"], cwd=ROOT, env=dict(os.environ, WANDB_MODE="disabled"),
                   check=True, stdout=subprocess.DEVNULL)
    points = json.loads((run_dir / "certify_cascade" / "operating_points.json").read_text())
    mtl = json.loads((run_dir / "cert_mtl" / "manifest.json").read_text())
    row = {"name": "cascade", "eps": 0.1, "seconds": seconds, "cert_mtl_metrics": mtl.get("metrics"),
           "cascade": {p["key"]: {"T": p["threshold"], **{k: p["test"].get(k) for k in ("nat_acc", "cert_acc", "adv_acc")}}
                       for group in ("reference_points", "operating_points") for p in points[group] if "test" in p},
           "compare": (out / "compare.md").read_text()}
    import csv

    with open(out / "compare_means.csv") as fh:
        row["mean_certified"] = {r["curve"]: float(r["mean_certified"]) for r in csv.DictReader(fh)}
    return row


def table(results: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    pct = lambda d, k: f"{100 * d[k]:.2f}" if d and d.get(k) is not None else "-"  # noqa: E731
    out = ["| setup | eps | selection | point (chosen on val) | natural | certified | adversarial |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        for sel in ("gate", "margin"):
            for key in ("nat_within_1pt", "per_class"):
                p = (r.get(sel) or {}).get(key)
                if p:
                    out.append(f"| {r['name']} | {r['eps']:g} | {sel} | {key} | {pct(p, 'nat_acc')} | "
                               f"{pct(p, 'cert_acc')} | {pct(p, 'adv_acc')} |")
        c = (r.get("cascade") or {}).get("nat_within_1pt")
        if c:
            out.append(f"| {r['name']} | {r['eps']:g} | margin, margin | nat_within_1pt T={c['T']} | "
                       f"{pct(c, 'nat_acc')} | {pct(c, 'cert_acc')} | {pct(c, 'adv_acc')} |")
    out += ["", "Mean certified accuracy from the most accurate certified single network to the core (test):", "",
            "| setup | curve | mean certified |", "|---|---|---|"]
    for r in rows:
        for curve, value in (r.get("mean_certified") or {}).items():
            out.append(f"| {r['name']} | {curve} | {100 * value:.2f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("setups", nargs="*", choices=sorted(SETUPS) + ["cascade"], help="which compositions to run")
    p.add_argument("--runs-root", type=Path, default=ROOT / "runs")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    if not args.table_only:
        for name in args.setups:
            row = cascade(args.runs_root.resolve()) if name == "cascade" else run(name, args.runs_root.resolve())
            (results / f"{name}.json").write_text(json.dumps(row, indent=2))
    (HERE / "table.md").write_text(table(results))
    print((HERE / "table.md").read_text())


if __name__ == "__main__":
    main()
