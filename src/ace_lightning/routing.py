"""The routing rule of ACE (docs/METHOD.md section 2), in one place: pair i answers x iff its
selector fires, g_i(x) >= T_i, and no earlier pair fired; the core answers when none fired.

The composed model (conditional execution), the reference forward pass, the gate-aware attack and
the certification rule all decide with these two functions, so they cannot disagree on a tie.
"""
from __future__ import annotations

from typing import Sequence

import torch


def selects(g: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Whether a selector value fires at a threshold (ties fire: g >= T)."""
    return g >= threshold


def first_firing(gates: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """gates [B, n], thresholds [n] -> the answering branch per input [B]: the first pair whose
    selector fires, n (the core) when none does."""
    n = gates.shape[1]
    fire = selects(gates, thresholds.to(gates.device).view(1, -1))
    first = fire.to(torch.int8).argmax(dim=1)  # argmax returns the first maximal index
    return torch.where(fire.any(dim=1), first, torch.full_like(first, n))


def composed_output(outputs: Sequence[torch.Tensor], branch: torch.Tensor) -> torch.Tensor:
    """outputs: n + 1 tensors [B, ...] (the pairs' cert-nets, then the core); each input takes the
    output of its branch."""
    stacked = torch.stack(list(outputs), dim=0)  # [n + 1, B, ...]
    idx = branch.view(1, -1, *([1] * (stacked.dim() - 2))).expand(1, *stacked.shape[1:])
    return stacked.gather(0, idx).squeeze(0)
