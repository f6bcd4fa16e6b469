"""Config plumbing shared by every stage: where the configs live, plain containers, the data, and
the schema of a stage's knobs (the keys of its conf/stage/<name>.yaml: anything else is refused)."""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from ace_lightning.errors import ConfigError, did_you_mean

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped inside the package

# Knobs a stage reads that its conf/stage/<name>.yaml does not list (listing them there would change
# the config hash of every existing run folder): the certified stages' schedule counts steps_per_epoch
# when given (stages.configs.CertifiedTrainingConfig).
EXTRA_KNOBS: dict[str, tuple[str, ...]] = {s: ("steps_per_epoch",) for s in ("cert", "gate", "entropy")}
# Sub-knobs every stage's nested knob dict accepts beyond its yaml's: the LR schedule's milestones
# (stages.base.StageModule.lr_factor reads them whatever the stage).
EXTRA_SUBKNOBS: dict[str, tuple[str, ...]] = {"lr_schedule": ("milestones",)}


def to_dict(cfg: Any) -> Any:
    """A resolved plain dict/list of an OmegaConf node (anything else unchanged)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def datamodule_from(cfg: Mapping[str, Any]):
    """The ACEDataModule of a composed config's ``data`` group."""
    from ace_lightning.data import ACEDataModule

    return ACEDataModule(**dict(to_dict(cfg["data"])))


def job_eps(cfg: Mapping[str, Any]) -> float:
    """The run's eps as a number (each stage's check says which range it takes: [0, 1] for the core
    and the certify stage, (0, 1] for the certified training stages)."""
    value = cfg.get("eps")
    try:
        eps = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        eps = math.nan
    if not math.isfinite(eps):
        raise ConfigError(f"eps must be a number in [0, 1] (pixel space, e.g. 2/255 = 0.00784), got {value!r}")
    return eps


@lru_cache(maxsize=None)
def _stage_yaml(name: str) -> dict:
    path = Path(CONF_DIR) / "stage" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no config for stage '{name}' ({path})")
    return OmegaConf.to_container(OmegaConf.load(path))


def stage_schema(name: str) -> dict:
    """The knobs of stage ``name`` with their defaults: conf/stage/<name>.yaml."""
    return dict(_stage_yaml(name))


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):  # "0.5" works wherever the code calls float()
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def check_knobs(name: str, knobs: Mapping[str, Any], where: str = "") -> None:
    """Every key of ``knobs`` is a knob of stage ``name`` (conf/stage/<name>.yaml, EXTRA_KNOBS),
    and so is every key of a nested knob dict the yaml spells out (attack, lr_schedule; a dict
    with ``_target_`` such as the optimizer stays open); a knob whose default is a number takes a
    number (or null). A one-line ConfigError names the closest known knob."""
    schema = stage_schema(name)
    known = [*schema, *EXTRA_KNOBS.get(name, ())]
    at = f" in {where}" if where else ""
    for key, value in knobs.items():
        key = str(key)
        if key not in known:
            raise ConfigError(f"unknown knob '{key}' for stage '{name}'{at}{did_you_mean(key, known)}")
        default = schema.get(key)
        if isinstance(default, dict) and "_target_" not in default and isinstance(value, Mapping):
            sub = [*default, *EXTRA_SUBKNOBS.get(key, ())]
            for k in value:
                if str(k) not in sub:
                    raise ConfigError(f"unknown knob '{key}.{k}' for stage '{name}'{at}"
                                      f"{did_you_mean(str(k), sub, key + '.')}")
        if _is_number(default) and value is not None and not _is_number(value):
            raise ConfigError(f"knob '{key}' of stage '{name}'{at} must be a number, got {value!r}")
