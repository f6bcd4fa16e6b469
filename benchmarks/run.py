"""`make bench`: every benchmark section, one JSON file in benchmarks/results/<date>.json and a
short table on stdout. Ratios are measured in this one process on the same batch; run it alone
(two cores: another busy process distorts absolute times far more than ratios).

Reading the JSON: ``sections.<name>.<case>.<variant>`` holds ``median_s`` (seconds per step,
median over ``reps`` after warm-up), ``min_s`` and ``ratio_to_plain`` (median / the plain
forward+backward step of the same net on the same batch). ``machine`` says where it ran.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ace_costs  # noqa: E402
import bound_step_cost  # noqa: E402
import lightning_overhead  # noqa: E402
import nets_cost  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def bound_steps(batch: int, reps: int) -> dict:
    cases = {
        "c3_cifar10_3x32x32": ("c3", (3, 32, 32), 10, 2 / 255),
        "small_fashion_mnist_1x28x28": ("small", (1, 28, 28), 10, 0.1),
    }
    out = {}
    for case, (net, shape, classes, eps) in cases.items():
        print(f"[bench] bound step cost: {case} (batch {batch}, {reps} reps)", flush=True)
        model = bound_step_cost.default_net(net, shape, classes)
        out[case] = bound_step_cost.measure(model, shape, classes, batch, eps=eps, reps=reps)
    return out


SECTIONS = ("bound_step_cost", "lightning_overhead", "ace_costs", "nets_cost")


def main() -> None:
    parser = argparse.ArgumentParser(description="ace-lightning benchmarks")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=None,
                        help="run only these sections (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    wanted = args.only or SECTIONS
    sections: dict = {}
    if "bound_step_cost" in wanted:
        sections["bound_step_cost"] = bound_steps(args.batch, args.reps)
    if "lightning_overhead" in wanted:
        print("[bench] Lightning cert step vs bare loop", flush=True)
        sections["lightning_overhead"] = {
            "small_fashion_mnist_ibp": lightning_overhead.measure(batch=args.batch, steps=args.reps + 7),
            "c3_cifar10_ibp": lightning_overhead.measure("c3", (3, 32, 32), batch=args.batch, eps=2 / 255,
                                                         steps=args.reps + 7)}
    if "ace_costs" in wanted:
        print("[bench] composed model: certification, conditional execution, sweep, memory", flush=True)
        sections["ace_costs"] = {"fashion_mnist_demo": ace_costs.measure(reps=args.reps)}
    if "nets_cost" in wanted:
        print("[bench] forward+backward per net", flush=True)
        # the TinyImageNet WRN takes minutes per step at batch 128 on 2 cores: its own small batch
        names = sorted({c["name"] for c in nets_cost.cases()} - {"wrn"})
        sections["nets_cost"] = nets_cost.measure_all(batch=args.batch, reps=args.reps, only=names)
        sections["nets_cost"].update(nets_cost.measure_all(batch=16, reps=2, only=["wrn"]))
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "sections": sections,
    }
    if not torch.cuda.is_available():
        print("[bench] CUDA not available: GPU section skipped")
    path = args.out or RESULTS / f"{dt.date.today().isoformat()}.json"
    _atomic_write(path, json.dumps(result, indent=2))
    if "bound_step_cost" in sections:
        print(f"\n{'case':32s} {'variant':24s} {'median s':>10s} {'x plain':>8s}")
        for case, variants in sections["bound_step_cost"].items():
            for name, rec in variants.items():
                print(f"{case:32s} {name:24s} {rec['median_s']:10.4f} {rec['ratio_to_plain']:8.2f}")
    if "lightning_overhead" in sections:
        print(f"\n{'Lightning vs bare loop':32s} {'bare s':>10s} {'lightning s':>12s} {'ratio':>8s}")
        for case, rec in sections["lightning_overhead"].items():
            print(f"{case:32s} {rec['bare_loop_step_s']:10.4f} {rec['lightning_step_s']:12.4f} "
                  f"{rec['ratio_lightning_to_bare']:8.2f}")
    if "ace_costs" in sections:
        a = sections["ace_costs"]["fashion_mnist_demo"]
        print(f"\ncomposed model ({a['model']}), routing rate to cert-net {a['routing_rate_to_cert']:.2f}:")
        for k in ("certify_IBP", "certify_CROWN-IBP"):
            print(f"  {k:22s} {a[k]['inputs_per_s']:9.0f} inputs/s  {a[k]['ratio_to_plain_inference']:6.2f}x plain inference")
        print(f"  conditional execution {a['conditional_vs_core_ratio']:6.2f}x the core on every input; "
              f"sweep {100 * a['sweep']['ratio_to_certification_IBP']:.3f}% of certification")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
