"""A search over compositions (experiment=search_fmnist, hydra/sweeper=optuna, NSGA-II): two trials on
tiny data, each in its own run folder, the core trained once; the value each trial hands the
sweeper is the certify stage's val numbers at its exported operating point; action=compare draws
the trials' front on test beside a hand-set composition and its single networks."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from ace_lightning.ace import CertifySettings
from ace_lightning.compare import compare_runs, mean_certified, pareto_indices
from ace_lightning.config import CONF_DIR
from ace_lightning.errors import ConfigError
from ace_lightning.rundir import sha256_file
from ace_lightning.search import check_sweeper, search_settings, trial_values

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
# the shipped study, cut to two trials of one epoch per stage on debug=tiny's synthetic data
TINY_STUDY = ["stage=pipeline", "experiment=search_fmnist", "debug=tiny", "net@cert_net=fc", "net@core_net=fc",
              "eps=0.03", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.population_size=2",
              "++stage_overrides.core.epochs=1", "++stage_overrides.core.eval_pgd_steps=1",
              "++stage_overrides.cert.epochs=2", "++stage_overrides.cert.warmup_epochs=0",
              "++stage_overrides.cert.ramp_epochs=1", "++stage_overrides.certify.attack.steps=2"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_the_front_is_the_points_no_other_beats_on_both_counts():
    pts = [{"nat_acc": 0.90, "cert_acc": 0.50}, {"nat_acc": 0.85, "cert_acc": 0.60},
           {"nat_acc": 0.84, "cert_acc": 0.55}, {"nat_acc": 0.92, "cert_acc": 0.10},
           {"nat_acc": 0.90, "cert_acc": 0.50}, {"nat_acc": 0.80, "cert_acc": 0.60}]
    assert pareto_indices(pts) == [1, 0, 3]  # by natural accuracy; ties and dominated points left out
    assert pareto_indices([]) == []


def test_the_objective_must_match_the_sweepers_directions():
    cfg = _compose(["stage=pipeline", "experiment=search_fmnist"])
    check_sweeper(cfg)  # nat_cert, [maximize, maximize]
    assert search_settings(cfg) == {"objective": "nat_cert", "nat_from": 0.8, "share_core": True}
    with pytest.raises(ConfigError, match=r"mean_cert returns 1 number\(s\) to maximize: hydra.sweeper.direction=maximize"):
        check_sweeper(_compose(["stage=pipeline", "experiment=search_fmnist", "search.objective=mean_cert"]))
    check_sweeper(_compose(["stage=pipeline", "experiment=search_fmnist", "search.objective=mean_cert",
                            "hydra.sweeper.direction=maximize"]))
    with pytest.raises(ConfigError, match="a search's trial is a pipeline job: stage=pipeline, got stage=cert"):
        check_sweeper(_compose(["stage=cert", "experiment=search_fmnist"]))
    with pytest.raises(ConfigError, match="search.objective='nat': known nat_cert, mean_cert"):
        search_settings(_compose(["experiment=search_fmnist", "search.objective=nat"]))
    with pytest.raises(ConfigError, match="search.nat_frm: unknown knob"):
        search_settings(_compose(["experiment=search_fmnist", "+search.nat_frm=0.5"]))


def test_two_trials_through_the_optuna_sweeper_then_their_front_in_compare(tmp_path):
    runs = tmp_path / "runs"
    res = subprocess.run([sys.executable, "-m", "ace_lightning.train", f"runs_root={runs}", *TINY_STUDY],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "Sampler: NSGAIISampler" in out and "Directions: ['maximize', 'maximize']" in out
    study = runs / "search_fmnist" / "eps_0.03"
    assert sorted(p.name for p in study.glob("trial_*")) == ["trial_0", "trial_1"]  # a run folder per trial
    returned = yaml.safe_load((study / "optimization_results.yaml").read_text())["solutions"]  # the sweeper's front
    trials = []
    for n in (0, 1):
        run_dir = study / f"trial_{n}"
        trial = json.loads((run_dir / "trial.json").read_text())
        assert json.loads((run_dir / "job.json").read_text())["status"] == "complete"
        assert trial["status"] == "complete" and trial["trial"] == n and trial["split"] == "val"
        assert set(trial["params"]) == set(_compose(["experiment=search_fmnist"]).hydra.sweeper.params)
        certify = json.loads((run_dir / trial["certify"] / "manifest.json").read_text())
        chosen = certify["chosen_operating_point"]
        assert trial["certify"] == ("certify_margin" if trial["params"]["stage_overrides.certify.selection"] == "margin"
                                    else "certify_entropy_cert")
        assert trial["operating_point"] == chosen["key"]
        assert trial["values"] == [chosen["val"]["nat_acc"], chosen["val"]["cert_acc"]]  # val, not test
        for k, v in trial["params"].items():  # the knobs the sweeper set reached the stages
            stage, knob = k.split(".")[1:]
            st = certify["config"]["stage"] if stage == "certify" else \
                json.loads((run_dir / "cert" / "manifest.json").read_text())["config"]["stage"]
            assert str(st[knob]) == v, (k, st[knob], v)
        trials.append(trial)
    for solution in returned:  # what the task function returned is what the sweeper recorded
        match = [t for t in trials if {k: str(v) for k, v in solution["params"].items()} == t["params"]]
        assert match and solution["values"] == match[0]["values"]
    # the core is trained once: trial 1 holds a copy, skipped by its pipeline as complete
    assert sha256_file(study / "trial_0" / "core" / "core.pt") == sha256_file(study / "trial_1" / "core" / "core.pt")
    assert f"search: core/ of trial_0 (same config) copied into {study / 'trial_1'}" in out
    assert "core skipped (already complete)" in out
    # mean_cert: the val curves' mean certified accuracy from nat_from up to the core's val accuracy
    stage_dir = study / "trial_0" / trials[0]["certify"]
    curve = [{k: float(v) for k, v in r.items()} for name in ("sweep_val.csv", "sweep_val_per_class.csv")
             if (stage_dir / name).is_file() for r in csv.DictReader(open(stage_dir / name))]
    core_nat = json.loads((stage_dir / "operating_points.json").read_text())["core_nat_val"]
    assert trial_values(stage_dir, "mean_cert", 0.5) == (mean_certified(curve, 0.5, core_nat),)

    # a hand-set composition (trial 0's folder as a plain run folder) and the trials' front on test
    shutil.copytree(study / "trial_0", runs / "handset" / "eps_0.03")
    os.unlink(runs / "handset" / "eps_0.03" / "trial.json")
    result = compare_runs([str(study / "trial_*"), str(runs / "handset" / "eps_0.03")], str(tmp_path / "cmp"),
                          CertifySettings(methods=("IBP", "CROWN-IBP")), attack_steps=2)
    rows = result["rows"]
    assert [r["kind"] for r in rows].count("trial") == 2 and {"cert-net", "core", "ace"} <= {r["kind"] for r in rows}
    for r, trial in zip([r for r in rows if r["kind"] == "trial"], trials):
        certify = json.loads((study / f"trial_{trial['trial']}" / trial["certify"] / "manifest.json").read_text())
        assert (r["nat_acc"], r["cert_acc"]) == (certify["chosen_operating_point"]["test"]["nat_acc"],
                                                 certify["chosen_operating_point"]["test"]["cert_acc"])
    assert sum(r["search_front"] for r in rows if r["kind"] == "trial") >= 1
    assert any(line.startswith("- Search: 2 trials") for line in result["summary"])
    with open(tmp_path / "cmp" / "compare.csv", newline="") as fh:
        assert [r["kind"] for r in csv.DictReader(fh)].count("trial") == 2
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    # a trial that did not finish is named, not drawn
    (study / "trial_1" / "trial.json").write_text(json.dumps({**trials[1], "status": "running"}))
    with pytest.raises(Exception, match="is not complete"):
        compare_runs([str(study / "trial_1")], str(tmp_path / "cmp2"))


def test_a_failed_trial_says_so_in_its_trial_json(tmp_path):
    """A trial whose job fails (e.g. a knob combination refused before training) is recorded as
    failed with its one-line error, not left 'running', and the error reaches the sweeper."""
    from ace_lightning.search import TRIAL_FILE, run_trial

    cfg = {"search": {"objective": "nat_cert", "share_core": False}, "run_dir": str(tmp_path / "trial_0")}

    def refused():
        raise ConfigError("select_weight > 0 needs certified margins over the whole ball")

    with pytest.raises(ConfigError):
        run_trial(cfg, refused)
    record = json.loads((tmp_path / "trial_0" / TRIAL_FILE).read_text())
    assert record["status"] == "failed" and record["error"].startswith("select_weight > 0")
