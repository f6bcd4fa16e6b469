"""The bound methods, cheap to tight, one registry: each registers itself here with its aliases and
says how it bounds C f over the input box on the BoundedModule bounds/lirpa.py built (which is still
the only module that imports auto_LiRPA; a method only calls the module it is handed).

A method is ``fn(bounded, bx, C, beta, lower, upper) -> (logits at x, lb, ub)`` (``lower`` /
``upper``: which sides are needed); ``BOUND_METHODS.create(method, ...)`` runs it. The registration
order is the order everything else uses (cheap to tight; the records' method codes index it).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from ace_lightning.errors import ConfigError
from ace_lightning.registries import Registry

BOUND_METHODS: Registry = Registry("bound method")
Bounds = tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]  # logits at x, lb, ub

ALPHA_CROWN_ITERATIONS = 20  # defaults of conf/stage/certify.yaml alpha_crown_iterations / _lr
ALPHA_CROWN_LR = 0.5
_ALPHA_CROWN = {"iteration": ALPHA_CROWN_ITERATIONS, "lr_alpha": ALPHA_CROWN_LR}


@contextlib.contextmanager
def alpha_crown_options(iterations: int = ALPHA_CROWN_ITERATIONS, lr: float = ALPHA_CROWN_LR) -> Iterator[None]:
    """alpha-CROWN's slope optimisation (steps, learning rate) for the bounds computed inside."""
    if int(iterations) < 1 or not float(lr) > 0:
        raise ConfigError(f"alpha-CROWN needs iterations >= 1 and lr > 0, got {iterations} and {lr}")
    saved = dict(_ALPHA_CROWN)
    _ALPHA_CROWN.update(iteration=int(iterations), lr_alpha=float(lr))
    try:
        yield
    finally:
        _ALPHA_CROWN.clear()
        _ALPHA_CROWN.update(saved)


@BOUND_METHODS.register("IBP")
def ibp(bounded: Any, bx: Any, C: Optional[torch.Tensor], beta: Optional[float], lower: bool,
        upper: bool) -> Bounds:
    """Interval bound propagation (Gowal et al. 2018)."""
    logits = bounded(bx)
    return (logits, *bounded.compute_bounds(C=C, method="IBP"))


@BOUND_METHODS.register("CROWN-IBP", aliases=("crown_ibp",))
def crown_ibp(bounded: Any, bx: Any, C: Optional[torch.Tensor], beta: Optional[float], lower: bool,
              upper: bool) -> Bounds:
    """CROWN-IBP (Zhang et al. 2020): CROWN's last pass on IBP's intermediate intervals, mixed
    with IBP by ``beta`` (1: CROWN-IBP alone, below 1e-8: IBP alone)."""
    logits = bounded(bx)
    if beta is not None and beta < 1e-8:
        lb, ub = bounded.compute_bounds(C=C, method="IBP")
    else:
        # IBP first: it stores the intermediate intervals that the CROWN pass reuses.
        ilb, iub = bounded.compute_bounds(C=C, method="IBP")
        clb, cub = bounded.compute_bounds(C=C, method="backward", IBP=False,
                                          bound_lower=lower, bound_upper=upper)
        b = 1.0 if beta is None else beta
        lb = b * clb + (1 - b) * ilb if lower else ilb
        ub = b * cub + (1 - b) * iub if upper else iub
    return logits, lb, ub


@BOUND_METHODS.register("CROWN")
def crown(bounded: Any, bx: Any, C: Optional[torch.Tensor], beta: Optional[float], lower: bool,
          upper: bool) -> Bounds:
    """CROWN (Zhang et al. 2018): backward linear relaxation through every layer."""
    logits = bounded(bx)
    return (logits, *bounded.compute_bounds(C=C, method="backward", bound_lower=lower, bound_upper=upper))


@BOUND_METHODS.register("alpha-CROWN", aliases=("crown-optimized", "alpha_crown"))
def alpha_crown(bounded: Any, bx: Any, C: Optional[torch.Tensor], beta: Optional[float], lower: bool,
                upper: bool) -> Bounds:
    """alpha-CROWN (Xu et al. 2021) is an evaluation method: only the ReLU slopes are optimised,
    the parameters are held fixed (with them requiring grad, train-mode BN statistics carry a graph
    that every optimisation step back-propagates through, and 0.3 fails on the second step)."""
    bounded.set_bound_opts({"optimize_bound_args": dict(_ALPHA_CROWN)})
    params = [p for p in bounded.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            logits = bounded(bx)
        with torch.enable_grad():
            lb, ub = bounded.compute_bounds(x=(bx,), C=C, method="CROWN-Optimized",
                                            bound_lower=lower, bound_upper=upper)
    finally:
        for p in params:
            p.requires_grad_(True)
    return logits, (lb.detach() if lb is not None else None), (ub.detach() if ub is not None else None)
