"""The console as a user sees it: a tiny core stage through the real CLI prints each line once, no
advertisement, and no warning outside an allow-list; plus the console's parts in process (one
handler whatever the number of setup calls, rank zero only, progress bars that follow
enable_progress_bar, auto_LiRPA's import leaving logging and the warning filters alone)."""
from __future__ import annotations

import collections
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ace_lightning import console

# what a user's shell has: no PYTHONWARNINGS (pytest's filterwarnings never reach a subprocess)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
ENV.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0",
           CUDA_VISIBLE_DEVICES="")  # no "GPU available but not used" on a GPU machine

# the progress bar stays on (the default), log_every_n_steps stays at its default (50 > the 3
# training batches): what a user's quick run looks like
TINY_CORE = ["stage=core", "data=synthetic", "data.subset=96", "data.val_size=64", "data.batch_size=32",
             "data.num_workers=0", "trainer.accelerator=cpu", "net@core_net=small_cnn", "eps=0.03",
             "stage.epochs=1", "stage.eval_pgd_steps=2"]

# categories a user may see; everything else (deprecations, FutureWarning, PossibleUserWarning, a
# warning printed without its category) is a leak
ALLOWED = {"UserWarning"}
ALLOWED_MESSAGES = {"PossibleUserWarning": ("GPU available but not used",)}  # MPS on a Mac: true
WARNING_LINE = re.compile(r"^(?P<where>\S.*?):\d+: (?:(?P<category>[A-Z]\w*(?:Warning|Error)): )?(?P<message>.*)$")
TORCH_LOG_WARNING = re.compile(r"^[WE]\d{4} \d\d:\d\d:\d\d")  # torch's own logging: W1202 03:50:43.656 ...


# the same event through another handler differs only by its prefix: Hydra's job logging
# "[2026-01-01 12:00:00,000][lightning.pytorch.utilities.rank_zero][INFO] - ", Lightning's "INFO: "
PREFIX = re.compile(r"^(\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - |(DEBUG|INFO|WARNING|ERROR): )")


def printed_lines(text: str) -> list[str]:
    """Non-empty lines without their logging prefix; progress-bar redraws (anything with a
    carriage return) left out."""
    return [PREFIX.sub("", line.rstrip()) for line in text.split("\n") if line.strip() and "\r" not in line]


def warnings_in(lines: list[str]) -> list[tuple[str, str]]:
    """(category, line) of every warning printed: Python's ``path:line: Category: message``, a
    ``path.py:line: message`` without category (Lightning's format), torch's log warnings."""
    found = []
    for line in lines:
        m = WARNING_LINE.match(line)
        if m and re.search(r"\.py$", m["where"]):
            found.append((m["category"] or "uncategorised", line))
        elif TORCH_LOG_WARNING.match(line):
            found.append(("torch log warning", line))
    return found


def test_a_tiny_stage_prints_each_line_once_without_ads_or_stray_warnings(tmp_path):
    cmd = [sys.executable, "-m", "ace_lightning.train", *TINY_CORE, f"runs_root={tmp_path / 'runs'}"]
    # bytes: text mode would turn the progress bars' carriage returns into newlines
    res = subprocess.run(cmd, capture_output=True, env=ENV, cwd=tmp_path, timeout=600)
    stdout, stderr = (b.decode("utf-8", "replace") for b in (res.stdout, res.stderr))
    out = stdout + stderr
    assert res.returncode == 0, out[-3000:]
    lines = printed_lines(stdout) + printed_lines(stderr)
    twice = {line: n for line, n in collections.Counter(lines).items() if n > 1}
    assert not twice, f"printed more than once: {twice}\n---\n{out[-3000:]}"
    assert not re.search(r"litlogger|litmodels|Tip:", out), out[-3000:]
    leaks = [(cat, line) for cat, line in warnings_in(lines)
             if cat not in ALLOWED and not any(m in line for m in ALLOWED_MESSAGES.get(cat, ()))]
    assert not leaks, leaks
    # the events themselves are still there, once, and in Hydra's log file of the job
    assert sum("stage 'core' complete" in line for line in lines) == 1, out[-3000:]
    assert sum("GPU available: False" in line for line in lines) == 1, out[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "runs").rglob("*.log"))
    assert "stage 'core' complete" in logs and "`Trainer.fit` stopped" in logs and "Tip:" not in logs


