"""Cost of one certified-training step relative to a plain step, measured side by side.

A step is forward + loss + backward + optimizer step on the same batch. Ratios are medians over
``reps`` repetitions after warm-up, all taken in this one process, so machine noise cancels out of
the ratio far better than out of the absolute times (which are reported too).

    python benchmarks/bound_step_cost.py [--batch 128] [--reps 5] [--net c3] [--shape 3 32 32]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from ace_lightning.bounds import robust_ce_loss


def reset_peak_rss() -> None:
    """Linux: reset the process's peak resident set size (VmHWM) so each case gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _time(step: Callable[[], None], reps: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        step()
    reset_peak_rss()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps,
            "peak_rss_mb": peak_rss_mb()}


def default_net(name: str, shape: tuple[int, int, int], classes: int) -> nn.Module:
    from ace_lightning.nets import create_cert_net

    c = shape[0]
    return create_cert_net(name, shape, classes, mean=[0.5] * c, std=[0.25] * c)


def measure(net: nn.Module, shape: tuple[int, int, int], classes: int = 10, batch: int = 128,
            eps: float = 2 / 255, reps: int = 5, beta: float = 0.5) -> dict:
    """Plain, IBP, CROWN-IBP (beta-mixed) and loss-fusion CROWN-IBP training steps."""
    torch.manual_seed(0)
    x = torch.rand(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net.train()

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
        return step

    variants = {
        "plain": lambda: nn.functional.cross_entropy(net(x), y),
        "IBP": lambda: robust_ce_loss(net, x, y, eps, "IBP"),
        "CROWN-IBP": lambda: robust_ce_loss(net, x, y, eps, "CROWN-IBP", beta=beta),
        "CROWN-IBP loss fusion": lambda: robust_ce_loss(net, x, y, eps, "CROWN-IBP", beta=beta,
                                                        loss_fusion=True),
    }
    out = {name: _time(run(fn), reps) for name, fn in variants.items()}
    base = out["plain"]["median_s"]
    for name, rec in out.items():
        rec["ratio_to_plain"] = rec["median_s"] / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="c3")
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    res = measure(default_net(args.net, shape, args.classes), shape, args.classes, args.batch,
                  reps=args.reps)
    print(json.dumps({"net": args.net, "shape": shape, "batch": args.batch,
                      "threads": torch.get_num_threads(), "device": platform.processor() or "cpu",
                      "steps": res}, indent=2))


if __name__ == "__main__":
    main()
