"""What a bound is asked for, checked before anything is computed: the method names (cheap to
tight, with their aliases: the registry of bounds/methods.py), the l-inf ball intersected with the
pixel box [0, 1] (eps in pixel space, docs/METHOD.md section 1) or an explicit box, and the margin
specification C. No auto_LiRPA here: a question that does not make sense is refused in one line
before a bound pass starts.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ace_lightning.bounds.methods import BOUND_METHODS
from ace_lightning.errors import ConfigError

METHODS = BOUND_METHODS.names()  # cheap to tight (bounds/methods.py registers them in that order)


def normalize_method(method: str) -> str:
    """Canonical method name (or the one-line ConfigError naming the closest known one)."""
    return BOUND_METHODS.canonical(method)


def validate_ball(x: torch.Tensor, eps: float) -> float:
    """Check eps in [0, 1] and x inside the pixel box; returns eps as a float."""
    try:
        eps_f = float(eps)
    except (TypeError, ValueError):
        raise ConfigError(f"eps must be a number in [0, 1] (pixel space), got {eps!r}") from None
    if not np.isfinite(eps_f) or eps_f < 0 or eps_f > 1:
        raise ConfigError(f"eps must be in [0, 1] (pixel space, e.g. 2/255), got {eps_f}")
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ConfigError("x must be a floating-point tensor of images in [0, 1]")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ConfigError(f"x must lie in the pixel box [0, 1] (got values in [{x.min().item():.4g}, "
                         f"{x.max().item():.4g}]); normalisation belongs inside the net")
    return eps_f


def input_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """B(x) intersected with [0, 1], as elementwise lower/upper corners."""
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def margin_spec(y: torch.Tensor, num_classes: int, dtype=None) -> torch.Tensor:
    """C with rows e_y - e_j for j != y: shape [B, K-1, K]."""
    batch = y.shape[0]
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # [B, K, K]: row j is e_y - e_j
    keep = torch.arange(num_classes, device=y.device).unsqueeze(0) != y.unsqueeze(1)  # [B, K]
    return c[keep].view(batch, num_classes - 1, num_classes)


def validate_box(lower: torch.Tensor, upper: torch.Tensor, x: Optional[torch.Tensor] = None) -> None:
    """Check a box [lower, upper] inside the pixel box [0, 1] (and x inside it, when given)."""
    for name, t in (("lower", lower), ("upper", upper)):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ConfigError(f"box {name} corner must be a floating-point tensor of images in [0, 1]")
    if lower.shape != upper.shape:
        raise ConfigError(f"box corners differ in shape: {tuple(lower.shape)} vs {tuple(upper.shape)}")
    if lower.numel() == 0:
        return
    if lower.min() < 0 or upper.max() > 1:
        raise ConfigError(f"box must lie in the pixel box [0, 1] (got values in [{lower.min().item():.4g}, "
                         f"{upper.max().item():.4g}]); normalisation belongs inside the net")
    if (lower > upper).any():
        raise ConfigError("box lower corner exceeds its upper corner somewhere (need lower <= upper)")
    if x is not None:
        if x.shape != lower.shape:
            raise ConfigError(f"x has shape {tuple(x.shape)} but the box {tuple(lower.shape)}")
        if (x < lower).any() or (x > upper).any():
            raise ConfigError("x must lie inside the box [lower, upper]")


def check_beta(method: str, beta: Optional[float]) -> Optional[float]:
    if beta is None:
        return None
    if method != "CROWN-IBP":
        raise ConfigError(f"beta mixes CROWN-IBP with IBP; it is meaningless for method {method!r}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta must be in [0, 1], got {beta}")
    return beta


def check_c(C: Optional[torch.Tensor], batch: int) -> None:
    if C is not None and (C.dim() != 3 or C.shape[0] != batch):
        raise ConfigError(f"C must have shape [batch, specs, outputs], got {tuple(C.shape)}")


def check_labels(y, batch: int, num_classes: int, device) -> torch.Tensor:
    y = torch.as_tensor(y, device=device).long().view(-1)
    if y.shape[0] != batch or (y.numel() and (y.min() < 0 or y.max() >= num_classes)):
        raise ConfigError(f"labels must be {batch} class indices in [0, {num_classes})")
    return y
