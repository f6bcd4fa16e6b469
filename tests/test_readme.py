"""The README's Python section runs as written (so it cannot rot): its ```python block under "The
composed model in Python", on a tiny run folder of this test's own in place of make demo's."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ace_lightning.config import CONF_DIR
from ace_lightning.registry import run_stage

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO_RUN = "runs/demo_fmnist/eps_0.1"  # the run folder the README's snippet names

TINY_PIPELINE = ["stage=pipeline", "debug=tiny", "net@cert_net=fc", "net@core_net=fc", "eps=0.05",
                 "+stage_overrides.core.epochs=1", "+stage_overrides.core.eval_pgd_steps=1",
                 "+stage_overrides.cert.epochs=1", "+stage_overrides.cert.warmup_epochs=0",
                 "+stage_overrides.cert.ramp_epochs=1", "+stage_overrides.cert.val_pgd_steps=1",
                 "++stage_overrides.certify.selection=margin",  # make demo's selection
                 "++stage_overrides.certify.attack.steps=2"]


def readme_python(heading: str) -> str:
    """The first ```python block after the heading."""
    text = README.read_text()
    section = text.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_the_readme_python_section_runs_on_a_run_folder(tmp_path, monkeypatch):
    code = readme_python("### The composed model in Python")
    assert DEMO_RUN in code and "predict(" in code and "branch" in code
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"runs_root={tmp_path}", "run_name=demo", *TINY_PIPELINE])
    run_stage(cfg)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(DEMO_RUN, str(tmp_path / "demo")), str(README), "exec"), namespace)
    out, x, y = namespace["out"], namespace["x"], namespace["y"]
    assert x.shape == (16, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert out["labels"].shape == y.shape and set(out["branch"].tolist()) <= {0, 1}
    assert out["certified"].dtype == torch.bool and out["certified"].shape == y.shape
    lines = printed.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["correct", "cert-net", "certified"], lines
