"""Architectures: cert-nets (C2, C3, C5, CNN7, WRN, ...), timm cores, gates."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ace_lightning.nets.cert import CERT_NETS, create_cert_net
from ace_lightning.nets.core import CORE_NETS, PretrainedUnavailableError, create_core
from ace_lightning.nets.gate import create_gate, final_linear_name, init_gate_from_cert
from ace_lightning.nets.layers import Normalize, eval_mode
from ace_lightning.nets.target import check_target_net, create_target_net
from ace_lightning.errors import ConfigError, did_you_mean

KINDS = ("cert", "core", "gate")


def build_net(cfg: Mapping[str, Any], info: Any, **overrides: Any) -> nn.Module:
    """Build from a conf/net/*.yaml mapping (``name``, ``kind`` = cert|core|gate, constructor
    kwargs; or ``_target_``, a user's class: nets/target.py) and a DatasetInfo (shape, classes,
    mean/std). ``overrides`` win over ``cfg``."""
    kw = {**dict(cfg), **overrides}
    if kw.get("_target_"):
        kind = kw.get("kind", "cert")
        if kind not in KINDS:
            raise ConfigError(f"unknown net kind '{kind}'; known: {', '.join(KINDS)}")
        return create_target_net(kw, info, kind)
    name, kind = kw.pop("name"), kw.pop("kind", "cert")
    if kind == "cert":
        return create_cert_net(name, info.input_shape, info.num_classes, info.mean, info.std, **kw)
    if kind == "gate":
        return create_gate(name, info.input_shape, info.mean, info.std, **kw)
    if kind == "core":
        return create_core(name, info.num_classes, info.input_shape, mean=info.mean, std=info.std, **kw)
    raise ConfigError(f"unknown net kind '{kind}'; known: cert, core, gate")


def _keywords(fn: Any, skip: int) -> list[str]:
    import inspect

    return list(inspect.signature(fn).parameters)[skip:]


def check_net_config(cfg: Mapping[str, Any], what: str) -> None:
    """A net config's name (or ``_target_``), kind and keyword arguments, checked before anything
    is built or trained (``what``: where it came from, e.g. cert_net); one-line ConfigErrors."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{what} must be a net config (name or _target_, kind, arguments), got {cfg!r}")
    kind = cfg.get("kind", "cert")
    if kind not in KINDS:
        raise ConfigError(f"{what}.kind: unknown net kind '{kind}'; known: {', '.join(KINDS)}")
    if cfg.get("_target_"):
        check_target_net(cfg)
        return
    name = cfg.get("name")
    if not name:
        raise ConfigError(f"{what} names no network: give name (conf/net/) or _target_ (a class path)")
    if kind in ("cert", "gate"):
        if name not in CERT_NETS:
            raise ConfigError(f"unknown cert-net '{name}'{did_you_mean(name, CERT_NETS)}; known: "
                              f"{', '.join(sorted(CERT_NETS))}")
        known = ["name", "kind", "downsample", *_keywords(CERT_NETS[name], 2)]  # (stem, k, ...)
    else:
        from ace_lightning.nets.core import create_core

        known = ["name", "kind", *[k for k in _keywords(create_core, 3) if k not in ("mean", "std", "kwargs")]]
        if name in CORE_NETS:
            known += _keywords(CORE_NETS[name], 2)  # (input_shape, num_classes, ...)
        else:
            import timm

            if not timm.is_model(name):
                raise ConfigError(
                    f"unknown core '{name}': neither a built-in core ({', '.join(CORE_NETS)}) nor a timm model; "
                    f"list timm names with: python -c \"import timm; print(timm.list_models('*resnet*'))\"")
            return  # timm models take their own keyword arguments
    for key in cfg:
        if key not in known:
            raise ConfigError(f"unknown knob '{key}' for net '{name}' ({what}){did_you_mean(str(key), known)}")


__all__ = [
    "CERT_NETS", "CORE_NETS", "Normalize", "PretrainedUnavailableError", "build_net", "check_net_config",
    "create_cert_net", "create_core", "create_gate", "eval_mode", "final_linear_name", "init_gate_from_cert",
]
