"""Configs reject what they do not know (issue 23, item 5): a knob outside a stage's schema is a
one-line error naming the closest known knob; eps, data and every stage's knobs are checked before
the job's first stage trains (nothing is created); every bad input is one ``error: ...`` line with
exit code 2 and its quotes intact; a user's own net, cert-net or dataset works through
``_target_``; a folder of images is a dataset (conf/data/image_folder.yaml)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

from ace_lightning.config import CONF_DIR, check_knobs, stage_schema
from ace_lightning.errors import ConfigError, StageInputError, error_line
from ace_lightning.registry import STAGES, check_job, run_stage

TESTS = Path(__file__).resolve().parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0",
           PYTHONPATH=os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
TINY = ["debug=tiny", "net@cert_net=fc", "net@core_net=fc", "eps=0.05"]
# one epoch per stage, the cheapest certification (debug=tiny: IBP and CROWN-IBP, no refinement)
ONE_EPOCH = ["++stage_overrides.core.epochs=1", "++stage_overrides.core.eval_pgd_steps=1",
             "++stage_overrides.cert.epochs=1", "++stage_overrides.cert.warmup_epochs=0",
             "++stage_overrides.cert.ramp_epochs=1", "++stage_overrides.cert.val_pgd_steps=1",
             "++stage_overrides.certify.selection=margin", "++stage_overrides.certify.attack.steps=2"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ace_lightning.train", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    return lines[0]


# -- 1. a knob outside a stage's schema ---------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    ["stage=cert", "++stage_overrides.cert.epochz=2"],
    ["stage=cert", "++stage.epochz=2"],
    ["stage=pipeline", "++stage_overrides.cert.epochz=2"],
    ["stage=core", "++stage_overrides.cert.epochz=2"],  # a stage the job does not run: a typo still
])
def test_an_unknown_knob_is_refused_naming_the_nearest_one(overrides, tmp_path):
    cfg = _compose([f"runs_root={tmp_path}", *TINY, *overrides])
    with pytest.raises(ConfigError, match=r"^unknown knob 'epochz' for stage 'cert' \(did you mean 'epochs'\?\)$"):
        run_stage(cfg)
    assert not any(tmp_path.iterdir())  # nothing trained, no folder


@pytest.mark.parametrize("overrides, message", [
    (["++stage_overrides.certify.attack.stepz=3"], r"unknown knob 'attack.stepz' for stage 'certify' "
                                                   r"\(did you mean 'attack.steps'\?\)"),
    (["++stage_overrides.cert.attack.eps_factr=2"], r"unknown knob 'attack.eps_factr' for stage 'cert' "
                                                    r"\(did you mean 'attack.eps_factor'\?\)"),
    (["++stage_overrides.core.lr_schedule.milestonez=[2]"], r"'lr_schedule.milestonez' for stage 'core' "
                                                            r"\(did you mean 'lr_schedule.milestones'\?\)"),
    (["++stage_overrides.certfy.methods=[IBP]"], r"unknown stage 'certfy' \(did you mean 'certify'\?\)"),
    (["++stage_overrides.gate.kappa_end=abc"], r"knob 'kappa_end' of stage 'gate' must be a number, got 'abc'"),
    (["++data.sizee=3"], r"unknown knob 'sizee' for data 'synthetic'"),
    (["++data.dataset_kwargs.noize=0.1"], r"'dataset_kwargs.noize' for dataset 'synthetic' "
                                          r"\(did you mean 'dataset_kwargs.noise'\?\)"),
    (["++cert_net.bnn=true"], r"unknown knob 'bnn' for net 'fc' \(cert_net\) \(did you mean 'bn'\?\)"),
])
def test_nested_knobs_stage_names_data_and_nets_are_checked_too(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        check_job(_compose([f"runs_root={tmp_path}", "stage=pipeline", *TINY, *overrides]))


def test_open_knobs_stay_open(tmp_path):
    """The optimizer is a _target_ mapping (any torch.optim class and its arguments), an LR
    schedule takes milestones in every stage, the gate's gate_net is any net config."""
    check_job(_compose([f"runs_root={tmp_path}", "stage=pipeline", *TINY,
                        "++stage_overrides.cert.optimizer._target_=torch.optim.SGD",
                        "++stage_overrides.cert.optimizer.momentum=0.9",
                        "++stage_overrides.core.lr_schedule.milestones=[1]",
                        "++stage_overrides.gate.gate_net={name: fc, bn: true}"]))
    assert "epochs" in stage_schema("cert") and "steps_per_epoch" not in stage_schema("cert")
    check_knobs("cert", {"steps_per_epoch": 3})  # config.EXTRA_KNOBS (stages.configs.CertifiedTrainingConfig)


