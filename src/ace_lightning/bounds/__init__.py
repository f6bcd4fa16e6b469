"""The bound layer: the only part of ace-lightning that talks to auto_LiRPA.

Public API (later stages build on these names):
- ``output_bounds(net, x, eps, method)`` -> (lb, ub) over B(x) intersected with [0, 1];
- ``margin_lower_bounds(net, x, y, eps, method)`` -> Tensor[B, K-1], lower bounds of z_y - z_j;
- ``robust_ce_loss(net, x, y, eps, method, beta=..., loss_fusion=...)`` for certified training.
Methods: "IBP", "CROWN-IBP", "CROWN", "alpha-CROWN".
"""
from ace_lightning.bounds.lirpa import (
    METHODS,
    bounded_module,
    clear_cache,
    input_box,
    margin_lower_bounds,
    margin_spec,
    normalize_method,
    output_bounds,
    robust_ce_loss,
    validate_ball,
)

__all__ = [
    "METHODS",
    "bounded_module",
    "clear_cache",
    "input_box",
    "margin_lower_bounds",
    "margin_spec",
    "normalize_method",
    "output_bounds",
    "robust_ce_loss",
    "validate_ball",
]
