"""Reading weight files safely (``weights_only=True``) and matching them to a module.

Accepted files: a raw state_dict, ``{'state_dict': ...}`` (Lightning checkpoints, keys may carry
a prefix such as ``cert.``), ``{'model': ...}``, or ``.safetensors``. Never unpickles objects.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch
from ace_lightning.errors import ConfigError, InputNotFoundError


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file; one-line errors for missing or unsupported files."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise InputNotFoundError(f"weight file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read {path} as a weights-only torch file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(obj)


def strip_prefix(state: Mapping[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Drop the longest common prefix (``module.``, ``cert.``, ``model.core.`` ...) that makes the
    keys match ``expected``; unchanged when they already match or no prefix helps."""
    expected = list(expected)
    if not expected or any(k in state for k in expected):
        return dict(state)
    anchor = expected[0]
    for key in state:
        if key.endswith("." + anchor):
            prefix = key[: -len(anchor)]
            stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if sum(k in stripped for k in expected) > len(expected) // 2:
                return stripped
    return dict(state)


def describe_mismatch(
    module_state: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor], limit: int = 3,
) -> str:
    """'missing: a, b; unexpected: c; shape: d (file [3] vs net [4])' - empty when they match."""
    missing = [k for k in module_state if k not in file_state]
    unexpected = [k for k in file_state if k not in module_state]
    shapes = [
        f"{k} (file {list(file_state[k].shape)} vs net {list(v.shape)})"
        for k, v in module_state.items() if k in file_state and file_state[k].shape != v.shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def _fixed_buffers(net: torch.nn.Module) -> set[str]:
    """State-dict keys of the Normalize layers: set by the dataset, not learnt, so a file from
    another library (which normalises outside the net) need not carry them."""
    from ace_lightning.nets.layers import Normalize

    return {f"{name}.{b}" if name else b for name, m in net.named_modules() if isinstance(m, Normalize)
            for b in ("mean", "std")}


def load_external_weights(net: torch.nn.Module, path: str, what: str = "cert-net") -> str:
    """Load a cert-net trained elsewhere (weights only). Keys are matched by name (after dropping
    a common prefix such as ``module.``); when no name matches but the tensors' shapes match one
    to one in order (a torch Sequential of the same layers, e.g. another library's CNN7), by order.
    Normalize buffers may be absent. Returns 'names' or 'order'; a one-line ValueError names the
    mismatched keys otherwise."""
    target = net.state_dict()
    fixed = _fixed_buffers(net)
    learnt = {k: v for k, v in target.items() if k not in fixed}
    state = strip_prefix(load_state_dict_file(path), learnt.keys())
    state = {k: v for k, v in state.items() if not (k in fixed and v.shape == target[k].shape)}
    how = "names"
    if not any(k in learnt for k in state):
        values = list(state.values())
        if len(values) == len(learnt) and all(a.shape == b.shape for a, b in zip(values, learnt.values())):
            state, how = dict(zip(learnt.keys(), values)), "order"
    problem = describe_mismatch(learnt, state)
    if problem:
        raise ConfigError(f"{path} does not fit {what}: {problem}")
    net.load_state_dict({**target, **state})
    return how
