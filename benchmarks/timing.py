"""Clock and peak memory for the benchmark sections, on CPU or a CUDA device.

CUDA kernels run asynchronously: a clock read without ``torch.cuda.synchronize()`` times the
launch, not the work, so every clock read here waits for the device first. Peak memory is the CUDA
allocator's peak on a GPU and the process's peak resident set (Linux VmHWM) on CPU; both are reset
before each case so that each case gets its own peak.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels use (DEFAULT, AVX2, AVX512): machines of one
    kind differ here, and with it the float sums, hence the trained weights, of one seed."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        return "unknown"


def device_name(device: torch.device | str = "cpu") -> str:
    return torch.cuda.get_device_name(device) if _is_cuda(device) else cpu_model()


def reset_peak_rss() -> None:
    """Linux: reset the process's peak resident set size (VmHWM)."""
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


def clock(device: torch.device | str = "cpu") -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device | str = "cpu") -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory(device: torch.device | str = "cpu") -> dict:
    """``{"peak_cuda_mb": ...}`` on a CUDA device, ``{"peak_rss_mb": ...}`` on CPU."""
    if _is_cuda(device):
        return {"peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mb": peak_rss_mb()}


def time_fn(fn: Callable[[], object], reps: int, warmup: int = 1,
            device: torch.device | str = "cpu") -> dict:
    """Median and min seconds of ``fn`` over ``reps`` calls after ``warmup`` calls, and the peak
    memory of the timed calls."""
    for _ in range(warmup):
        fn()
    reset_peak(device)
    times = []
    for _ in range(reps):
        t0 = clock(device)
        fn()
        times.append(clock(device) - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps,
            **peak_memory(device)}
