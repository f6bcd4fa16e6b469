"""The package installs without a clone: a wheel (configs inside), console scripts, a tiny stage
run from a folder outside the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def test_wheel_installs_into_a_fresh_venv_and_runs_a_stage_outside_the_clone(tmp_path):
    # build from a copy of the sources (the clone stays untouched)
    src = tmp_path / "src_copy"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."], src)
    wheel = next(dist.glob("ace_lightning-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for cfg in ("conf/train.yaml", "conf/certify.yaml", "conf/stage/pipeline.yaml", "conf/debug/tiny.yaml",
                "conf/hydra/launcher/slurm_ddp.yaml", "conf/experiment/demo_fmnist.yaml"):
        assert f"ace_lightning/{cfg}" in names, cfg
    assert any(n.endswith("entry_points.txt") for n in names)

    # a fresh venv that reuses this environment's pinned stack (torch, lightning, ...: no download)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path).stdout.strip())
    (site / "_reuse_pinned_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH="")
    where = _run([str(py), "-c", "import ace_lightning, sys; print(ace_lightning.__file__)"], outside, env).stdout
    assert str(venv) in where and str(ROOT) not in where  # the wheel's copy, not the clone's
    help_text = _run([str(venv / "bin" / "ace-train"), "--help"], outside, env).stdout
    assert "ace-train" in help_text and "pipeline" in help_text.split("stage: ", 1)[1].splitlines()[0]
    assert "action" in _run([str(venv / "bin" / "ace-certify"), "--help"], outside, env).stdout

    _run([str(venv / "bin" / "ace-train"), "stage=core", "debug=tiny", "net@core_net=fc", "eps=0.03",
          "++stage_overrides.core.epochs=1", "++stage_overrides.core.eval_pgd_steps=1", "runs_root=runs"], outside, env)
    manifest = json.loads((outside / "runs" / "synthetic" / "eps_0.03" / "core" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and (outside / "runs" / "synthetic" / "eps_0.03" / "core" / "core.pt").is_file()
