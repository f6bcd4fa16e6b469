"""Architectures: cert-nets (C2, C3, C5, CNN7, WRN, ...), timm cores, gates."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ace_lightning.nets.cert import CERT_NETS, create_cert_net
from ace_lightning.nets.core import CORE_NETS, PretrainedUnavailableError, create_core
from ace_lightning.nets.gate import create_gate, final_linear_name, init_gate_from_cert
from ace_lightning.nets.layers import Normalize, eval_mode
from ace_lightning.errors import ConfigError


def build_net(cfg: Mapping[str, Any], info: Any, **overrides: Any) -> nn.Module:
    """Build from a conf/net/*.yaml mapping (``name``, ``kind`` = cert|core|gate, constructor
    kwargs) and a DatasetInfo (shape, classes, mean/std). ``overrides`` win over ``cfg``."""
    kw = {**dict(cfg), **overrides}
    name, kind = kw.pop("name"), kw.pop("kind", "cert")
    if kind == "cert":
        return create_cert_net(name, info.input_shape, info.num_classes, info.mean, info.std, **kw)
    if kind == "gate":
        return create_gate(name, info.input_shape, info.mean, info.std, **kw)
    if kind == "core":
        return create_core(name, info.num_classes, info.input_shape, mean=info.mean, std=info.std, **kw)
    raise ConfigError(f"unknown net kind '{kind}'; known: cert, core, gate")


__all__ = [
    "CERT_NETS", "CORE_NETS", "Normalize", "PretrainedUnavailableError", "build_net", "create_cert_net",
    "create_core", "create_gate", "eval_mode", "final_linear_name", "init_gate_from_cert",
]
