"""Parameter count and time of one forward+backward step of every net (benchmark, not a test).

Prints JSON: for each net (cert zoo at CIFAR-10 and Fashion-MNIST shapes, the TinyImageNet WRN
at 56x56, the cores at 32x32 / 28x28) the number of parameters and the median wall time of one
training step (forward, cross-entropy, backward) over ``--reps`` repetitions after ``--warmup``.

    OMP_NUM_THREADS=2 python benchmarks/nets_cost.py --threads 2 > benchmarks/results/nets_cost.json
    python benchmarks/nets_cost.py --reps 1 --batch 4 --only c2 small_cnn     # quick check
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

from ace_lightning.data import get_dataset_info
from ace_lightning.nets import create_cert_net, create_core
from timing import time_fn

CERT_ZOO = ["fc", "small", "c2", "c3", "c5", "cnn7"]


def cases() -> list[dict]:
    """(name, kind, dataset whose shape/classes/mean/std it uses)."""
    out = []
    for ds in ("cifar10", "fashion_mnist"):
        out += [dict(name=n, kind="cert", data=ds) for n in CERT_ZOO]
    out.append(dict(name="wrn", kind="cert", data="tinyimagenet"))
    for ds in ("cifar10", "fashion_mnist"):
        out.append(dict(name="small_cnn", kind="core", data=ds))
    out += [dict(name=n, kind="core", data="cifar10") for n in ("resnet18", "efficientnet_b0")]
    return out


def build(case: dict) -> tuple[torch.nn.Module, tuple[int, int, int], int]:
    info = get_dataset_info(case["data"])
    if case["kind"] == "cert":
        net = create_cert_net(case["name"], info.input_shape, info.num_classes, info.mean, info.std)
    else:
        net = create_core(case["name"], info.num_classes, info.input_shape, mean=info.mean, std=info.std)
    return net, info.input_shape, info.num_classes


def time_step(net: torch.nn.Module, shape, classes: int, batch: int, reps: int, warmup: int,
              device: torch.device | str = "cpu") -> dict:
    net.to(device).train()
    x = torch.rand(batch, *shape).to(device)
    y = torch.randint(0, classes, (batch,)).to(device)

    def step() -> None:
        F.cross_entropy(net(x), y).backward()
        net.zero_grad(set_to_none=True)
    return time_fn(step, reps, warmup, device)


def measure_all(batch: int = 128, reps: int = 5, warmup: int = 1, only: list[str] | None = None,
                log=sys.stderr, device: torch.device | str = "cpu") -> dict:
    """``{case: {params, median_s, min_s, ...}}`` with case ``<net>_<dataset>_<CxHxW>`` (a
    section for benchmarks/run.py)."""
    out = {}
    for case in cases():
        if only and case["name"] not in only:
            continue
        torch.manual_seed(0)
        net, shape, classes = build(case)
        key = f"{case['name']}_{case['data']}_{'x'.join(map(str, shape))}"
        out[key] = {**case, "input_shape": list(shape), "num_classes": classes, "batch": batch,
                    "params": sum(p.numel() for p in net.parameters()),
                    **time_step(net, shape, classes, batch, reps, warmup, device)}
        if log is not None:
            print(f"{key:>40} {out[key]['params']:>11,d} params {out[key]['median_s']:.3f} s/step", file=log, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the note's numbers: 2 cores)")
    p.add_argument("--only", nargs="*", help="restrict to these net names")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = measure_all(args.batch, args.reps, args.warmup, args.only, device=args.device)
    json.dump({"benchmark": "nets_cost", "step": "forward + cross-entropy + backward, train mode",
               "batch": args.batch, "reps": args.reps, "warmup": args.warmup, "threads": args.threads,
               "device": args.device,
               "torch": torch.__version__, "platform": platform.platform(), "results": results},
              sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
