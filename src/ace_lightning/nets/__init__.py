"""Architectures: cert-nets (C2, C3, C5, CNN7, WRN, ...), timm cores, gates. Each kind of net config
(cert, core, gate) and each built-in architecture is registered where it is defined (NET_KINDS,
CERT_NETS, CORE_NETS: registries.Registry); a ``_target_`` names a user's class instead."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ace_lightning.nets.cert import CERT_NETS, create_cert_net
from ace_lightning.nets.core import CORE_NETS, PretrainedUnavailableError, create_core
from ace_lightning.nets.gate import create_gate, final_linear_name, init_gate_from_cert
from ace_lightning.nets.kinds import NET_KINDS
from ace_lightning.nets.layers import Normalize, eval_mode
from ace_lightning.nets.target import check_target_net, create_target_net
from ace_lightning.errors import ConfigError, did_you_mean


def build_net(cfg: Mapping[str, Any], info: Any, **overrides: Any) -> nn.Module:
    """Build from a conf/net/*.yaml mapping (``name``, ``kind`` = cert|core|gate, constructor
    kwargs; or ``_target_``, a user's class: nets/target.py) and a DatasetInfo (shape, classes,
    mean/std). ``overrides`` win over ``cfg``."""
    kw = {**dict(cfg), **overrides}
    kind = NET_KINDS.canonical(kw.pop("kind", "cert"))
    if kw.get("_target_"):
        return create_target_net(kw, info, kind)
    return NET_KINDS.get(kind).build(kw.pop("name"), info, **kw)


def check_net_config(cfg: Mapping[str, Any], what: str) -> None:
    """A net config's name (or ``_target_``), kind and keyword arguments, checked before anything
    is built or trained (``what``: where it came from, e.g. cert_net); one-line ConfigErrors."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{what} must be a net config (name or _target_, kind, arguments), got {cfg!r}")
    try:
        kind = NET_KINDS.get(cfg.get("kind", "cert"))
    except ConfigError as err:
        raise ConfigError(f"{what}.kind: {err}") from None
    if cfg.get("_target_"):
        check_target_net(cfg)
        return
    name = cfg.get("name")
    if not name:
        raise ConfigError(f"{what} names no network: give name (conf/net/) or _target_ (a class path)")
    known = kind.knobs(name)
    for key in cfg if known is not None else ():  # None: a timm model takes its own keyword arguments
        if key not in known:
            raise ConfigError(f"unknown knob '{key}' for net '{name}' ({what}){did_you_mean(str(key), known)}")


__all__ = [
    "CERT_NETS", "CORE_NETS", "NET_KINDS", "Normalize", "PretrainedUnavailableError", "build_net", "check_net_config",
    "create_cert_net", "create_core", "create_gate", "eval_mode", "final_linear_name", "init_gate_from_cert",
]
