"""Config plumbing shared by every stage: where the configs live, plain containers, the data."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped inside the package


def to_dict(cfg: Any) -> Any:
    """A resolved plain dict/list of an OmegaConf node (anything else unchanged)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def datamodule_from(cfg: Mapping[str, Any]):
    """The ACEDataModule of a composed config's ``data`` group."""
    from ace_lightning.data import ACEDataModule

    return ACEDataModule(**dict(to_dict(cfg["data"])))
