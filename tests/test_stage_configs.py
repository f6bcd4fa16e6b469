"""The typed stage configs (stages/configs.py and each stage module's): their fields are their
conf/stage/<name>.yaml's keys, so the two cannot drift; a bad value is one ConfigError line; the
registry maps each stage name to the Stage its module declares."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ace_lightning import registry
from ace_lightning.config import EXTRA_KNOBS, stage_schema
from ace_lightning.errors import ConfigError
from ace_lightning.stages import cert, core, entropy, gate_run
from ace_lightning.stages.runner import Stage

TRAINING = {"core": core.STAGE, "cert": cert.STAGE, "gate": gate_run.STAGE, "entropy": entropy.STAGE}


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_each_yaml_holds_exactly_its_configs_fields(name):
    stage = TRAINING[name]
    fields = {f.name for f in dataclasses.fields(stage.config)}
    assert stage.config.stage == name and stage.name == name
    assert fields == set(stage_schema(name)) | set(EXTRA_KNOBS.get(name, ()))
    config = stage.config.from_dict({}, 0.1)  # the yaml's defaults are a valid config
    assert config.name == name


def test_the_registry_maps_names_to_the_stages_the_modules_declare():
    assert list(registry.STAGES) == ["cert", "core", "entropy", "gate", "certify"]  # found, not listed
    for name, stage in TRAINING.items():
        assert registry.STAGES.get(name) is stage and isinstance(stage, Stage)
    assert registry.STAGES.get("certify").name == "certify"


def test_the_certified_stages_share_one_training_config():
    from ace_lightning.stages.configs import CertifiedTrainingConfig

    shared = {f.name for f in dataclasses.fields(CertifiedTrainingConfig)}
    for name in ("cert", "gate", "entropy"):
        assert issubclass(TRAINING[name].config, CertifiedTrainingConfig)
        assert shared <= {f.name for f in dataclasses.fields(TRAINING[name].config)}
    assert not issubclass(core.CoreConfig, CertifiedTrainingConfig)


@pytest.mark.parametrize("name, knobs, eps, message", [
    ("core", {"mode": "adv"}, 0.1, r"^core training mode must be 'natural' or 'pgd', got 'adv'$"),
    ("core", {"epochs": 2.5}, 0.1, r"^stage.epochs must be a whole number, got 2.5$"),
    ("core", {"channels_last": "yes"}, 0.1, r"^stage.channels_last must be true or false, got 'yes'$"),
    ("core", {"optimizer": {"name": "adamax"}}, 0.1, r"^unknown optimizer 'adamax'"),
    ("cert", {"kappa_end": 1.5}, 0.1, r"^kappa_end must be in \[0, 1\], got 1.5$"),
    ("cert", {}, 0.0, r"^eps must be in \(0, 1\]"),
    ("cert", {"l1": None}, 0.1, r"^stage.l1 must be set, got null$"),
    ("cert", {"l1": "abc"}, 0.1, r"knob 'l1' of stage 'cert' must be a number, got 'abc'$"),
    ("cert", {"epochz": 3}, 0.1, r"^unknown knob 'epochz' for stage 'cert' \(did you mean 'epochs'\?\)$"),
    ("cert", {"method": "SABR", "loss_fusion": True}, 0.1, r"^loss_fusion bounds the CE over the whole ball"),
    ("cert", {"folder": "gate"}, 0.1, r"^stage.folder must name a cert stage folder"),
    ("cert", {"val_crown_ibp": "sometimes"}, 0.1, r"^val_crown_ibp must be true, false or after_ramp"),
    ("gate", {"pos_weight": "FOO"}, 0.1, r"^pos_weight must be one of .*got 'FOO'$"),
    ("gate", {"negatives": "all"}, 0.1, r"^negatives must be one of uncertified, wrong, got 'all'$"),
    ("gate", {"cascade_thresholds": [0.0]}, 0.1, r"^stage.cascade_thresholds needs one threshold per earlier"),
    ("gate", {"ramp_epochs": 20}, 0.1, r"^eps schedule ends after training ends"),
    ("entropy", {"method": "SABR"}, 0.1, r"^the entropy stage co-trains with IBP or CROWN-IBP"),
    ("entropy", {"lam": 2}, 0.1, r"^lambda \(stage.lam\) must be in \[0, 1\], got 2$"),
    ("entropy", {"route": "zonotope"}, 0.1, r"^unknown entropy route 'zonotope'"),
])
def test_a_bad_knob_is_one_config_error_line(name, knobs, eps, message):
    with pytest.raises(ConfigError, match=message) as err:
        TRAINING[name].config.from_dict(knobs, eps)
    assert "\n" not in str(err.value)


def test_a_config_is_typed_and_keeps_numbers_as_written():
    config = cert.CertConfig.from_dict({"epochs": "12", "kappa_end": 0, "method": "crown_ibp"}, 0.1)
    assert config.epochs == 12 and isinstance(config.epochs, int)
    assert config.kappa_end == 0 and config.method == "CROWN-IBP"  # the canonical method name
    gate = gate_run.STAGE.config.from_dict({}, 0.1)
    assert gate.method is None  # null: the cert-net's method, resolved from its manifest


def test_every_stage_yaml_has_a_discovered_stage():
    """Adding a stage touches two files (its module, its yaml): each yaml's stage is found."""
    from ace_lightning.config import CONF_DIR

    yamls = {p.stem for p in (Path(CONF_DIR) / "stage").glob("*.yaml")} - {registry.PIPELINE}
    assert yamls == set(registry.STAGES)
