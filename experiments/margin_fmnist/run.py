"""Margin selection against the trained gate on Fashion-MNIST (issue "a selection whose
certificate is free"): the same core and cert-net composed with each selection, certified the
same way, compared on one plot (action=compare) with one number per curve (mean certified
accuracy from the most accurate certified single network up to the core).

    python experiments/margin_fmnist/run.py demo        # eps 0.1, the demo's nets: gate vs margin
    python experiments/margin_fmnist/run.py cotrained   # eps 0.1, a cert-net co-trained for selection
    python experiments/margin_fmnist/run.py mtl003      # eps 0.03, MTL-IBP alpha 0.1, 24 epochs
    python experiments/margin_fmnist/run.py cascade     # eps 0.1, an MTL-IBP net before the demo's IBP net
    python experiments/margin_fmnist/run.py demo cotrained mtl003 cascade --seeds 1 2
    python experiments/margin_fmnist/run.py --table-only

Run folders under runs/margin/<name>/eps_<eps>[_seed<n>]/ (the core is copied from the longer
demo's run folder of the same seed, runs/demo_fmnist_full/eps_0.1[_seed<n>]: it is trained
naturally, eps plays no part); results/<name>[_seed<n>].json, table.md (one row per run) and
table_seeds.md (mean +- sample std over the seeds of each setup) here. Seed 0 keeps the names
without a suffix.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ace_lightning.atomic import atomic_write_text
from ace_lightning.resolvers import seed_suffix as suffix  # the run folders' own seed suffix

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def demo_dir(runs_root: Path, seed: int) -> Path:
    """The longer demo's run folder of this seed (`make demo-gate`, or `demo_fmnist_full seed=n`)."""
    return runs_root / "demo_fmnist_full" / f"eps_0.1{suffix(seed)}"
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


