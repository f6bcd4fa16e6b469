"""Cost of one certified-training step relative to a plain step, measured side by side.

A step is forward + loss + backward + optimizer step on the same batch. Ratios are medians over
``reps`` repetitions after warm-up, all taken in this one process, so machine noise cancels out of
the ratio far better than out of the absolute times (which are reported too).

    python benchmarks/bound_step_cost.py [--batch 128] [--reps 5] [--net c3] [--shape 3 32 32]
"""
from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
from torch import nn

from ace_lightning.bounds import robust_ce_loss
from timing import device_name, time_fn


def default_net(name: str, shape: tuple[int, int, int], classes: int) -> nn.Module:
    from ace_lightning.nets import create_cert_net

    c = shape[0]
    return create_cert_net(name, shape, classes, mean=[0.5] * c, std=[0.25] * c)


def measure(net: nn.Module, shape: tuple[int, int, int], classes: int = 10, batch: int = 128,
            eps: float = 2 / 255, reps: int = 5, beta: float = 0.5,
            device: torch.device | str = "cpu") -> dict:
    """Plain, IBP, CROWN-IBP (beta-mixed) and loss-fusion CROWN-IBP training steps, each with its
    training throughput ``samples_per_s``."""
    torch.manual_seed(0)
    x = torch.rand(batch, *shape).to(device)
    y = torch.randint(0, classes, (batch,)).to(device)
    net.to(device)
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
    out = {name: time_fn(run(fn), reps, warmup=2, device=device) for name, fn in variants.items()}
    base = out["plain"]["median_s"]
    for name, rec in out.items():
        rec["ratio_to_plain"] = rec["median_s"] / base
        rec["samples_per_s"] = batch / rec["median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="c3")
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    res = measure(default_net(args.net, shape, args.classes), shape, args.classes, args.batch,
                  reps=args.reps, device=args.device)
    print(json.dumps({"net": args.net, "shape": shape, "batch": args.batch,
                      "threads": torch.get_num_threads(), "device": device_name(args.device),
                      "steps": res}, indent=2))


if __name__ == "__main__":
    main()
