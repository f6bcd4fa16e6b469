"""The CLI as a user runs it (``python -m ace_lightning.cli action=...`` in a subprocess): sweep
and plot from records files, and bad input as one line ``error: ...`` with exit code 2 that leaves
every file already written as it was. Records are synthetic; no network is trained."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ace_lightning.records import load_records, save_records
from ace_lightning.sweep import sweep
from record_factory import synthetic_records

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "ace_lightning.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_sweep(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A folder as a sweep leaves it: records (val + test), a test-only records file, and the
    sweep outputs of the full records."""
    folder = tmp_path_factory.mktemp("swept")
    save_records(synthetic_records(400, seed=3), folder / "records.csv")
    save_records(synthetic_records(200, seed=4, splits=("test",)), folder / "test_only.csv")
    res = cli("action=sweep", f"records={folder / 'records.csv'}", "grid=21", cwd=folder.parent / "cwd0")
    assert res.returncode == 0, res.stderr[-3000:]
    return folder


def test_sweep_writes_the_files_with_the_numbers_of_sweep(written, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(written, folder)
    (folder / "pareto.png").unlink()
    res = cli("action=sweep", f"records={folder / 'records.csv'}", "grid=21", cwd=tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("sweep_val.csv", "sweep_test.csv", "operating_points.json", "pareto.png"):
        assert (folder / name).is_file(), name
    for split in ("val", "test"):
        assert read_sweep(folder / f"sweep_{split}.csv") == sweep(load_records(folder / "records.csv", split), 21)
    points = json.loads((folder / "operating_points.json").read_text())
    assert points["n_val"] + points["n_test"] == 400 and points["operating_points"]
    assert "natural" in res.stdout and "certified" in res.stdout and "core alone" in res.stdout
    assert list((tmp_path / "cwd").iterdir()) == []  # Hydra left nothing in the working directory


def test_sweep_of_one_split_with_a_threshold_list_into_another_folder(written, tmp_path):
    out = tmp_path / "out"
    res = cli("action=sweep", f"records={written / 'records.csv'}", "split=test", "grid=[-0.5,0.0,0.5]",
              f"out_dir={out}", cwd=tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["operating_points.json", "pareto.png", "sweep_test.csv"]
    want = sweep(load_records(written / "records.csv", "test"), [-0.5, 0.0, 0.5])
    assert read_sweep(out / "sweep_test.csv") == want
    assert res.stderr.strip().startswith("warning: no 'val' records")  # one line, not a traceback


def test_plot_redraws_the_pareto_png(written, tmp_path):
    out = tmp_path / "plots" / "pareto.png"
    res = cli("action=plot", f"sweep={written / 'sweep_test.csv'}", f"sweep_val={written / 'sweep_val.csv'}",
              f"points={written / 'operating_points.json'}", f"out={out}", cwd=tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-3000:]
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (800, 600)


BAD = {
    "records file missing": (["action=sweep", "records={d}/nope.csv", "out_dir={d}"], "records file not found"),
    "split not in records": (["action=sweep", "records={d}/test_only.csv", "split=val", "out_dir={d}"],
                             "hold split(s) {'test'}, not 'val'"),
    # test-only records: a sweep that got as far as writing would first remove sweep_val.csv
    "empty grid list": (["action=sweep", "records={d}/test_only.csv", "grid=[]", "out_dir={d}"],
                        "threshold grid is empty"),
    "zero grid": (["action=sweep", "records={d}/records.csv", "grid=0"], "threshold grid is empty"),
    "negative tolerance": (["action=sweep", "records={d}/records.csv", "tolerance=-1"], "tolerance=-1"),
    "sweep file missing": (["action=plot", "sweep={d}/nope.csv", "out={d}/pareto.png"], "sweep file not found"),
    "not a sweep file": (["action=plot", "sweep={d}/records.csv", "out={d}/pareto.png"], "is not a sweep CSV"),
    "no action": ([], "pass action=certify"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, written, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(written, folder, copy_function=shutil.copy2)
    before = snapshot(folder)
    args, message = BAD[case]
    res = cli(*[a.format(d=folder) for a in args], cwd=tmp_path / "cwd")
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert snapshot(folder) == before


def fake_run_folder(run: Path, stages: tuple[str, ...], data: dict) -> Path:
    """Manifests and weight files of ``stages`` (no network behind them): enough for action=certify
    to compose its config, not to certify."""
    info = {"name": "synthetic", "input_shape": [3, 32, 32], "num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3}
    for stage in stages:
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text(json.dumps({
            "stage": stage, "status": "complete", "eps": 0.03, "data": info, "net": {"name": "fc", "kind": "cert"}, "config": {"data": data, "eps": 0.03, "seed": 0},
            "outputs": {"weights": {"path": f"{stage}.pt"}}}))
        (run / stage / f"{stage}.pt").write_bytes(b"weights")
    return run


def test_certify_a_run_folder_without_a_gate_stage(tmp_path):
    """Manifests of core/ and cert/ only, gate selection asked for: the gate stage is named before
    anything is loaded (without selection=gate such a folder is certified with margin selection)."""
    run = fake_run_folder(tmp_path / "runs" / "synthetic" / "eps_0.03", ("core", "cert"),
                          {"name": "synthetic", "subset": 64, "val_size": 48})
    before = snapshot(tmp_path / "runs")
    res = cli("action=certify", f"run_dir={run}", "selection=gate", cwd=tmp_path / "cwd")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0]
    assert "needs stage 'gate'" in errors[0], errors
    assert snapshot(tmp_path / "runs") == before
    assert list((tmp_path / "cwd").iterdir()) == []


def test_certify_overrides_with_an_unknown_knob_name_the_closest_one(tmp_path):
    run = fake_run_folder(tmp_path / "runs" / "synthetic" / "eps_0.03", ("core", "cert"), {"name": "synthetic"})
    res = cli("action=certify", f"run_dir={run}", 'overrides=["stage.attack.stepz=3"]', cwd=tmp_path / "cwd")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        "error: unknown knob 'attack.stepz' for stage 'certify' (did you mean 'attack.steps'?)"], res.stderr


def test_certify_config_precedence(tmp_path):
    """certify_config's order, lowest first: train.yaml, the run folder (the cert-net's data settings,
    the last certify's stage settings), the knobs of certify.yaml, data.<key>= / trainer.<key>=,
    then overrides=[...]."""
    from hydra import compose, initialize_config_dir

    from ace_lightning.cli import certify_config
    from ace_lightning.config import CONF_DIR

    run = fake_run_folder(tmp_path / "runs" / "synthetic" / "eps_0.03", ("core", "cert", "certify_margin"),
                          {"name": "synthetic", "subset": 64, "val_size": 48, "batch_size": 16})
    last = json.loads((run / "certify_margin" / "manifest.json").read_text())
    last["config"]["stage"] = {"name": "certify", "methods": ["IBP", "CROWN"], "batch_size": 7, "dtype": "float64",
                               "attack": {"enabled": True, "steps": 4}}
    (run / "certify_margin" / "manifest.json").write_text(json.dumps(last))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="certify", overrides=[
            "action=certify", f"run_dir={run}", "methods=[IBP]", "eps=0.02",
            'overrides=["stage.attack.enabled=false","data.batch_size=4"]'])
        job = certify_config(cfg, {}, ["++data.val_size=8", "++trainer.devices=1"])
    assert (job.stage.name, job.stage.selection, job.eps, job.seed) == ("certify", "margin", 0.02, 0)
    assert (job.data.subset, job.data.val_size, job.data.batch_size, job.trainer.devices) == (64, 8, 4, 1)
    assert (list(job.stage.methods), job.stage.batch_size, job.stage.dtype) == (["IBP"], 7, "float64")
    assert (job.stage.attack.enabled, job.stage.attack.steps, job.stage.attack.restarts) == (False, 4, 3)


def test_help_lists_every_action_with_one_line(tmp_path):
    """`ace-certify --help` starts with the actions: every one the CLI dispatches, one line each."""
    import ast

    import ace_lightning.cli as cli_module

    tree = ast.parse(Path(cli_module.__file__).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "certify_main")  # @hydra.main
    table = next(n.value for n in ast.walk(main) if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "actions" for t in n.targets))
    actions = [k.value for k in table.keys]
    res = cli("--help", cwd=tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-2000:]
    head = res.stdout.split("== Config groups", 1)[0].splitlines()
    for action in actions:
        lines = [line for line in head if line.startswith(f"{action} ")]
        assert len(lines) == 1 and len(lines[0].split(None, 1)[1]) > 20, (action, head)


def test_certify_writes_the_runs_summary_next_to_the_run_folder(tmp_path):
    """action=certify sets runs_root (where summary.csv/.md go) beside the run folder: the root of
    <root>/<data>/eps_<eps>, else the folder's parent; never the run folder itself."""
    from hydra import compose, initialize_config_dir

    from ace_lightning.cli import certify_config
    from ace_lightning.config import CONF_DIR

    for run, root in ((tmp_path / "runs" / "synthetic" / "eps_0.03", tmp_path / "runs"),
                      (tmp_path / "elsewhere" / "my_run", tmp_path / "elsewhere")):
        fake_run_folder(run, ("core", "cert", "gate"), {"name": "synthetic"})
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="certify", overrides=["action=certify", f"run_dir={run}"])
            train_cfg = certify_config(cfg, {}, [])
        assert (train_cfg.runs_root, train_cfg.run_dir) == (str(root), str(run)), (train_cfg.runs_root, root)


@pytest.mark.parametrize("module", ["pipeline", "summary"])
def test_the_argparse_commands_help_and_bad_arguments(module, capsys):
    """python -m ace_lightning.pipeline / .summary share one parser (errors.CommandParser): --help says
    what the command does; a bad argument is one `error:` line with exit code 2, as in ace-certify."""
    import importlib

    main = importlib.import_module(f"ace_lightning.{module}").main
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_help.value.code == 0 and out.startswith(f"usage: python -m ace_lightning.{module} ")
    with pytest.raises(SystemExit) as exit_bad:
        main(["--no-such-flag"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_bad.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert err[0].endswith(f"(see python -m ace_lightning.{module} --help)")


def test_summary_prints_the_tables_and_stage_times(tmp_path, capsys):
    from ace_lightning.summary import main

    (tmp_path / "certify_margin").mkdir()
    (tmp_path / "certify_margin" / "table.txt").write_text("the table\n")
    (tmp_path / "certify_margin" / "manifest.json").write_text(json.dumps({"status": "complete", "wall_s": 90.0}))
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == [
        "certify_margin: the table", "", "wall-clock per stage: certify_margin 1.5 min; total 1.5 min"]
    assert main(["--no-table", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("wall-clock per stage:")
    with pytest.raises(SystemExit) as exit_empty:
        main([str(tmp_path / "nothing")])
    assert exit_empty.value.code == 2 and capsys.readouterr().err.startswith("error: no certify*/table.txt")
