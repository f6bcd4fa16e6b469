"""A user's own network, named by ``_target_`` (a class path) in a net config wherever a registry
name works: core (``kind: core``), cert-net (``kind: cert``) and the gate made from a cert-net.

    _target_: mypkg.MyNet   # built with hydra.utils.instantiate
    kind: cert              # cert | core
    width: 64               # the class's own keyword arguments

The class receives ``num_classes`` (1 for a gate) and ``input_shape`` (C, H, W: what it sees)
when its constructor takes them. The dataset's normalisation is put in front of it as for the
built-in nets (inputs, and eps, stay in pixel space [0, 1]); a cert-net may also take
``downsample`` (an average-pooled view), a core ``pretrained_path``. A cert-net or gate must be a
network the bound layer can trace (auto_LiRPA: Conv2d, Linear, ReLU, Flatten, BatchNorm, ...);
its last Linear layer is the head a gate replaces.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from ace_lightning.errors import ACEError, ConfigError, did_you_mean
from ace_lightning.nets.cert import input_stem
from ace_lightning.nets.layers import Normalize

# keys of a net config that are ace-lightning's, not the class's keyword arguments
RESERVED = ("_target_", "name", "kind", "downsample", "pretrained_path")
GIVEN = ("num_classes", "input_shape")  # what the class receives from the data when it takes them


def locate(target: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError: the path does not resolve
        reason = " ".join(str(err).split()).split(" Are you sure")[0]
        raise ConfigError(f"net _target_ '{target}' cannot be imported ({reason})") from None


def _params(cls: Any) -> tuple[list[str], bool]:
    """(keyword parameters, whether it takes **kwargs) of a class or function."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return [], True
    return ([k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)],
            any(p.kind == p.VAR_KEYWORD for p in params.values()))


def check_target_net(cfg: Mapping[str, Any]) -> None:
    """The class resolves and takes every configured keyword argument (before anything is built)."""
    target = str(cfg["_target_"])
    names, open_kwargs = _params(locate(target))
    if open_kwargs:
        return
    known = [k for k in names if k not in GIVEN]
    for key in cfg:
        if key not in RESERVED and not str(key).startswith("_") and key not in known:
            raise ConfigError(f"unknown knob '{key}' for net '{target}'{did_you_mean(str(key), known)}")


def create_target_net(cfg: Mapping[str, Any], info: Any, kind: str) -> nn.Sequential:
    """Normalize (and an optional downsample) + the user's class, checked to give one logit per
    class (one for a gate) on an input of the data's shape."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = str(cfg["_target_"])
    check_target_net(cfg)
    names, open_kwargs = _params(locate(target))
    num_classes = 1 if kind == "gate" else int(info.num_classes)
    full = tuple(int(v) for v in info.input_shape)
    if kind == "core":
        layers, shape = [], full
    else:
        stem = input_stem(full, info.mean, info.std, cfg.get("downsample"))
        layers, shape = stem.layers, stem.shape
    given = {k: v for k, v in (("num_classes", num_classes), ("input_shape", shape)) if open_kwargs or k in names}
    kwargs = {k: v for k, v in cfg.items() if k not in RESERVED}
    try:
        body = instantiate({"_target_": target, "_convert_": "all", **kwargs}, **given)
    except InstantiationException as err:
        if isinstance(err.__cause__, ACEError):
            raise err.__cause__ from None
        raise ConfigError(f"net '{target}' cannot be built: {' '.join(str(err.__cause__ or err).split())}") from None
    if not isinstance(body, nn.Module):
        raise ConfigError(f"net _target_ '{target}' made a {type(body).__name__}, not a torch.nn.Module")
    if kind == "core":
        net = nn.Sequential(OrderedDict(normalize=Normalize(info.mean, info.std), model=body))
        if cfg.get("pretrained_path"):
            from ace_lightning.nets.core import load_core_weights

            load_core_weights(net, str(cfg["pretrained_path"]), target)
    else:
        net = nn.Sequential(*layers, body)
    was = net.training
    net.eval()  # a probe: BatchNorm statistics untouched
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *full))
    except Exception as err:  # noqa: BLE001 - the user's forward pass on the data's shape
        raise ConfigError(f"net '{target}' fails on inputs of the data's shape {list(full)}: "
                          f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    net.train(was)
    if tuple(out.shape) != (2, num_classes):
        what = "a gate needs 1 logit" if kind == "gate" else f"the data has {num_classes} classes"
        raise ConfigError(f"net '{target}' gives outputs of shape {list(out.shape[1:])} per input; {what}")
    return net