def _all_stages(overrides: list[str]) -> list[str]:
    return ["stage=pipeline", "stage.stages=[core,cert,gate,entropy,certify]", *overrides]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_passes_the_check(experiment, tmp_path):
    """Every experiment (alone, and with each debug config) composes into a job whose every stage,
    knob, net and data config passes check_job. (debug=smoke's one-epoch cert stage cannot hold
    demo_fmnist_select's co-training, which starts at epoch 24: refused up front, as it should be.)"""
    for debug in ([], ["debug=tiny"], ["debug=smoke"]):
        cfg = _compose(_all_stages([f"runs_root={tmp_path}", f"experiment={experiment}", *debug]))
        if experiment == "demo_fmnist_select" and debug == ["debug=smoke"]:
            with pytest.raises(ConfigError, match="select_start_epoch 24 >= epochs 1"):
                check_job(cfg)
            continue
        check_job(cfg)


def test_every_shipped_stage_data_and_net_config_passes_the_check(tmp_path):
    for stage in [*STAGES, "pipeline"]:
        check_job(_compose([f"runs_root={tmp_path}", f"stage={stage}"]))
    for data in sorted(p.stem for p in (Path(CONF_DIR) / "data").glob("*.yaml")):
        check_job(_compose([f"runs_root={tmp_path}", f"data={data}", *_all_stages([])]))
    for net in sorted(p.stem for p in (Path(CONF_DIR) / "net").glob("*.yaml")):
        kind = OmegaConf.load(Path(CONF_DIR) / "net" / f"{net}.yaml").kind
        check_job(_compose([f"runs_root={tmp_path}", f"net@{kind}_net={net}", *_all_stages([])]))


# -- 2. eps, data and every stage's knobs before the first stage trains --------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["stage=core", "eps=2"], r"eps must be in \[0, 1\] .*got 2.0$"),
    (["stage=pipeline", "eps=2"], r"eps must be in \[0, 1\] .*got 2.0$"),
    (["stage=certify", "eps=-1"], r"eps must be in \[0, 1\] .*got -1.0$"),
    (["stage=pipeline", "eps=0"], r"eps must be in \(0, 1\]"),  # the cert stage's own check, up front
    (["stage=pipeline", "++stage_overrides.gate.pos_weight=FOO"], r"pos_weight must be one of .*got 'FOO'$"),
    (["stage=pipeline", "++stage_overrides.certify.methods=[IBB]"], r"IBB"),
    (["stage=pipeline", "++stage_overrides.cert.optimizer._target_=torch.optim.Adamm"],
     r"optimizer 'torch.optim.Adamm' cannot be imported"),
    (["stage=pipeline", "data.val_size=-1"], r"val_size must be >= 0"),
    (["stage=pipeline", "seed=abc"], r"seed must be a whole number, got 'abc'"),
])
def test_a_bad_value_for_a_later_stage_fails_before_the_first_stage_trains(overrides, message, tmp_path):
    """A pipeline used to train the core (minutes) before its cert stage refused eps=2; `stage=core
    eps=2` trained and made eps_2/. Now every stage the job runs is checked first."""
    cfg = _compose([f"runs_root={tmp_path}", *TINY, "++stage_overrides.certify.selection=gate", *overrides])
    with pytest.raises(ConfigError, match=message):
        run_stage(cfg)
    assert not any(tmp_path.iterdir())


# -- 3. one error line, exit code 2, quotes intact ------------------------------------------------------

def test_error_lines_keep_their_quotes():
    assert error_line(ConfigError("core training mode must be 'natural' or 'pgd', got 'FOO'")).endswith("got 'FOO'")
    assert error_line(ConfigError('got "FOO"')) == 'got "FOO"'
    assert error_line(KeyError("missing")) == "missing"  # KeyError's str is the quoted key


