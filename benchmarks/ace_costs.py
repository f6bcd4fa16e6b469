"""Costs of the composed model, measured side by side in one process on the same inputs:

- certification throughput (inputs/s) with IBP and CROWN-IBP vs plain inference of the composed
  model (goal: at most 3x for IBP);
- conditional execution: the composed model at routing rate r vs the core on every input, and vs
  running every net on every input (the reference code's way);
- the exact threshold sweep vs the certification pass that produced its records (goal < 1%);
- peak memory of each (Linux VmHWM on CPU, the CUDA allocator's peak on a GPU; reset before each
  case). On a GPU the sweep still runs on CPU (it works on the records, as in the pipeline).

Uses a certified run folder (default: the demo's) when it exists, else the demo architectures with
random weights (timings are about shapes, the routing rate then comes from the threshold).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ace_lightning.ace import ACEModel
from ace_lightning.rundir import model_from_run
from ace_lightning.ace import CertifySettings, certify_batch
from ace_lightning.records import Records, as_records
from ace_lightning.sweep import sweep
from timing import time_fn

DEMO_RUN = Path("runs/demo_fmnist_full/eps_0.1")


def sweep_cost(records, repeats: int = 5) -> float:
    """Seconds for one exact sweep of ``records`` (best of ``repeats``)."""
    rec = as_records(records)
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        sweep(rec, exact=True)
        best = min(best, time.perf_counter() - start)
    return best


def _model(run_dir: Path) -> tuple[ACEModel, str]:
    if (run_dir / "certify" / "manifest.json").is_file():
        model = ACEModel.load(run_dir / "certify" / "ace_model.pt")
        return model.eval(), f"trained ({run_dir})"
    if (run_dir / "gate" / "manifest.json").is_file():
        return model_from_run(run_dir), f"trained ({run_dir})"
    spec = {"data": {"name": "fashion_mnist", "input_shape": [1, 28, 28], "num_classes": 10,
                     "mean": [0.286], "std": [0.353]},
            "core_net": {"name": "small_cnn", "kind": "core"},
            "branches": [{"selection": "gate", "threshold": 0.0,
                          "cert_net": {"name": "small", "kind": "cert"},
                          "gate_net": {"name": "small", "kind": "gate"}}]}
    return ACEModel.from_spec(spec).eval(), "random weights (no certified run found)"


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from ace_lightning.data import get_dataset_info

        ds = get_dataset_info("fashion_mnist").build("data/fashion_mnist", train=False)
        xs, ys = zip(*(ds[i] for i in range(n)))
        return torch.stack(xs), torch.tensor(ys)
    except Exception:  # noqa: BLE001 - any missing data: synthetic inputs of the same shape
        gen = torch.Generator().manual_seed(0)
        return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def measure(run_dir: Path = DEMO_RUN, n: int = 1024, batch: int = 256, eps: float = 0.1, reps: int = 5,
            device: torch.device | str = "cpu") -> dict:
    model, origin = _model(Path(run_dir))
    model.to(device)
    x, y = (t.to(device) for t in _inputs(n))
    batches = list(zip(x.split(batch), y.split(batch)))

    def infer():
        with torch.no_grad():
            for xb, _ in batches:
                model(xb)

    def every_net():
        for xb, _ in batches:
            model.forward_all(xb)

    def core_only():
        with torch.no_grad():
            for xb, _ in batches:
                model.core(xb)

    records = {}

    def certify(methods):
        def run():
            settings = CertifySettings(methods=methods, gate_methods=methods, refine_methods=())
            parts = [certify_batch(model, xb, yb, eps, settings) for xb, yb in batches]
            records[tuple(methods)] = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
        return run

    def timed(fn):  # one warm-up call (and BoundedModule construction)
        return time_fn(fn, reps, warmup=1, device=device)

    out = {"model": origin, "device": str(device), "inputs": n, "batch": batch, "eps": eps,
           "threshold": float(model.thresholds[0])}
    out["plain_inference"] = timed(infer)
    out["every_net_on_every_input"] = timed(every_net)
    out["core_on_every_input"] = timed(core_only)
    with torch.no_grad():
        _, branch = model.route(x)
    out["routing_rate_to_cert"] = float((branch == 0).float().mean())
    for methods in (["IBP"], ["CROWN-IBP"], ["IBP", "CROWN-IBP"]):
        key = "certify_" + "+".join(methods)
        rec = timed(certify(methods))
        rec["ratio_to_plain_inference"] = rec["median_s"] / out["plain_inference"]["median_s"]
        rec["inputs_per_s"] = n / rec["median_s"]
        out[key] = rec
    out["plain_inference"]["inputs_per_s"] = n / out["plain_inference"]["median_s"]
    out["conditional_vs_core_ratio"] = out["plain_inference"]["median_s"] / out["core_on_every_input"]["median_s"]
    out["conditional_vs_every_net_ratio"] = (out["plain_inference"]["median_s"]
                                             / out["every_net_on_every_input"]["median_s"])
    cols = records[("IBP",)]
    cols = {**{k: v.astype(np.int64) if v.dtype == np.bool_ else v for k, v in cols.items()},
            "index": np.arange(n), "split": np.array(["test"] * n)}
    sweep_s = sweep_cost(Records(cols), repeats=reps)
    out["sweep"] = {"seconds": sweep_s,
                    "ratio_to_certification_IBP": sweep_s / out["certify_IBP"]["median_s"]}
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(measure(n=256, reps=2), indent=2))
