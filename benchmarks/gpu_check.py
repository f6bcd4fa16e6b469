"""`make gpu-check`: everything that only a GPU can show, in one prepared run (at most 8 minutes
on one GPU), written to benchmarks/results/gpu-check-<date>.json.

Steps (each timed; a failing step is recorded and the others still run; exit code 1 if any failed):
1. data: Fashion-MNIST-format IDX files generated in a temporary folder (class-dependent patterns,
   learnable), read by the real dataset class, no download;
2. a few training steps of every stage through the real configs: core (16-mixed on CUDA), cert
   with IBP, CROWN-IBP, SABR and MTL-IBP (with Shi et al.'s init and regulariser: the pipeline's
   cert-net), the gate;
3. the certify stage on the device on 2,000 inputs (CUDA; fewer on CPU), then the same inputs
   certified on the CPU: cert_ok must be identical and g, lb_g, ub_g within 1e-4;
4. one cert stage with trainer=ddp on the visible GPUs (ddp_cpu: 2 gloo processes on CPU);
5. the benchmarks' GPU section (benchmarks/run.py --gpu-only --no-large).

`make gpu-check DEVICE=cpu` runs the same steps on the CPU with smaller sizes (under 3 minutes on
two cores; tests/test_gpu_check.py runs it so the script cannot rot between GPU runs). On a GPU
machine without hydra-core, omegaconf or auto-LiRPA, `make gpu-check` first installs them with
--no-deps from gpu-wheels/ (`make gpu-wheels` on a machine with the package registries).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOLERANCE = 1e-4  # g, lb_g, ub_g: device vs CPU
SIZES = {"cuda": {"train": 4000, "val": 1000, "test": 1000, "batches": 30},
         "cpu": {"train": 400, "val": 100, "test": 100, "batches": 7}}


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def make_data(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Fashion-MNIST's four IDX files: class c is a bright bar at row band c plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 90, (n, 28, 28))
        for c in range(10):
            images[labels == c, 2 + 2 * c:4 + 2 * c, 4:24] += 150
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.clip(images, 0, 255))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def run_inprocess(overrides: list[str]) -> tuple[bool, float, str, dict]:
    """One stage through the real configs in this process (imports once: a subprocess per stage
    costs about 10 s of imports on two CPU cores). Returns (ok, seconds, error text, manifest)."""
    import traceback

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ace_lightning.registry import run_stage
    from ace_lightning.config import CONF_DIR

    t0 = time.perf_counter()
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        manifest = run_stage(cfg)
        return True, time.perf_counter() - t0, "", manifest
    except Exception:  # noqa: BLE001 - recorded in the JSON, the other steps still run
        return False, time.perf_counter() - t0, traceback.format_exc()[-3000:], {}


def run(cmd: list[str], env: dict, timeout: int) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        ok, out = res.returncode == 0, res.stdout + res.stderr
    except subprocess.TimeoutExpired as err:
        ok, out = False, f"timed out after {timeout} s: {err}"
    return ok, time.perf_counter() - t0, out


def compare_records(device_csv: Path, cpu_csv: Path) -> dict:
    """cert_ok identical and |g|, |lb_g|, |ub_g| differences <= TOLERANCE per (split, index)."""
    sys.path.insert(0, str(ROOT / "src"))
    from ace_lightning.records import load_records

    a, b = load_records(device_csv), load_records(cpu_csv)
    key = lambda r: [f"{s}:{i}" for s, i in zip(r["split"], r["index"])]  # noqa: E731
    ka, kb = key(a), key(b)
    if sorted(ka) != sorted(kb):
        return {"ok": False, "error": "the two passes certified different inputs"}
    order = np.argsort(ka)
    other = np.argsort(kb)
    out = {"inputs": len(ka)}
    out["cert_ok_identical"] = bool(np.array_equal(np.asarray(a["cert_ok"])[order], np.asarray(b["cert_ok"])[other]))
    for col in ("g", "lb_g", "ub_g"):
        x, y = np.asarray(a[col], float)[order], np.asarray(b[col], float)[other]
        finite = np.isfinite(x) & np.isfinite(y)
        same_inf = np.array_equal(x[~finite], y[~finite])
        out[f"max_abs_diff_{col}"] = float(np.max(np.abs(x[finite] - y[finite]))) if finite.any() else 0.0
        out[f"{col}_within_tolerance"] = bool(same_inf and out[f"max_abs_diff_{col}"] <= TOLERANCE)
    out["ok"] = out["cert_ok_identical"] and all(out[f"{c}_within_tolerance"] for c in ("g", "lb_g", "ub_g"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu-check-<date>.json)")
    parser.add_argument("--step-timeout", type=int, default=240, help="seconds per step")
    parser.add_argument("--skip-bench", action="store_true", help="leave out the benchmarks' GPU section")
    args = parser.parse_args(argv)
    sizes = SIZES[args.device]
    started = time.perf_counter()
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    result: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": args.device,
                    "python": sys.version.split()[0], "steps": {}}
    try:
        import torch

        result["torch"] = torch.__version__
        if args.device == "cuda":
            if not torch.cuda.is_available():
                print("gpu-check: CUDA is not available here (use DEVICE=cpu for the CPU mode)", file=sys.stderr)
                return 2
            result["cuda"] = {"devices": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0),
                              "capability": list(torch.cuda.get_device_capability(0)),
                              "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    except ImportError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ace-gpu-check-"))
    try:
        data = make_data(work / "data", sizes["train"], sizes["test"])
        accel = "gpu" if args.device == "cuda" else "cpu"
        common = ["data=fashion_mnist", f"data.data_dir={data}", "data.download=false",
                  f"data.val_size={sizes['val']}", "data.num_workers=0", "data.batch_size=64", "eps=0.02",
                  f"runs_root={work / 'runs'}", "trainer.enable_progress_bar=false", f"trainer.accelerator={accel}",
                  f"trainer.limit_train_batches={sizes['batches']}", "trainer.limit_val_batches=2",
                  "net@cert_net=small", "net@core_net=small_cnn"]
        cert = ["stage=cert", "stage.epochs=2", "stage.warmup_epochs=0.5", "stage.ramp_epochs=1",
                "stage.val_pgd_steps=2"]
        os.environ.update({k: env[k] for k in ("WANDB_MODE", "HYDRA_FULL_ERROR")})
        sys.path.insert(0, str(ROOT / "src"))
        train = [sys.executable, "-m", "ace_lightning.train"]
        stages = {
            "core_16_mixed": [*common, "run_name=main", "stage=core", "stage.epochs=1", "stage.eval_pgd_steps=2"],
            "cert_ibp": [*common, "run_name=ibp", *cert, "stage.method=IBP"],
            "cert_crown_ibp": [*common, "run_name=crown", *cert, "stage.method=CROWN-IBP"],
            "cert_sabr": [*common, "run_name=sabr", *cert, "stage.method=SABR", "stage.sabr_lambda=0.4"],
            "cert_mtl_ibp": [*common, "run_name=main", *cert, "stage.method=MTL-IBP", "stage.alpha=0.3",
                             "stage.shi_init=true", "stage.shi_regularizer=true"],
            "gate": [*common, "run_name=main", "stage=gate", "stage.epochs=1", "stage.ramp_epochs=1"],
            "certify": [*common, "run_name=main", "stage=certify", "stage.attack.steps=5",
                        "stage.methods=[IBP,CROWN-IBP,CROWN]", "stage.refine_methods=[CROWN]"],
        }
        for name, overrides in stages.items():
            ok, secs, out, manifest = run_inprocess(overrides)
            step = {"ok": ok, "seconds": round(secs, 1), "precision": manifest.get("precision"),
                    "metrics": manifest.get("metrics")}
            if name == "core_16_mixed" and args.device == "cuda":
                step["ok"] = ok and manifest.get("precision") == "16-mixed"
            if not ok:
                step["log_tail"] = out
            result["steps"][name] = step
            print(f"[gpu-check] {name}: {'ok' if step['ok'] else 'FAILED'} ({secs:.1f} s)", flush=True)
        # the same inputs certified on the CPU
        main_dir = work / "runs" / "main"
        device_records = main_dir / "certify" / "records.csv"
        if device_records.is_file():
            cpu_root = work / "cpu_runs"
            shutil.copytree(main_dir, cpu_root / "main", ignore=shutil.ignore_patterns("certify"))
            cpu_common = [c.replace(str(work / "runs"), str(cpu_root)) if c.startswith("runs_root=") else c
                          for c in stages["certify"]]
            cpu_common = [c for c in cpu_common if not c.startswith("trainer.accelerator=")] + ["trainer.accelerator=cpu"]
            ok, secs, out, _ = run_inprocess(cpu_common)
            step = {"ok": ok, "seconds": round(secs, 1)}
            if ok:
                step.update(compare_records(device_records, cpu_root / "main" / "certify" / "records.csv"))
                manifest = json.loads((main_dir / "certify" / "manifest.json").read_text())
                step["device_precision"] = manifest.get("precision")
                step["device_timing_s"] = manifest.get("timing_s")
            else:
                step["log_tail"] = out
            result["steps"]["certify_on_cpu_matches"] = step
            print(f"[gpu-check] certify_on_cpu_matches: {'ok' if step['ok'] else 'FAILED'}", flush=True)
        # DDP on the visible devices
        if args.device == "cuda":
            import torch

            ddp = ["trainer=ddp", f"trainer.devices={torch.cuda.device_count()}"]
        else:
            ddp = ["trainer=ddp_cpu"]
        ok, secs, out = run(train + [*common, "run_name=ddp", *cert, *ddp], env, args.step_timeout)
        result["steps"]["cert_ddp"] = {"ok": ok, "seconds": round(secs, 1), "strategy": ddp,
                                       **({} if ok else {"log_tail": out[-3000:]})}
        print(f"[gpu-check] cert_ddp: {'ok' if ok else 'FAILED'} ({secs:.1f} s)", flush=True)
        if not args.skip_bench:
            bench_json = work / "bench.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--gpu-only", "--no-large", "--reps", "3",
                   "--out", str(bench_json)]
            if args.device == "cpu":
                cmd += ["--gpu-device", "cpu", "--batch", "8", "--reps", "1"]
            ok, secs, out = run(cmd, env, args.step_timeout)
            step = {"ok": ok, "seconds": round(secs, 1)}
            if ok:
                step["result"] = json.loads(bench_json.read_text()).get("gpu")
            else:
                step["log_tail"] = out[-3000:]
            result["steps"]["bench_gpu_section"] = step
            print(f"[gpu-check] bench_gpu_section: {'ok' if ok else 'FAILED'} ({secs:.1f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["ok"] = all(s["ok"] for s in result["steps"].values())
    out = args.out or RESULTS / f"gpu-check-{dt.date.today().isoformat()}{'' if args.device == 'cuda' else '-cpu'}.json"
    sys.path.insert(0, str(ROOT / "src"))
    from ace_lightning.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"[gpu-check] {'all steps ok' if result['ok'] else 'FAILED steps: ' + ', '.join(k for k, s in result['steps'].items() if not s['ok'])}"
          f" in {result['seconds']:.0f} s -> {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