def run(name: str, runs_root: Path, seed: int = 0) -> dict:
    experiment, eps, cert, gate, certify = SETUPS[name]
    run_name = f"margin/{name}/eps_{eps}{suffix(seed)}"
    run_dir = runs_root / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    demo = demo_dir(runs_root, seed)
    if not (run_dir / "core").exists():
        shutil.copytree(demo / "core", run_dir / "core")
    for stage in ("cert", "gate") if name == "demo" else ():  # the demo's own nets
        if not (run_dir / stage).exists():
            shutil.copytree(demo / stage, run_dir / stage)
    base = [f"experiment={experiment}", f"eps={eps}", f"seed={seed}", f"runs_root={runs_root}",
            f"run_name={run_name}", "trainer.enable_progress_bar=false", *cert]
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
    row = {"name": name, "seed": seed, "eps": eps, "experiment": experiment, "overrides": {"cert": cert, "gate": gate,
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


def cascade(runs_root: Path, seed: int = 0) -> dict:
    """eps 0.1, in the demo setup's run folder: a more accurate, less certifiable MTL-IBP net
    (alpha 0.03, 12 epochs; cert_mtl/) first, the demo's IBP net second, both with margin
    selection; its front against each pair alone (compare)."""
    run_name = f"margin/demo/eps_0.1{suffix(seed)}"
    run_dir = runs_root / run_name
    if not (run_dir / "certify_margin").is_dir():
        run("demo", runs_root, seed)
    base = ["eps=0.1", f"seed={seed}", f"runs_root={runs_root}", f"run_name={run_name}",
            "trainer.enable_progress_bar=false"]
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
    row = {"name": "cascade", "seed": seed, "eps": 0.1, "seconds": seconds, "cert_mtl_metrics": mtl.get("metrics"),
           "cascade": {p["key"]: {"T": p["threshold"], **{k: p["test"].get(k) for k in ("nat_acc", "cert_acc", "adv_acc")}}
                       for group in ("reference_points", "operating_points") for p in points[group] if "test" in p},
           "compare": (out / "compare.md").read_text()}
    import csv

    with open(out / "compare_means.csv") as fh:
        row["mean_certified"] = {r["curve"]: float(r["mean_certified"]) for r in csv.DictReader(fh)}
    return row


def _points(r: dict) -> list[tuple[str, str, dict]]:
    """(selection, point, values) of one result row: the gate's and margin's val-chosen points,
    the cascade's."""
    out = [(sel, key, (r.get(sel) or {}).get(key)) for sel in ("gate", "margin")
           for key in ("nat_within_1pt", "per_class")]
    out.append(("margin, margin", "nat_within_1pt", (r.get("cascade") or {}).get("nat_within_1pt")))
    return [(sel, key, p) for sel, key, p in out if p]


def table(results: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    pct = lambda d, k: f"{100 * d[k]:.2f}" if d and d.get(k) is not None else "-"  # noqa: E731
    out = ["| setup | seed | eps | selection | point (chosen on val) | natural | certified | adversarial |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for sel, key, p in _points(r):
            point = f"{key} T={p['T']}" if sel == "margin, margin" else key
            out.append(f"| {r['name']} | {r.get('seed', 0)} | {r['eps']:g} | {sel} | {point} | {pct(p, 'nat_acc')} | "
                       f"{pct(p, 'cert_acc')} | {pct(p, 'adv_acc')} |")
    out += ["", "Mean certified accuracy from the most accurate certified single network to the core (test):", "",
            "| setup | seed | curve | mean certified |", "|---|---|---|---|"]
    for r in rows:
        for curve, value in (r.get("mean_certified") or {}).items():
            out.append(f"| {r['name']} | {r.get('seed', 0)} | {curve} | {100 * value:.2f} |")
    return "\n".join(out) + "\n"


def table_seeds(results: Path) -> str:
    """Mean +- sample standard deviation over the seeds of each setup's points and curve means."""
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    groups: dict[tuple, list[float]] = {}
    seeds: dict[tuple, list[int]] = {}
    for r in sorted(rows, key=lambda r: r.get("seed", 0)):
        for sel, key, p in _points(r):
            for metric in ("nat_acc", "cert_acc", "adv_acc"):
                if p.get(metric) is not None:
                    groups.setdefault((r["name"], r["eps"], sel, key, metric), []).append(100 * p[metric])
            seeds.setdefault((r["name"], r["eps"], sel, key), []).append(r.get("seed", 0))
        for curve, value in (r.get("mean_certified") or {}).items():
            curve = re.sub(r"_seed\d+", "", curve)  # the same curve of each seed's run folder
            groups.setdefault((r["name"], r["eps"], "curve", curve, "mean_certified"), []).append(100 * value)
            seeds.setdefault((r["name"], r["eps"], "curve", curve), []).append(r.get("seed", 0))

    def ms(vals: list[float]) -> str:
        if not vals:
            return "-"
        return f"{statistics.mean(vals):.2f}" + (f" +- {statistics.stdev(vals):.2f}" if len(vals) > 1 else "")

    out = ["| setup | eps | selection | point (chosen on val) | n | seeds | natural | certified | adversarial |",
           "|" + "---|" * 9]
    curves = ["", "Mean certified accuracy of each curve (test):", "",
              "| setup | eps | curve | n | seeds | mean certified |", "|---|---|---|---|---|---|"]
    for (name, eps, sel, key), ss in seeds.items():
        seed_list = " ".join(map(str, ss))
        if sel == "curve":
            curves.append(f"| {name} | {eps:g} | {key} | {len(ss)} | {seed_list} | "
                          f"{ms(groups[(name, eps, sel, key, 'mean_certified')])} |")
            continue
        vals = [ms(groups.get((name, eps, sel, key, m), [])) for m in ("nat_acc", "cert_acc", "adv_acc")]
        out.append(f"| {name} | {eps:g} | {sel} | {key} | {len(ss)} | {seed_list} | {' | '.join(vals)} |")
    return "\n".join(out + curves) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = sorted(SETUPS) + ["cascade"]
    p.add_argument("setups", nargs="*", help=f"which compositions to run: {', '.join(known)}")
    p.add_argument("--runs-root", type=Path, default=ROOT / "runs")
    p.add_argument("--seeds", nargs="*", type=int, default=[0], help="seed 0: the first runs' names")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    unknown = sorted(set(args.setups) - set(known))
    if unknown:
        p.error(f"unknown setup(s) {', '.join(unknown)}; known: {', '.join(known)}")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    if not args.table_only:
        root = args.runs_root.resolve()
        for seed in args.seeds:
            if not (demo_dir(root, seed) / "core").is_dir():
                sys.exit(f"error: no core in {demo_dir(root, seed)}: run ace-train stage=pipeline "
                         f"experiment=demo_fmnist_full seed={seed} first")
        for name in args.setups:
            for seed in args.seeds:
                row = cascade(root, seed) if name == "cascade" else run(name, root, seed)
                atomic_write_text(results / f"{name}{suffix(seed)}.json", json.dumps(row, indent=2))
    (HERE / "table.md").write_text(table(results))
    (HERE / "table_seeds.md").write_text(table_seeds(results))
    print((HERE / "table.md").read_text())
    print((HERE / "table_seeds.md").read_text())


if __name__ == "__main__":
    main()