def test_importing_the_bound_layer_leaves_logging_and_warnings_alone():
    """auto_LiRPA's import called logging.basicConfig(stream=sys.stdout) and
    warnings.simplefilter('once') (a filter over every warning of every module, in front of all
    others), and printed torch's deprecation and CUDA_HOME lines."""
    code = ("import logging, warnings\n"
            "import ace_lightning.bounds\n"
            "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
            "catch_all = [f for f in warnings.filters if f[1] is None and f[2] is Warning and f[3] is None]\n"
            "assert not catch_all, catch_all\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == "" and res.stderr == "", (res.stdout, res.stderr)


@pytest.fixture
def fresh_console():
    """The package logger and warnings.showwarning as they were, after the test."""
    handlers, propagate = list(console.log.handlers), console.log.propagate
    showwarning = __import__("warnings").showwarning
    yield
    console.log.handlers[:] = handlers
    console.log.propagate = propagate
    __import__("warnings").showwarning = showwarning


def test_setup_is_idempotent_and_logs_once_to_stdout(fresh_console, capsys):
    for _ in range(3):
        console.setup_console()
    assert sum(isinstance(h, console.ConsoleHandler) for h in console.log.handlers) == 1
    assert console.log.propagate is False and logging.getLogger("lightning").propagate is False
    console.log.info("hello once")
    logging.getLogger("ace_lightning.nets.core").warning("careful")
    out, err = capsys.readouterr()
    assert out == "hello once\n" and err == "warning: careful\n"


def test_only_rank_zero_writes(fresh_console, capsys, monkeypatch):
    console.setup_console()
    monkeypatch.setattr(console, "global_rank", lambda: 1)
    console.log.info("from rank 1")
    assert capsys.readouterr() == ("", "")
    assert list(console.progress([1, 2], True)) == [1, 2]


def test_lightning_advertisement_is_dropped():
    record = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1,
                               "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
                               "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger", None, None)
    assert not console.AdvertisementFilter().filter(record)
    record.msg = "GPU available: False, used: False"
    assert console.AdvertisementFilter().filter(record)
    assert any(isinstance(f, console.AdvertisementFilter)
               for f in logging.getLogger("lightning.pytorch.utilities.rank_zero").filters)


def test_progress_follows_enable_progress_bar(monkeypatch):
    items = [1, 2, 3]
    assert console.progress(items, False) is items
    monkeypatch.setattr(console, "global_rank", lambda: 0)
    bar = console.progress(items, True, desc="x", disable=True)
    assert bar is not items and list(bar) == items


def test_without_bars_a_long_step_says_what_it_is_doing(fresh_console, capsys):
    """Progress bars off (debug=tiny, CI): the step's description, once, on stdout."""
    console.setup_console()
    assert list(console.progress([1, 2, 3], False, desc="attack core")) == [1, 2, 3]
    assert list(console.progress(iter([1]), False, desc="refine")) == [1]  # no length: the name alone
    assert list(console.progress([1], False)) == [1]  # nothing to say without a description
    assert capsys.readouterr() == ("attack core: 3 batches\nrefine\n", "")


def test_progress_bars_go_to_stderr_tables_to_stdout(fresh_console, capsys):
    """console.progress and Lightning's bar (progress_bar_callbacks) write to stderr only: a table
    on stdout piped to a file stays clean."""
    import lightning as L
    import torch

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=console.progress_bar_callbacks(True))
    trainer.fit(Tiny(), data)
    list(console.progress([1, 2], True, desc="gate labels (train)"))
    out, err = capsys.readouterr()
    assert "Epoch 0" in err and "gate labels (train)" in err
    assert "Epoch" not in out and "gate labels" not in out and "\r" not in out
    assert console.progress_bar_callbacks(False) == []