@pytest.mark.parametrize("args, message", [
    (["stage=cert", "stage.epochz=2"], "error: unknown knob 'epochz' for stage 'cert' (did you mean 'epochs'?)"),
    (["stage=pipeline", "++stage_overrides.cert.epochz=2"],
     "error: unknown knob 'epochz' for stage 'cert' (did you mean 'epochs'?)"),
    (["stage=core", "eps=abc"], "error: eps must be a number in [0, 1] (pixel space, e.g. 2/255 = 0.00784), got 'abc'"),
    (["stage=core", "eps=2"], "error: eps must be in [0, 1] (pixel space, e.g. 2/255 = 0.00784), got 2.0"),
    (["stage=core", "stage.mode=FOO"], "error: core training mode must be 'natural' or 'pgd', got 'FOO'"),
    (["stage=core", "net@core_net=smal_cnn"], "error: unknown net 'smal_cnn' (did you mean 'small_cnn'?); known: "),
])
def test_bad_input_on_the_command_line_is_one_error_line_and_creates_nothing(args, message, tmp_path):
    res = _train([*args, f"runs_root={tmp_path / 'runs'}", "debug=tiny"], cwd=tmp_path)
    assert _one_error_line(res).startswith(message), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no outputs/ in the working directory


@pytest.fixture(scope="module")
def margin_run(tmp_path_factory):
    """core/ and cert/ of a tiny run folder (the certify stage's inputs for margin selection)."""
    root = tmp_path_factory.mktemp("runs")
    run_stage(_compose([f"runs_root={root}", "stage=pipeline", "stage.stages=[core,cert]", *TINY, *ONE_EPOCH]))
    return root


def test_a_truncated_cert_net_is_one_error_line_under_stage_certify(margin_run, tmp_path):
    run = tmp_path / "runs"
    import shutil

    shutil.copytree(margin_run, run)
    weights = run / "synthetic" / "eps_0.05" / "cert" / "cert.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(StageInputError, match=r"^cannot load .*cert\.pt: file is truncated or not a checkpoint$"):
        run_stage(_compose([f"runs_root={run}", "stage=certify", "stage.selection=margin", *TINY]))
    res = _train(["stage=certify", "stage.selection=margin", f"runs_root={run}", *TINY], cwd=tmp_path)
    assert _one_error_line(res) == f"error: cannot load {weights}: file is truncated or not a checkpoint"


# -- 4. a user's own net, cert-net and dataset through _target_ -----------------------------------------

USER_NET = {"_target_": "user_models.TinyNet", "hidden": 12}


def _with(cfg, **nodes):
    with open_dict(cfg):
        for key, value in nodes.items():
            cfg[key] = OmegaConf.create(value)
    return cfg


def test_a_user_net_is_a_core_a_cert_net_and_a_gate_through_target(tmp_path):
    """core, cert-net and certify (margin) of a run folder whose nets are user classes; the gate
    built from such a cert-net (one logit, initialised from the cert-net's body)."""
    from ace_lightning.nets import build_net, init_gate_from_cert
    from ace_lightning.rundir import read_manifest

    cfg = _compose([f"runs_root={tmp_path}", "stage=pipeline", *TINY, *ONE_EPOCH])
    _with(cfg, core_net={**USER_NET, "kind": "core"}, cert_net={**USER_NET, "kind": "cert"})
    out = run_stage(cfg)
    assert list(out["stages"]) == ["core", "cert", "certify"]
    run = tmp_path / "synthetic" / "eps_0.05"
    cert = read_manifest(run / "cert")
    assert cert["net"]["_target_"] == "user_models.TinyNet" and any(k.endswith("cert_acc") for k in cert["metrics"])
    assert (run / "certify_margin" / "ace_model.pt").is_file()
    info = type("Info", (), {"input_shape": (3, 32, 32), "num_classes": 10, "mean": (0.5,) * 3, "std": (0.25,) * 3})
    net = build_net(cert["net"], info)
    net.load_state_dict(torch.load(run / "cert" / "cert.pt", weights_only=True))
    gate = init_gate_from_cert(build_net({**cert["net"], "kind": "gate"}, info), net)
    assert gate(torch.rand(2, 3, 32, 32)).shape == (2, 1)


@pytest.mark.parametrize("net, message", [
    ({**USER_NET, "hiden": 3}, r"unknown knob 'hiden' for net 'user_models.TinyNet' \(did you mean 'hidden'\?\)"),
    ({"_target_": "user_models.NoSuchNet"}, r"net _target_ 'user_models.NoSuchNet' cannot be imported"),
    ({"_target_": "user_models.FixedNet"}, r"net 'user_models.FixedNet' fails on inputs of the data's shape"),
])
def test_a_bad_user_net_is_one_line(net, message, tmp_path):
    cfg = _with(_compose([f"runs_root={tmp_path}", "stage=cert", *TINY]), cert_net=net)
    with pytest.raises(ConfigError, match=message):
        run_stage(cfg)


