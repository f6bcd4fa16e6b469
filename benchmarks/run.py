"""`make bench`: every benchmark section, one JSON file in benchmarks/results/<date>.json and a
short table on stdout. Ratios are measured in this one process on the same batch; run it alone
(two cores: another busy process distorts absolute times far more than ratios).

Reading the JSON: ``sections.<name>.<case>.<variant>`` holds ``median_s`` (seconds per step,
median over ``reps`` after warm-up), ``min_s`` and ``ratio_to_plain`` (median / the plain
forward+backward step of the same net on the same batch). ``machine`` says where it ran.

``gpu`` holds the same sections measured on the GPU (``gpu.sections``) plus
``gpu.training_samples_per_s`` for the CIFAR-10 C3 and C5 cert-nets; without CUDA it is
``{"skipped": "CUDA not available"}`` unless ``--gpu-device`` forces the section onto a device.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

import torch

from ace_lightning.atomic import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ace_costs  # noqa: E402
import bound_step_cost  # noqa: E402
import demo_work  # noqa: E402
import lightning_overhead  # noqa: E402
import nets_cost  # noqa: E402
import stage_cost  # noqa: E402
from timing import cpu_capability, cpu_model, device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# (net, input shape, classes, eps) per case
BOUND_CASES = {
    "c3_cifar10_3x32x32": ("c3", (3, 32, 32), 10, 2 / 255),
    "small_fashion_mnist_1x28x28": ("small", (1, 28, 28), 10, 0.1),
}
# training throughput on a GPU: the CIFAR-10 C3 and C5 cert-nets (C5 measured on the GPU only)
C5_CASE = {"c5_cifar10_3x32x32": ("c5", (3, 32, 32), 10, 2 / 255)}
THROUGHPUT_CASES = ("c3_cifar10_3x32x32", *C5_CASE)
# skipped by --no-large (quick runs and the test of the GPU path)
LARGE_NETS = {"c5", "wrn", "resnet18", "efficientnet_b0"}
SECTIONS = ("bound_step_cost", "lightning_overhead", "ace_costs", "nets_cost", "stage_cost", "demo_work")


def bound_steps(batch: int, reps: int, device: torch.device, cases: dict = BOUND_CASES) -> dict:
    out = {}
    for case, (net, shape, classes, eps) in cases.items():
        print(f"[bench] bound step cost: {case} (batch {batch}, {reps} reps, {device})", flush=True)
        model = bound_step_cost.default_net(net, shape, classes)
        out[case] = bound_step_cost.measure(model, shape, classes, batch, eps=eps, reps=reps,
                                            device=device)
    return out


def measure_sections(wanted, batch: int, reps: int, device: torch.device, large: bool = True,
                     bound_cases: dict = BOUND_CASES, demo_stages: bool = True) -> dict:
    """The sections in ``wanted`` on ``device``: the same figures on CPU and on a GPU."""
    sections: dict = {}
    if "bound_step_cost" in wanted:
        sections["bound_step_cost"] = bound_steps(batch, reps, device, bound_cases)
    if "lightning_overhead" in wanted:
        print(f"[bench] Lightning cert step vs bare loop ({device})", flush=True)
        sections["lightning_overhead"] = {
            "small_fashion_mnist_ibp": lightning_overhead.measure(batch=batch, steps=reps + 7,
                                                                  device=device),
            "c3_cifar10_ibp": lightning_overhead.measure("c3", (3, 32, 32), batch=batch, eps=2 / 255,
                                                         steps=reps + 7, device=device)}
    if "ace_costs" in wanted:
        print(f"[bench] composed model: certification, conditional execution, sweep, memory ({device})",
              flush=True)
        # 1024 inputs in batches of 256 at the default batch 128
        sections["ace_costs"] = {"fashion_mnist_demo": ace_costs.measure(
            n=8 * batch, batch=2 * batch, reps=reps, device=device)}
    if "nets_cost" in wanted:
        print(f"[bench] forward+backward per net ({device})", flush=True)
        names = {c["name"] for c in nets_cost.cases()} - (set() if large else LARGE_NETS)
        # the TinyImageNet WRN takes minutes per step at batch 128 on 2 cores: its own small batch
        own_batch = {"wrn"} & names if device.type == "cpu" else set()
        sections["nets_cost"] = nets_cost.measure_all(batch=batch, reps=reps, only=sorted(names - own_batch),
                                                      device=device)
        if own_batch:
            sections["nets_cost"].update(nets_cost.measure_all(batch=16, reps=2, only=sorted(own_batch),
                                                               device=device))
    if "stage_cost" in wanted and demo_stages:  # the demo's CPU stages (not part of the GPU section)
        print("[bench] the demo's stages against their arithmetic (stage step / bare loop; certify / its "
              "certification pass)", flush=True)
        sections["stage_cost"] = stage_cost.measure()
    if "demo_work" in wanted and demo_stages:  # counted from the configs (+ wall times of run folders)
        print("[bench] the demo's work in training steps, against experiment=demo_fmnist_full", flush=True)
        sections["demo_work"] = demo_work.measure(before_dir=demo_work.ROOT / "runs" / "demo_fmnist_full" / "eps_0.1")
    return sections


def gpu_section(device: torch.device, wanted, batch: int, reps: int, large: bool = True) -> dict:
    """The CPU figures again on ``device``, plus training samples/s of the CIFAR-10 C3 and C5
    cert-nets (C5 only with ``large``). ``is_gpu_run`` is false when forced onto a non-CUDA device."""
    is_gpu = device.type == "cuda"
    out = {"device": str(device), "device_name": device_name(device), "is_gpu_run": is_gpu}
    if not is_gpu:
        print(f"[bench] GPU section forced onto {device}: exercises its code path, not a GPU run")
        out["note"] = f"forced with --gpu-device {device}: the GPU section's code path, not a GPU run"
    out["sections"] = measure_sections(wanted, batch, reps, device, large,
                                       {**BOUND_CASES, **(C5_CASE if large else {})}, demo_stages=False)
    steps = out["sections"].get("bound_step_cost", {})
    out["training_samples_per_s"] = {case: {v: rec["samples_per_s"] for v, rec in steps[case].items()}
                                     for case in THROUGHPUT_CASES if case in steps}
    return out


def print_tables(sections: dict, where: str) -> None:
    if sections:
        print(f"\n== {where}")
    if "bound_step_cost" in sections:
        print(f"\n{'case':32s} {'variant':24s} {'median s':>10s} {'x plain':>8s} {'samples/s':>10s}")
        for case, variants in sections["bound_step_cost"].items():
            for name, rec in variants.items():
                print(f"{case:32s} {name:24s} {rec['median_s']:10.4f} {rec['ratio_to_plain']:8.2f} "
                      f"{rec['samples_per_s']:10.0f}")
    if "lightning_overhead" in sections:
        print(f"\n{'Lightning vs bare loop':32s} {'bare s':>10s} {'lightning s':>12s} {'ratio':>8s}")
        for case, rec in sections["lightning_overhead"].items():
            print(f"{case:32s} {rec['bare_loop_step_s']:10.4f} {rec['lightning_step_s']:12.4f} "
                  f"{rec['ratio_lightning_to_bare']:8.2f}")
    if "stage_cost" in sections:
        sc = sections["stage_cost"]
        print(f"\n{'demo stage vs its arithmetic':32s} {'bare s':>10s} {'stage s':>12s} {'ratio':>8s} "
              f"{'(mean: bare':>12s} {'stage':>8s} {'ratio)':>7s}")
        for name in ("core", "core_channels_last", "cert", "gate"):
            rec = sc[name]
            if "skipped" in rec:
                print(f"{name} training step: skipped ({rec['skipped']})")
                continue
            print(f"{name + ' training step':32s} {rec['bare_loop_step_s']:10.4f} {rec['stage_step_s']:12.4f} "
                  f"{rec['ratio_stage_to_bare']:8.2f} {rec['bare_loop_step_mean_s']:12.4f} "
                  f"{rec['stage_step_mean_s']:8.4f} {rec['ratio_stage_to_bare_mean']:7.2f}")
        c = sc["certify"]
        if "skipped" in c:
            print(f"certify: skipped ({c['skipped']})")
        else:
            print(f"{'certify wall / certification':32s} {c['certification_pass_s']:10.2f} {c['wall_s']:12.2f} "
                  f"{c['ratio_wall_to_certification']:8.2f}")
    if "demo_work" in sections:
        d = sections["demo_work"]
        print(f"\n{'demo work (training steps)':32s} {'now':>10s} {'before':>10s}")
        for name in dict.fromkeys([*d["demo"]["stages"], *d["demo_before"]["stages"]]):
            now, was = d["demo"]["stages"].get(name, {}), d["demo_before"]["stages"].get(name, {})
            if "train_steps" in now or "train_steps" in was:
                print(f"{name:32s} {now.get('train_steps', 0):10d} {was.get('train_steps', 0):10d}")
        print(f"{'all stages':32s} {d['demo']['train_steps']:10d} {d['demo_before']['train_steps']:10d} "
              f"(ratio {d['ratio_train_steps']:.2f})")
        for key in ("demo", "demo_before"):
            if "wall_s" in d[key]:
                print(f"{key} wall time from its run folder: {d[key]['wall_s']:.0f} s")
    if "ace_costs" in sections:
        a = sections["ace_costs"]["fashion_mnist_demo"]
        print(f"\ncomposed model ({a['model']}), routing rate to cert-net {a['routing_rate_to_cert']:.2f}:")
        for k in ("certify_IBP", "certify_CROWN-IBP"):
            print(f"  {k:22s} {a[k]['inputs_per_s']:9.0f} inputs/s  {a[k]['ratio_to_plain_inference']:6.2f}x plain inference")
        print(f"  conditional execution {a['conditional_vs_core_ratio']:6.2f}x the core on every input; "
              f"sweep {100 * a['sweep']['ratio_to_certification_IBP']:.3f}% of certification")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="ace-lightning benchmarks")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=None,
                        help="run only these sections (default: all), on CPU and on the GPU")
    parser.add_argument("--gpu-device", default=None,
                        help="run the GPU section on this device even without CUDA (e.g. cpu: tests "
                             "its code path; the JSON then says is_gpu_run: false)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU sections")
    parser.add_argument("--no-large", dest="large", action="store_false",
                        help="skip the C5 cert-net and the large nets (WRN, ResNet-18, EfficientNet-B0)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    wanted = args.only or SECTIONS
    cpu = torch.device("cpu")
    sections = {} if args.gpu_only else measure_sections(wanted, args.batch, args.reps, cpu, args.large)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_model": cpu_model(), "cpu_capability": cpu_capability(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "sections": sections,
    }
    gpu = args.gpu_device or ("cuda" if torch.cuda.is_available() else None)
    if gpu is None:
        print("[bench] CUDA not available: GPU section skipped")
        result["gpu"] = {"skipped": "CUDA not available"}
    else:
        device = torch.device(gpu)
        if device.type == "cuda" and device.index is None:  # the JSON names the card
            device = torch.device("cuda", torch.cuda.current_device())
        result["gpu"] = gpu_section(device, wanted, args.batch, args.reps, args.large)
    path = args.out or RESULTS / f"{dt.date.today().isoformat()}.json"
    atomic_write_text(path, json.dumps(result, indent=2))
    print_tables(sections, "CPU")
    if "sections" in result["gpu"]:
        print_tables(result["gpu"]["sections"], f"GPU section on {result['gpu']['device']} "
                                                f"({result['gpu']['device_name']})")
        for case, rates in result["gpu"]["training_samples_per_s"].items():
            print(f"training samples/s {case}: " + ", ".join(f"{v} {r:.0f}" for v, r in rates.items()))
    print(f"\nwritten {path}")
    return path


if __name__ == "__main__":
    main()
