"""The GPU section of `make bench` (benchmarks/run.py), run on CPU with tiny sizes: its code path
and JSON keys, not its numbers."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive_finite(values) -> bool:
    values = list(values)
    return bool(values) and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def test_gpu_section_forced_on_cpu(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no demo run, no data: random weights and synthetic inputs
    out = tmp_path / "bench.json"
    bench.main(["--gpu-device", "cpu", "--gpu-only", "--no-large", "--batch", "4", "--reps", "1",
                "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["sections"] == {}
    # the machine: which CPU kernels ran (one seed's weights differ between AVX2 and AVX512 machines)
    assert res["machine"]["cpu_model"] and res["machine"]["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR",
                                                                                  "VSX", "SVE256", "unknown")
    gpu = res["gpu"]
    assert gpu["device"] == "cpu" and gpu["is_gpu_run"] is False and "not a GPU run" in gpu["note"]
    s = gpu["sections"]
    assert set(s) == set(bench.SECTIONS) - {"stage_cost", "demo_work"}  # the demo's stages: CPU measurements

    steps = s["bound_step_cost"]
    assert set(steps) == set(bench.BOUND_CASES)  # no C5 with --no-large
    for variants in steps.values():
        assert set(variants) == {"plain", "IBP", "CROWN-IBP", "CROWN-IBP loss fusion"}
        assert all("peak_rss_mb" in rec for rec in variants.values())
    assert _positive_finite(rec[k] for v in steps.values() for rec in v.values()
                            for k in ("ratio_to_plain", "samples_per_s"))

    assert set(s["lightning_overhead"]) == {"small_fashion_mnist_ibp", "c3_cifar10_ibp"}
    assert _positive_finite(r["ratio_lightning_to_bare"] for r in s["lightning_overhead"].values())
    assert all(r["device"] == "cpu" for r in s["lightning_overhead"].values())

    a = s["ace_costs"]["fashion_mnist_demo"]
    assert a["device"] == "cpu" and a["inputs"] == 32
    assert _positive_finite([a[f"certify_{m}"]["ratio_to_plain_inference"]
                             for m in ("IBP", "CROWN-IBP", "IBP+CROWN-IBP")]
                            + [a["conditional_vs_core_ratio"], a["conditional_vs_every_net_ratio"],
                               a["sweep"]["ratio_to_certification_IBP"]])

    assert not {rec["name"] for rec in s["nets_cost"].values()} & bench.LARGE_NETS
    assert _positive_finite(rec["median_s"] for rec in s["nets_cost"].values())

    rates = gpu["training_samples_per_s"]
    assert list(rates) == ["c3_cifar10_3x32x32"]
    assert {"plain", "IBP", "CROWN-IBP"} <= set(rates["c3_cifar10_3x32x32"])
    assert _positive_finite(rates["c3_cifar10_3x32x32"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU section runs")
def test_gpu_section_skipped_without_cuda(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--gpu-only", "--out", str(out)])
    assert json.loads(out.read_text())["gpu"] == {"skipped": "CUDA not available"}
    assert "CUDA not available: GPU section skipped" in capsys.readouterr().out


def test_demo_work_counts_the_steps_of_both_demos(bench):  # bench: benchmarks/ on sys.path
    """benchmarks/demo_work.py: training steps from the configs (epochs x batches of the real
    Fashion-MNIST training split); the demo is at most half the work of the one before it."""
    import demo_work

    out = demo_work.measure(run_dir=Path("/nonexistent"), before_dir=None)
    now, before = out["demo"], out["demo_before"]
    assert now["train_batches"] == before["train_batches"] == 430  # 55,000 training inputs, batch 128
    assert set(now["stages"]) == {"core", "cert", "certify"} and "gate" in before["stages"]
    assert now["train_steps"] == sum(now["stages"][s]["train_steps"] for s in ("core", "cert"))
    assert before["stages"]["cert"]["train_steps"] == 24 * 430
    assert out["ratio_train_steps"] == now["train_steps"] / before["train_steps"] <= 0.5
    assert now["stages"]["cert"]["val_attack_steps_max"] == now["stages"]["cert"]["val_batches"] * 5
    assert now["val_attack_steps_max"] == sum(r.get("val_attack_steps_max", 0) for r in now["stages"].values())
    assert out["ratio_train_and_val_attack_steps"] <= 0.55
    # the composed attack at one point in both: the exported per-class point; the gate's natural-within-1-pt
    assert now["stages"]["certify"]["attack_points"] == ["per_class"]
    assert before["stages"]["certify"]["attack_points"] == ["nat_within_1pt", "per_class"]
    assert "wall_s" not in now and "ratio_wall" not in out  # no run folder, nothing run: no times