def test_a_user_dataset_through_target_trains_a_core(tmp_path):
    data = {"_target_": "user_models.TinyDataset", "name": "tiny_user", "val_size": 12, "batch_size": 16,
            "num_workers": 0, "dataset_kwargs": {"size": 48}}
    cfg = _with(_compose([f"runs_root={tmp_path}", "stage=core", *TINY, "stage.epochs=1",
                          "stage.eval_pgd_steps=1"]), data=data)
    manifest = run_stage(cfg)
    assert manifest["data"] == {**manifest["data"], "name": "tiny_user", "input_shape": [1, 8, 8], "num_classes": 3,
                                "train": 36, "val": 12, "test": 48}
    _with(cfg, data={**data, "dataset_kwargs": {"sise": 48}})
    with pytest.raises(ConfigError, match=r"'dataset_kwargs.sise' for dataset 'tiny_user' .*'dataset_kwargs.size'"):
        run_stage(cfg)


# -- 5. a folder of images ------------------------------------------------------------------------------

def write_image_folder(root: Path, splits=("train", "val", "test"), classes=("ant", "bee", "cow"), per_class=6,
                       size=(10, 12)) -> Path:
    """PNGs under root/<split>/<class>/, class c brighter in its own third of the image."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
                arr[:, 4 * c:4 * c + 4] += 150
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root


def test_an_image_folder_trains_a_user_core_through_ace_train(tmp_path):
    """ace-train on a folder of PNGs, the core a user's class from a net config in the user's own
    config folder (--config-dir)."""
    images = write_image_folder(tmp_path / "images")
    (tmp_path / "conf" / "net").mkdir(parents=True)
    (tmp_path / "conf" / "net" / "user_tiny.yaml").write_text("_target_: user_models.TinyNet\nkind: core\nhidden: 8\n")
    res = _train([f"--config-dir={tmp_path / 'conf'}", "stage=core", "data=image_folder", f"data.data_dir={images}",
                  "data.dataset_kwargs.image_size=8", *TINY, "net@core_net=user_tiny", "stage.epochs=1",
                  "stage.eval_pgd_steps=1", f"runs_root={tmp_path / 'runs'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "image_folder" / "eps_0.05" / "core" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["net"] == {"_target_": "user_models.TinyNet", "kind": "core", "hidden": 8}
    assert manifest["data"] == {**manifest["data"], "name": "image_folder", "input_shape": [3, 8, 8], "num_classes": 3,
                                "mean": [0.5] * 3, "std": [0.25] * 3, "train": 18, "val": 18, "test": 18}


def test_an_image_folder_without_val_carves_it_from_train_and_reads_grayscale(tmp_path):
    from ace_lightning.data import ACEDataModule

    images = write_image_folder(tmp_path / "images", splits=("train", "test"))
    dm = ACEDataModule("image_folder", data_dir=str(images), val_size=5, batch_size=4, mean=[0.4], std=[0.2],
                       dataset_kwargs={"image_size": [6, 9], "channels": 1})
    assert (dm.info.input_shape, dm.info.num_classes, dm.info.mean, dm.info.std) == ((1, 6, 9), 3, (0.4,), (0.2,))
    dm.setup()
    assert (len(dm.train_indices), len(dm.val_indices), len(dm.test_indices)) == (13, 5, 18)
    assert dm.val_set.dataset is dm.train_eval_set.dataset and not set(dm.val_indices) & set(dm.train_indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 6, 9) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert dm.train_set.dataset.classes == ["ant", "bee", "cow"] and set(y.tolist()) <= {0, 1, 2}
    assert dm.info.mean == (0.4,)


def test_an_image_folder_with_other_classes_in_test_or_no_folder_is_one_line(tmp_path):
    from ace_lightning.data import ACEDataModule, DatasetNotFoundError

    images = write_image_folder(tmp_path / "images", splits=("train",))
    write_image_folder(images, splits=("test",), classes=("ant", "bee", "dog"))
    dm = ACEDataModule("image_folder", data_dir=str(images), val_size=2)
    with pytest.raises(DatasetNotFoundError, match="different class folders"):
        dm.setup()
    with pytest.raises(DatasetNotFoundError, match=r"image_folder: .*nowhere/train not found; the layout is"):
        ACEDataModule("image_folder", data_dir=str(tmp_path / "nowhere")).info
