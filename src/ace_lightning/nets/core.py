"""Core networks: any timm model (or a small CPU CNN) behind a fixed Normalize layer.

The core is never certified or retrained by ACE, it only has to be accurate. At 32 px the usual
ImageNet stems throw away most of the image, so small inputs get an adapted stem
(docs/METHOD.md section 6): ResNets a 3x3 stride-1 first conv and no max-pool, EfficientNets a
stride-1 stem; the reference code upsampled to 224 px instead (slow).

Returned modules are ``nn.Sequential(normalize=Normalize, model=<net>)``. Weights come from a
local file (``pretrained_path``), or from timm's hub when ``pretrained=True`` and there is a
network; offline, the error names the file to provide.
"""
from __future__ import annotations

import contextlib
import logging
import socket
from collections import OrderedDict
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from ace_lightning.nets.checkpoint import describe_mismatch, load_state_dict_file, strip_prefix
from ace_lightning.nets.kinds import NET_KINDS, keywords
from ace_lightning.nets.layers import Normalize
from ace_lightning.errors import ConfigError
from ace_lightning.registries import Registry

log = logging.getLogger(__name__)
# built-in cores (input_shape, num_classes, **knobs) -> model; any other name is a timm model
CORE_NETS: Registry = Registry("core")


class PretrainedUnavailableError(RuntimeError):
    """Hub weights were requested but cannot be fetched; the message names the file to provide."""


