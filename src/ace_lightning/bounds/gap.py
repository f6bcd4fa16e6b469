"""Margin selection (docs/METHOD.md section 5b): the selector is the cert-net's own top-1 minus
top-2 logit gap, gap(z) = z_c - max_{j != c} z_j with c = argmax z, so it needs no network and no
relaxation of its own: its bounds come from the margin bounds the certifier computes anyway.

Over the ball, with c the class predicted at x and [lb_j, ub_j] bounds of z_c - z_j (one bound
pass with the specification rows e_c - e_j):
- lower: m = min_j lb_j. If m > 0, c stays the top class on the whole ball and gap >= m there;
  otherwise the class may change and only gap >= 0 holds. So lb_gap = max(m, 0), and lb_gap > 0
  exactly when the class is certified constant (the rule relies on that: rule.per_input_thresholds).
- upper: at a point where c is on top, gap = min_j (z_c - z_j) <= min_j ub_j; where another class
  c' is on top, gap = z_c' - max_{j != c'} z_j <= z_c' - z_c <= -lb_c'. So
  ub_gap = max(min_j ub_j, max_j -lb_j).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ace_lightning.bounds.precision import _working, precise


def gap(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit, in float64 (the dtype thresholds are compared in), [B]."""
    top2 = logits.to(torch.float64).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@precise
def gap_bounds(net: nn.Module, x: torch.Tensor, eps: float, method: str = "IBP", *,
               beta: Optional[float] = None, dtype=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gap(x), lb_gap, ub_gap) over B(x) intersected with [0, 1], from one bound pass of the margins
    of the class predicted at x; the margin bounds are widened outward for rounding first
    (bounds/outward.py). gap(x) from the bound pass's own forward, in float64."""
    from ace_lightning.bounds.entropy import _margin_pass, _predicted_class
    from ace_lightning.bounds.outward import param_dtype, widen

    deployed = param_dtype(net)
    net, x, work = _working(net, x, dtype)
    cls = _predicted_class(net, x)
    lb_d, ub_d, logits = _margin_pass(net, x, cls, eps, method, beta)
    size = 1.0 + 2.0 * logits.detach().abs().amax(-1, keepdim=True)
    lb_d, ub_d = widen(lb_d, ub_d, size + lb_d.abs() + ub_d.abs(), work, deployed)
    lb = lb_d.min(dim=-1).values.clamp_min(0.0)
    ub = torch.maximum(ub_d.min(dim=-1).values, (-lb_d).max(dim=-1).values)
    return gap(logits), lb, ub
