"""Is the certify stage's attack strong enough? Re-attack a certified run folder with a much
stronger attack and compare every reported adversarial accuracy.

    python experiments/attack_strength/run.py runs/demo_fmnist_full/eps_0.1 [--steps 100 --restarts 5]

Both attacks count the inputs the records certify as robust (that is what the certify stage
reports: adversarial accuracy is an upper bound on robust accuracy, certified <= adversarial) and
attack every other test input: the stage's own attack as configured in its manifest, and PGD
with the margin loss, ``--steps`` steps and ``--restarts`` restarts (the composed model: on every
branch that can answer, plus the smooth surrogate, with the core's gradient everywhere: none of
the stage attack's shortcuts but the records' gate bounds). The stage's numbers pass if the strong attack
lowers none of them by more than ``--tolerance`` (0.5 points). Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import ace_lightning.attacks.composed as composed
from ace_lightning.ace import ACEModel
from ace_lightning.certify_attack import ATTACK_DEFAULTS, attack_test_split
from ace_lightning.certify_pass import IndexedSubset
from ace_lightning.data import ACEDataModule
from ace_lightning.records import load_records

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=HERE / "demo_fmnist")
    parser.add_argument("--stage-attack", default=None,
                        help="JSON overrides of the stage attack (default: the one in the certify manifest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    certify = args.run_dir / "certify"
    manifest = json.loads((certify / "manifest.json").read_text())
    config = manifest["config"]
    stage_attack = {**ATTACK_DEFAULTS, **(config["stage"].get("attack") or {}),
                    **json.loads(args.stage_attack or "{}")}
    strong = {**stage_attack, "steps": args.steps, "restarts": args.restarts, "loss": "margin",
              "certified_sample": 0, "seed": 1}
    model = ACEModel.load(certify / "ace_model.pt").eval()
    data = {k: v for k, v in config["data"].items() if k in ACEDataModule.__init__.__code__.co_varnames}
    dm = ACEDataModule(**{**data, "num_workers": 0, "data_dir": args.data_dir})
    dm.setup("test")
    loader = DataLoader(IndexedSubset(dm.test_set, dm.test_indices), batch_size=256, shuffle=False)
    test = load_records(certify / "records.csv", split="test")
    points = json.loads((certify / "operating_points.json").read_text())["operating_points"]
    eps = float(manifest["eps"])

    results = {}
    for name, attack in (("stage", stage_attack), ("strong", strong)):
        t0 = time.perf_counter()
        timing: dict = {}
        near = composed.NEAR_MARGINS
        if name == "strong":  # the core's gradient wherever the core may answer, however high the gates
            composed.NEAR_MARGINS = float("inf")
        try:
            adv, violations = attack_test_split(model, loader, test, eps, attack, points, progress=False,
                                                timing=timing)
        finally:
            composed.NEAR_MARGINS = near
        results[name] = {"attack": attack, "seconds": time.perf_counter() - t0, "timing_s": timing,
                         "soundness_violations": violations,
                         "adv_acc": {k: float(np.mean(v)) for k, v in adv.items()}}
        print(f"{name}: {results[name]['seconds']:.0f} s  " +
              "  ".join(f"{k}={100 * v:.2f}" for k, v in results[name]["adv_acc"].items()), flush=True)
    rows, ok = [], True
    in_manifest = {k: v.get("adv_acc") for k, v in manifest.get("metrics", {}).items()}
    for key, reported in results["stage"]["adv_acc"].items():
        stronger = results["strong"]["adv_acc"][key]
        drop = reported - stronger
        ok &= drop <= args.tolerance
        rows.append({"point": key, "stage_attack": reported, "strong_attack": stronger, "drop": drop,
                     "in_manifest": in_manifest.get(key)})
    out = {"run_dir": str(args.run_dir), "eps": eps, "tolerance": args.tolerance, "passed": bool(ok),
           "rows": rows, **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [f"Attack strength on {args.run_dir} (test split, eps={eps:g}): the certify stage's attack "
             f"({stage_attack['steps']} steps x {stage_attack['restarts']} restarts, {stage_attack['loss']} loss) "
             f"against PGD with {args.steps} steps x {args.restarts} restarts (margin loss).", "",
             "| point | in the stage's table | stage attack (re-run) | strong attack | drop (points) |",
             "|---|---|---|---|---|"]

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    lines += [f"| {r['point']} | {pct(r['in_manifest'])} | {pct(r['stage_attack'])} | {pct(r['strong_attack'])} | "
              f"{100 * r['drop']:.2f} |" for r in rows]
    lines += ["", f"Seconds: stage attack {results['stage']['seconds']:.0f}, strong attack "
              f"{results['strong']['seconds']:.0f}. Passed (every drop <= {100 * args.tolerance:.1f} points): {ok}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
