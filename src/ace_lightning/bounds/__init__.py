"""The bound layer: the only part of ace-lightning that talks to auto_LiRPA.

Public API (later stages build on these names):
- ``output_bounds(net, x, eps, method)`` -> (lb, ub) over B(x) intersected with [0, 1];
- ``margin_lower_bounds(net, x, y, eps, method)`` -> Tensor[B, K-1], lower bounds of z_y - z_j;
- ``robust_ce_loss(net, x, y, eps, method, beta=..., loss_fusion=...)`` for certified training;
- ``box_bounds(net, lower, upper, method)`` / ``box_margin_lower_bounds`` over an arbitrary box
  (SABR's small box); ``bound_pass`` (lower bounds of C f over a ball or a box, with the bounds of
  every ReLU's input) for the training losses;
- ``entropy_bounds(net, x, eps, method, route)`` -> (lb_H, ub_H) for the entropy gate, and
  ``entropy_gate_bounds`` -> (g, lb_g, ub_g) with g = -H; ``entropy_selection_loss`` for
  co-training (bounds/entropy.py);
- ``ladder``: certification from cheap to tight and the float64 re-check near a decision.
Every bound is computed in full precision (``full_precision``, bounds/precision.py: autocast off,
no TF32/bf16 float32 kernels) in float32 or float64 (``dtype=``), whatever the caller's context; the
question (method names, ball or box, specification C) is checked in bounds/problem.py.
Methods: "IBP", "CROWN-IBP", "CROWN", "alpha-CROWN".
"""
from ace_lightning.bounds.precision import DTYPES, full_precision, resolve_dtype
from ace_lightning.bounds.problem import METHODS, input_box, margin_spec, normalize_method, validate_ball, validate_box
from ace_lightning.bounds.lirpa import (
    BoundPass,
    bound_pass,
    box_bounds,
    box_margin_lower_bounds,
    bounded_module,
    clear_cache,
    margin_ce,
    margin_lower_bounds,
    padded_rows,
    output_bounds,
    worst_case_ce,
    robust_ce_loss,
)
from ace_lightning.bounds.entropy import (
    entropy,
    entropy_bounds,
    entropy_bounds_from_margins,
    entropy_gate_bounds,
    entropy_lower_bound_interval,
    entropy_selection_loss,
    entropy_selection_loss_from_margins,
    entropy_upper_bound_interval,
    entropy_upper_bound_margin,
    margin_threshold_for_entropy,
)

__all__ = [
    "DTYPES",
    "METHODS",
    "BoundPass",
    "bound_pass",
    "box_bounds",
    "box_margin_lower_bounds",
    "bounded_module",
    "clear_cache",
    "entropy",
    "entropy_bounds",
    "entropy_bounds_from_margins",
    "entropy_gate_bounds",
    "entropy_lower_bound_interval",
    "entropy_selection_loss",
    "entropy_selection_loss_from_margins",
    "entropy_upper_bound_interval",
    "entropy_upper_bound_margin",
    "full_precision",
    "input_box",
    "margin_ce",
    "margin_lower_bounds",
    "margin_spec",
    "margin_threshold_for_entropy",
    "padded_rows",
    "normalize_method",
    "output_bounds",
    "resolve_dtype",
    "worst_case_ce",
    "robust_ce_loss",
    "validate_ball",
    "validate_box",
]
