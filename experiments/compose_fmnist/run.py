"""Compositions on Fashion-MNIST (eps 0.1 and 0.03): a trained cert-net (any run folder holding
cert/), the demo's core, and a selection mechanism (a gate trained with a given recipe, or the
cert-net's own entropy), certified cheap to tight; the table row that matters is certified
accuracy at natural accuracy within 1 point of the core (thresholds chosen on val, test split).

    python experiments/compose_fmnist/run.py --name mtl_gate_ibp --cert-run runs/cert_methods/MTL-IBP_e24/eps_0.1 \
        --core-run runs/demo_fmnist_full/eps_0.1 --experiment fmnist_mtlibp --gate stage_overrides.gate.method=IBP
    python experiments/compose_fmnist/run.py --name mtl_entropy --cert-run ... --core-run ... --selection entropy

Each composition gets its own run folder runs/compose/<name>/eps_<eps>[_seed<n>]/ (core/ and cert/
copied in, so they are not trained again); results/<name>_eps<eps>[_seed<n>].json keeps its table;
table.md lists all, table_seeds.md the mean +- sample std over the seeds of each composition.
``--seed n``: the seed of the stages trained here (the gate) and of the names; pass the cert-net and
core runs of the same seed (seed 0 keeps the names without a suffix).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from ace_lightning.atomic import atomic_write_text
from ace_lightning.resolvers import seed_suffix as suffix  # the run folders' own seed suffix

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def compose(name: str, cert_run: Path, core_run: Path, experiment: str, selection: str, overrides: list[str],
            runs_root: Path, seed: int = 0) -> Path:
    cert_manifest = json.loads((cert_run / "cert" / "manifest.json").read_text())
    eps = cert_manifest["eps"]
    run_name = f"compose/{name}/eps_{eps}{suffix(seed)}"
    run_dir = runs_root / run_name
    for stage, src in (("core", core_run), ("cert", cert_run)):
        if not (run_dir / stage).exists():
            shutil.copytree(src / stage, run_dir / stage)
    stages = "gate,certify" if selection == "gate" else "certify"
    cmd = [sys.executable, "-m", "ace_lightning.train", "-m", f"experiment={experiment}", f"stage={stages}",
           f"eps={eps}", f"seed={seed}", f"runs_root={runs_root}", f"run_name={run_name}",
           "trainer.enable_progress_bar=false", *overrides]
    if selection == "entropy":
        cmd += ["stage_overrides.certify.selection=entropy", "+stage_overrides.certify.entropy_stage=cert"]
    else:  # the experiments' certify stage may default to margin selection (demo_fmnist_full does)
        cmd += ["++stage_overrides.certify.selection=gate"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="disabled")
    log = run_dir / "compose.log"
    with open(log, "w") as fh:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode:
        raise RuntimeError(f"composition {name} failed: see {log}")
    return run_dir


def collect(name: str, run_dir: Path, selection: str) -> dict:
    folder = run_dir / ("certify" if selection == "gate" else "certify_entropy_cert")
    points = json.loads((folder / "operating_points.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    cert = json.loads((run_dir / "cert" / "manifest.json").read_text())
    gate = json.loads((run_dir / "gate" / "manifest.json").read_text()) if (run_dir / "gate").is_dir() else {}
    row = {"name": name, "eps": manifest["eps"], "selection": selection,
           "cert_method": cert["config"]["stage"]["method"], "cert_stage": cert["config"]["stage"],
           "gate_stage": (gate.get("config") or {}).get("stage"), "gate_metrics": gate.get("metrics"),
           "certification": manifest.get("certification"), "precision": manifest.get("precision"),
           "table": (folder / "table.txt").read_text(), "certify_wall_s": manifest.get("wall_s"),
           "gate_wall_s": gate.get("wall_s")}
    for group in ("reference_points", "operating_points"):
        for p in points[group]:
            if "test" in p:
                row[p["key"]] = {"T": p["threshold"], **{k: p["test"][k] for k in ("nat_acc", "cert_acc") if k in p["test"]},
                                 "adv_acc": p["test"].get("adv_acc")}
    return row


def table(results: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    rows.sort(key=lambda r: (-r["eps"], -(r.get("nat_within_1pt") or {}).get("cert_acc", 0)))
    out = ["| eps | composition | seed | cert-net alone (nat / cert) | core nat | ACE nat within 1 pt: nat / cert | "
           "max certified: nat / cert |", "|---|---|---|---|---|---|---|"]
    pct = lambda d, k: f"{100 * d[k]:.2f}" if d and k in d else "-"  # noqa: E731
    for r in rows:
        c, core, w, m = r.get("cert_alone"), r.get("core_alone"), r.get("nat_within_1pt"), r.get("max_certified")
        out.append(f"| {r['eps']:g} | {r['name']} | {r.get('seed', 0)} | {pct(c, 'nat_acc')} / {pct(c, 'cert_acc')} | {pct(core, 'nat_acc')} | "
                   f"{pct(w, 'nat_acc')} / {pct(w, 'cert_acc')} | {pct(m, 'nat_acc')} / {pct(m, 'cert_acc')} |")
    return "\n".join(out) + "\n"


def table_seeds(results: Path) -> str:
    """Mean +- sample standard deviation over the seeds of each (eps, composition)."""
    groups: dict[tuple, list[dict]] = {}
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        groups.setdefault((r["eps"], r["name"]), []).append(r)

    def ms(rs: list[dict], point: str, key: str) -> str:
        vals = [100 * r[point][key] for r in rs if (r.get(point) or {}).get(key) is not None]
        if not vals:
            return "-"
        return f"{statistics.mean(vals):.2f}" + (f" +- {statistics.stdev(vals):.2f}" if len(vals) > 1 else "")

    out = ["| eps | composition | n | seeds | cert-net alone (nat / cert) | core nat | ACE nat within 1 pt: nat / cert |"
           " adversarial |", "|---|---|---|---|---|---|---|---|"]
    for (eps, name), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        rs.sort(key=lambda r: r.get("seed", 0))
        seeds = " ".join(str(r.get("seed", 0)) for r in rs)
        out.append(f"| {eps:g} | {name} | {len(rs)} | {seeds} | {ms(rs, 'cert_alone', 'nat_acc')} / "
                   f"{ms(rs, 'cert_alone', 'cert_acc')} | {ms(rs, 'core_alone', 'nat_acc')} | "
                   f"{ms(rs, 'nat_within_1pt', 'nat_acc')} / {ms(rs, 'nat_within_1pt', 'cert_acc')} | "
                   f"{ms(rs, 'nat_within_1pt', 'adv_acc')} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=False)
    p.add_argument("--cert-run", type=Path)
    p.add_argument("--core-run", type=Path)
    p.add_argument("--experiment", default="demo_fmnist_full", help="recipe whose gate/certify settings are used")
    p.add_argument("--selection", choices=("gate", "entropy"), default="gate")
    p.add_argument("--runs-root", type=Path, default=ROOT / "runs")
    p.add_argument("--seed", type=int, default=0, help="the seed of the stages trained here and of the names")
    p.add_argument("overrides", nargs="*", help="further overrides, e.g. stage_overrides.gate.method=IBP")
    p.add_argument("--collect-only", action="store_true",
                   help="only collect the row of runs/compose/<name>/eps_<eps>[_seed<n>] (a pipeline run there)")
    p.add_argument("--eps", type=float, default=0.1, help="--collect-only: the run folder's eps")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    results = HERE / "results"
    if not args.table_only:
        if args.collect_only:
            run_dir = args.runs_root.resolve() / "compose" / args.name / f"eps_{args.eps}{suffix(args.seed)}"
        else:
            run_dir = compose(args.name, args.cert_run.resolve(), args.core_run.resolve(), args.experiment,
                              args.selection, args.overrides, args.runs_root.resolve(), args.seed)
        row = collect(args.name, run_dir, args.selection)
        row["overrides"], row["seed"] = args.overrides, args.seed
        results.mkdir(exist_ok=True)
        atomic_write_text(results / f"{args.name}_eps{row['eps']}{suffix(args.seed)}.json", json.dumps(row, indent=2))
        print(row["table"])
    (HERE / "table.md").write_text(table(results))
    (HERE / "table_seeds.md").write_text(table_seeds(results))
    print((HERE / "table.md").read_text())
    print((HERE / "table_seeds.md").read_text())


if __name__ == "__main__":
    main()
