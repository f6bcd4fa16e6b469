"""`make gpu-check DEVICE=cpu`: the GPU check's script on the CPU, so it cannot rot between GPU
runs (the benchmarks' GPU section it ends with is tested in test_bench_gpu_path.py). Slow: a
minute of one core, the largest single test; `make test-all` and every GPU session run it."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_gpu_check_on_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    res = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", f"ARGS=--out {out} --skip-bench"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["device"] == "cpu"
    assert set(result["steps"]) == {"core_16_mixed", "cert_ibp", "cert_crown_ibp", "cert_sabr", "cert_mtl_ibp",
                                    "gate", "certify", "certify_on_cpu_matches", "cert_ddp"}
    match = result["steps"]["certify_on_cpu_matches"]
    assert match["cert_ok_identical"] and match["inputs"] == 200
    assert all(match[f"max_abs_diff_{c}"] <= 1e-4 for c in ("g", "lb_g", "ub_g"))
    assert match["device_precision"]["dtype"] == "float32"
    assert result["steps"]["cert_mtl_ibp"]["metrics"]["test/cert_acc"] > 0  # the pipeline's cert-net certifies