@CORE_NETS.register()
def small_cnn(input_shape: Sequence[int], num_classes: int, width: int = 32, hidden: int = 256, dropout: float = 0.3) -> nn.Sequential:
    """Fast CPU core for demos: 3 conv-BN-ReLU (2 max-pools), dropout, fc. On Fashion-MNIST a few
    epochs of Adam should reach about 92% (1x28x28: ~1.7 M params)."""
    c, h, w = (int(v) for v in input_shape)
    feats = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = feats.eval()(torch.zeros(1, c, h, w)).shape[1]
    feats.train()
    return nn.Sequential(
        *feats, nn.Dropout(dropout), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def _hub_host() -> str:
    try:
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:
        return "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds rather than after retries."""
    try:
        with socket.create_connection((_hub_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hf_offline(enabled: bool) -> Iterator[None]:
    """Temporarily put huggingface_hub into offline mode (cached weights still load)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _timm_pretrained(name: str, **kwargs) -> nn.Module:
    online = _hub_reachable()
    try:
        with _hf_offline(not online):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        cfg = getattr(timm.models, "get_pretrained_cfg", lambda n: None)(name)
        source = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or "timm's hub"
        why = "no network" if not online else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise PretrainedUnavailableError(
            f"cannot fetch pretrained weights for core '{name}' ({why}); download them where there is "
            f"network (e.g. {source}: model.safetensors or a .pth state_dict) and pass "
            f"pretrained_path=<that file> instead of pretrained=true"
        ) from exc


def adapt_stem(model: nn.Module, name: str) -> bool:
    """Small-input stem (see module doc); returns whether a known stem was adapted."""
    conv1 = getattr(model, "conv1", None)
    if conv1 is not None and hasattr(model, "maxpool"):  # timm ResNet family
        if isinstance(conv1, nn.Conv2d):
            model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=conv1.bias is not None)
        else:  # deep stem (resnet*d): keep it, make its first conv stride 1
            first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        model.maxpool = nn.Identity()
        return True
    stem = getattr(model, "conv_stem", None)
    if isinstance(stem, nn.Conv2d):  # EfficientNet / MobileNet family
        stem.stride = (1, 1)
        return True
    log.warning("core '%s': no small-input stem adaptation known; using timm's stem unchanged", name)
    return False


def create_core(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    pretrained_path: Optional[str] = None,
    pretrained: bool = False,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    adapt_small_stem: Optional[bool] = None,
    **kwargs,
) -> nn.Sequential:
    """A core: ``Normalize(mean, std)`` then a timm model (or a CORE_NETS entry).

    mean/std default to identity normalisation: pass the dataset's (build_net does).
    ``pretrained_path`` wins over ``pretrained`` (no network is touched when a file is given).
    ``adapt_small_stem`` defaults to True for inputs smaller than 128 px.
    """
    c, h, w = (int(v) for v in input_shape)
    mean = tuple(mean) if mean is not None else (0.0,) * c
    std = tuple(std) if std is not None else (1.0,) * c
    if name in CORE_NETS:
        if pretrained and not pretrained_path:
            raise ConfigError(f"core '{name}' has no hub weights; pass pretrained_path=<file> or pretrained=false")
        model = CORE_NETS.create(name, (c, h, w), num_classes, **kwargs)
    else:
        check_timm_name(name)
        tkw = dict(num_classes=num_classes, in_chans=c, **kwargs)
        model = _timm_pretrained(name, **tkw) if (pretrained and not pretrained_path) else timm.create_model(name, **tkw)
        if adapt_small_stem if adapt_small_stem is not None else min(h, w) < 128:
            adapt_stem(model, name)
    net = nn.Sequential(OrderedDict(normalize=Normalize(mean, std), model=model))
    if pretrained_path:
        load_core_weights(net, pretrained_path, name)
    return net


def check_timm_name(name: str) -> None:
    """A core that is not built in must be a timm model."""
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown core '{name}': neither a built-in core ({', '.join(CORE_NETS)}) nor a timm model; "
            f"list timm names with: python -c \"import timm; print(timm.list_models('*resnet*'))\"")


@NET_KINDS.register("core")
class CoreKind:
    """``kind: core``: a built-in core or a timm model behind the data's normalisation."""

    @staticmethod
    def build(name: str, info: Any, **kw: Any) -> nn.Sequential:
        return create_core(name, info.num_classes, info.input_shape, mean=info.mean, std=info.std, **kw)

    @staticmethod
    def knobs(name: str) -> Optional[list[str]]:
        """The keys a net config of ``name`` may have; None for a timm model (it takes its own)."""
        if name not in CORE_NETS:
            check_timm_name(name)
            return None
        own = [k for k in keywords(create_core, 3) if k not in ("mean", "std", "kwargs")]
        return ["name", "kind", *own, *keywords(CORE_NETS.get(name), 2)]


def load_core_weights(net: nn.Sequential, path: str, name: str = "core") -> None:
    """Load a file saved from a core built here (keys ``normalize.*``/``model.*``, strict) or the
    bare timm model's weights (e.g. ImageNet ones): there a classifier of another class count
    and an adapted first conv are skipped (left freshly initialised), nothing else may differ."""
    state = strip_prefix(load_state_dict_file(path), net.state_dict().keys())
    if any(k.startswith(("normalize.", "model.")) for k in state):
        problem = describe_mismatch(net.state_dict(), state)
        if problem:
            raise ConfigError(f"{path} does not fit core '{name}': {problem}")
        net.load_state_dict(state)
        return
    target = net.model.state_dict()
    cfg = getattr(net.model, "pretrained_cfg", None) or {}
    skippable = tuple(p for p in (cfg.get("classifier"), cfg.get("first_conv")) if p)
    first_conv = f"{cfg.get('first_conv')}.weight"
    state = dict(state)
    if first_conv in state and first_conv in target and state[first_conv].shape != target[first_conv].shape:
        src, dst = state[first_conv], target[first_conv]
        if src.shape[2:] == dst.shape[2:] and src.shape[0] == dst.shape[0]:
            from timm.models import adapt_input_conv

            state[first_conv] = adapt_input_conv(dst.shape[1], src)  # other input channel count
    skipped = [k for k in target if k in state and state[k].shape != target[k].shape and k.startswith(skippable)]
    for k in skipped:
        del state[k]
    problem = describe_mismatch({k: v for k, v in target.items() if k not in skipped}, state)
    if problem:
        raise ConfigError(f"{path} does not fit core '{name}': {problem}")
    if skipped:
        log.info("core '%s': kept fresh %s (shape differs from %s)", name, ", ".join(skipped), path)
    net.model.load_state_dict({**target, **state})
