"""Full precision for every bound, whatever the caller's context (docs/METHOD.md section 12): autocast
off, TF32 / bf16 float32 kernels off during the call (restored afterwards, also on error), inputs
and net in float32 or float64. Bounds computed under bfloat16 autocast came back as float32 tensors
with lower bounds that were too high: false certificates. Shared by every bound module (lirpa,
entropy, gap, ladder) and by the certification rule's caller (ace.py).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from typing import Callable, Optional, TypeVar, Union

import torch
from torch import nn

from ace_lightning.errors import ConfigError

# Backends whose float32 kernels may silently run in TF32 or bfloat16 (torch >= 2.9 API; the legacy
# allow_tf32 flags and set_float32_matmul_precision read through these, so restoring them
# restores every reading).
_FP32_KNOBS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"),
               ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))
_AUTOCAST_DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_F = TypeVar("_F", bound=Callable)


def _fp32_knobs() -> list:
    knobs = []
    for backend, op in _FP32_KNOBS:
        obj = getattr(getattr(torch.backends, backend, None), op, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            knobs.append(obj)
    return knobs


@contextlib.contextmanager
def full_precision():
    """Autocast off on every device type and IEEE float32 kernels (no TF32, no bf16) for the
    duration; the caller's settings come back afterwards, also when the body raises."""
    knobs = _fp32_knobs()
    saved = [(k, k.fp32_precision) for k in knobs]
    legacy = []
    if not knobs:  # torch < 2.9: the allow_tf32 flags
        legacy = [(torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32),
                  (torch.backends.cudnn, torch.backends.cudnn.allow_tf32)]
    try:
        for k, _ in saved:
            k.fp32_precision = "ieee"
        for obj, _ in legacy:
            obj.allow_tf32 = False
        with contextlib.ExitStack() as stack:
            for device in _AUTOCAST_DEVICES:
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
            yield
    finally:
        for k, value in reversed(saved):
            k.fp32_precision = value
        for obj, value in legacy:
            obj.allow_tf32 = value


def precise(fn: _F) -> _F:
    """Decorator: run a bound function under ``full_precision``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with full_precision():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def resolve_dtype(dtype: Union[None, str, torch.dtype], x: Optional[torch.Tensor] = None,
                  net: Optional[nn.Module] = None) -> torch.dtype:
    """float32 or float64. None: float64 when x or the net already is, else float32 (half and
    bfloat16 inputs or nets are lifted to float32: a bound is never computed in less)."""
    if dtype is None:
        wide = (x is not None and x.dtype == torch.float64) or (
            net is not None and any(p.dtype == torch.float64 for p in net.parameters()))
        return torch.float64 if wide else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"bound dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ConfigError(f"bound dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


_SHADOWS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def net_in_dtype(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``net`` itself when its floating tensors already are ``dtype``; otherwise a cached copy in
    ``dtype`` holding the net's current weights, buffers and mode. Bounds through a copy carry no
    gradient to the net's parameters (float64 is an evaluation precision)."""
    tensors = list(net.parameters()) + list(net.buffers())
    if all(t.dtype == dtype or not t.is_floating_point() for t in tensors):
        return net
    shadow = _SHADOWS.setdefault(net, {}).get(dtype)
    if shadow is None:
        shadow = copy.deepcopy(net).to(dtype)
        for p in shadow.parameters():
            p.requires_grad_(False)
        _SHADOWS[net][dtype] = shadow
    with torch.no_grad():
        for dst, src in zip(shadow.parameters(), net.parameters()):
            dst.copy_(src)
        for dst, src in zip(shadow.buffers(), net.buffers()):
            dst.copy_(src)
    return shadow.train(net.training)


def _working(net: nn.Module, x: torch.Tensor, dtype) -> tuple[nn.Module, torch.Tensor, torch.dtype]:
    dtype = resolve_dtype(dtype, x, net)
    return net_in_dtype(net, dtype), x.to(dtype), dtype
