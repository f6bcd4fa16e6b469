"""Certification from cheap to tight, and the float64 re-check near a decision.

Nets trained with SABR or MTL-IBP have loose IBP bounds by design (docs/METHOD.md section 11), so a
certifier tries bound methods per input from cheap to tight (IBP, CROWN-IBP, CROWN, alpha-CROWN) and
stops at the first that certifies; inputs misclassified at x, or refuted by an attack, never reach
the expensive methods. Bounds are computed in float32 by default and widened outward by the
rounding slack of their dtype (bounds/outward.py); an input whose certified margin (or gate bound)
lies within ``recheck_tol`` of the decision is re-checked in float64, and float64 decides it
(docs/METHOD.md section 12): the re-check may withdraw a certificate or add one (a margin that
float32's slack left just below 0). Its results are written back rounded outward.

Everything here is a list of sound bounds: the max of sound lower bounds is sound, so is the
intersection of sound intervals.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ace_lightning.bounds.lirpa import margin_lower_bounds, padded_rows
from ace_lightning.bounds.precision import resolve_dtype
from ace_lightning.bounds.problem import normalize_method
from ace_lightning.bounds.outward import param_dtype, round_down, round_up, widen
from ace_lightning.errors import ConfigError

NO_METHOD = -1  # method index of an input no method certified
PAD_STEP = 32  # subsets of a batch are bounded padded to powers of two up to 32, then multiples of 32
# (x subset, method, dtype) -> (g, lb_g, ub_g) over the ball, for one selector
IntervalFn = Callable[[torch.Tensor, str, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def near(value: torch.Tensor, point: float | torch.Tensor, tol: float) -> torch.Tensor:
    """|value - point| <= tol * (1 + |point|): within the re-check tolerance of a decision."""
    point = torch.as_tensor(point, dtype=value.dtype, device=value.device)
    return (value - point).abs() <= tol * (1.0 + point.abs())


def _padded(idx: torch.Tensor) -> torch.Tensor:
    """Subsets padded to a few sizes (powers of two up to PAD_STEP, then its multiples): a
    BoundedModule is cached per input shape, and arbitrary subset sizes would each get one."""
    return padded_rows(idx, step=PAD_STEP)[0]


class Budget:
    """A per-input time budget for the tighter methods: each method's cost per input is measured
    as it runs (the first time on one input), and a method is tried on an input only if the input's
    time so far plus that cost fits its budget (alpha-CROWN on a CPU costs seconds per input and
    is skipped there, while a GPU affords it). None: no limit."""

    def __init__(self, seconds: Optional[float], n: int, device) -> None:
        self.seconds = seconds
        self.spent = torch.zeros(n, dtype=torch.float64, device=device)

    def affordable(self, idx: torch.Tensor, key) -> torch.Tensor:
        """The inputs that can afford the method (its cost per input measured before)."""
        if self.seconds is None:
            return idx
        return idx[self.spent[idx] + _COSTS[key] <= self.seconds]

    def charge(self, idx: torch.Tensor, key, seconds: float) -> None:
        per = seconds / max(1, idx.numel())
        _COSTS[key] = 0.5 * (_COSTS[key] + per)
        self.spent[idx] += per


_COSTS: dict = {}  # (net id, method, device, input shape) -> seconds per input, measured


def _timed(fn, idx, budget: Budget, key):
    """Run fn(idx) (a bound over those inputs) on the inputs whose budget affords it, charging its
    time. A method's cost is unknown the first time: it is measured on one input, and that probe's
    result is dropped, so that the bounds never depend on which calls came before (batch shapes
    change floating-point rounding). Returns (indices run, result per run index) or (empty, None)."""
    if budget.seconds is not None and key not in _COSTS and idx.numel():
        t0 = time.perf_counter()
        fn(idx[:1])
        _COSTS[key] = time.perf_counter() - t0
    idx = budget.affordable(idx, key)
    if idx.numel() == 0:
        return idx, None
    t0 = time.perf_counter()
    result = fn(idx)
    if budget.seconds is not None:
        budget.charge(idx, key, time.perf_counter() - t0)
    return idx, result


@dataclass
class MarginCertificate:
    """Per input: ok (every margin z_y - z_j provably > 0), the best certified margin found
    (max over the methods tried of min_j lb), the index of the method that certified (NO_METHOD
    if none), whether the float64 re-check decided it and whether it changed the decision, and
    the logits at x."""

    ok: torch.Tensor
    margin: torch.Tensor
    method: torch.Tensor
    rechecked: torch.Tensor
    flipped: torch.Tensor
    logits: torch.Tensor


def margin_ladder(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, methods: Sequence[str], *,
                  dtype=None, refute: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                  time_budget_s: Optional[float] = None, recheck_tol: float = 0.0) -> MarginCertificate:
    """Certify ``net`` on B(x, eps) for labels y, trying ``methods`` in order. The first method
    runs on every input (it also gives the logits); each later one only on inputs that are
    correct at x, not yet certified, and not refuted (``refute(indices)`` -> bool mask, called once
    before the first tighter method: an attack's counterexample means no method can certify).
    ``time_budget_s``: seconds per input for the tighter methods (Budget).
    ``recheck_tol`` > 0: inputs whose certified margin lies within it of 0 are decided in float64."""
    methods = [normalize_method(m) for m in methods]
    if not methods:
        raise ConfigError("certification needs at least one bound method")
    work = resolve_dtype(dtype, x, net)
    lb, logits = margin_lower_bounds(net, x, y, eps, methods[0], return_logits=True, dtype=work)
    # outward: a margin is a difference of logits, its rounding scales with their size (outward.py)
    size = 1.0 + 2.0 * logits.detach().abs().amax(dim=-1)
    deployed = param_dtype(net)

    def certified_margin(m: torch.Tensor, rows=slice(None)) -> torch.Tensor:
        return widen(m, None, size[rows] + m.abs(), work, deployed)[0]

    margin = certified_margin(lb.min(dim=1).values)
    ok = margin > 0
    method = torch.where(ok, 0, NO_METHOD)
    todo = ~ok & (logits.argmax(-1) == y)
    budget = Budget(time_budget_s, x.shape[0], x.device)
    for k, name in enumerate(methods[1:], start=1):
        idx = todo.nonzero().flatten()
        if k == 1 and refute is not None and idx.numel():
            idx = idx[~refute(idx).to(idx.device)]
            todo = torch.zeros_like(todo)
            todo[idx] = True
        if idx.numel() == 0:
            break

        def bound(part, name=name):
            run = _padded(part)
            m = margin_lower_bounds(net, x[run], y[run], eps, name, dtype=work).min(dim=1).values[:part.numel()]
            return certified_margin(m, part)

        idx, m = _timed(bound, idx, budget, (id(net), name, str(x.device), tuple(x.shape[1:])))
        if m is None:
            continue
        margin[idx] = torch.maximum(margin[idx], m)
        won = m > 0
        ok[idx[won]] = True
        method[idx[won]] = k
        todo[idx[won]] = False
    rechecked, flipped = torch.zeros_like(ok), torch.zeros_like(ok)
    if recheck_tol > 0 and work != torch.float64:
        idx = (near(margin, 0.0, recheck_tol) & (logits.argmax(-1) == y)).nonzero().flatten()
        if idx.numel():
            run, n = _padded(idx), idx.numel()
            again = margin_ladder(net, x[run], y[run], eps, methods, dtype=torch.float64,
                                  time_budget_s=time_budget_s)
            flipped[idx] = again.ok[:n] != ok[idx]  # float64 decides: it may withdraw or add a certificate
            ok[idx], method[idx] = again.ok[:n], again.method[:n]
            margin[idx] = round_down(again.margin[:n], margin.dtype)  # stored in float32: toward -inf
            rechecked[idx] = True
    return MarginCertificate(ok, margin, method, rechecked, flipped, logits)


@dataclass
class GateInterval:
    """Per input: g(x), the interval [lb, ub] of the selector over the ball (intersection over
    the methods applied), the index of the tightest method applied, whether float64 decided it
    and whether that changed the routing decision at one of the thresholds it was checked at."""

    g: torch.Tensor
    lb: torch.Tensor
    ub: torch.Tensor
    method: torch.Tensor
    rechecked: torch.Tensor
    flipped: torch.Tensor


def gate_interval(bound: IntervalFn, x: torch.Tensor, methods: Sequence[str], *, dtype=torch.float32
                  ) -> GateInterval:
    """The intersection of the selector's intervals by every method in ``methods``, on every input."""
    methods = [normalize_method(m) for m in methods]
    if not methods:
        raise ConfigError("the gate interval needs at least one bound method")
    g = lb = ub = None
    for name in methods:
        g_k, lb_k, ub_k = bound(x, name, dtype)
        g = g_k if g is None else g
        lb = lb_k if lb is None else torch.maximum(lb, lb_k)
        ub = ub_k if ub is None else torch.minimum(ub, ub_k)
    n = x.shape[0]
    no = torch.zeros(n, dtype=torch.bool, device=x.device)
    return GateInterval(g, lb, ub, torch.full((n,), len(methods) - 1, dtype=torch.long, device=x.device),
                        no, no.clone())


def undecided_at(lb: torch.Tensor, ub: torch.Tensor, thresholds: Sequence[Any]) -> torch.Tensor:
    """The interval straddles some threshold: lb < T <= ub (routing undecided at T). A threshold
    is a number or a tensor with one per input (margin selection's class thresholds)."""
    out = torch.zeros_like(lb, dtype=torch.bool)
    for t in thresholds:
        out |= (lb < t) & (ub >= t)
    return out


def near_thresholds(lb: torch.Tensor, ub: torch.Tensor, thresholds: Sequence[float], tol: float,
                    lb_exact: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An end of the interval lies within the re-check tolerance of a threshold; ``lb_exact``
    (bool [B]): lower bounds that are exact, not rounded (margin selection's gap >= 0 clamp)."""
    out = torch.zeros_like(lb, dtype=torch.bool)
    for t in thresholds:
        t = torch.as_tensor(t, dtype=lb.dtype, device=lb.device)
        finite = torch.isfinite(t)  # +-inf: every finite bound decides it exactly
        near_lb = near(lb, t, tol) if lb_exact is None else near(lb, t, tol) & ~lb_exact
        out |= (near_lb | near(ub, t, tol)) & finite
    return out


def refine_gate(bound: IntervalFn, x: torch.Tensor, interval: GateInterval, thresholds: Sequence[float],
                methods: Sequence[str], refine_methods: Sequence[str], *, dtype=torch.float32,
                recheck_tol: float = 0.0, time_budget_s: Optional[float] = None,
                cost_key: Any = None, eligible: Optional[torch.Tensor] = None,
                lb_exact: Optional[torch.Tensor] = None) -> GateInterval:
    """Tighten the interval where it matters at ``thresholds`` (the gate interval does not depend
    on T): ``refine_methods`` on inputs whose interval straddles one of them, cheap to tight,
    stopping per input once it no longer straddles; then inputs within ``recheck_tol`` of a
    threshold are recomputed in float64 with every method applied to them. Returns a new
    GateInterval (``methods``: those ``interval`` was made with; indices continue after them).
    ``time_budget_s`` as in margin_ladder; ``cost_key`` names the selector in the cost table;
    ``eligible`` (bool [B]): the only inputs refine_methods may help (None: all); ``lb_exact``: lower
    bounds no rounding can move (see near_thresholds)."""
    lb, ub = interval.lb.clone(), interval.ub.clone()
    method, rechecked, flipped = interval.method.clone(), interval.rechecked.clone(), interval.flipped.clone()
    methods = [normalize_method(m) for m in methods]
    refine_methods = [normalize_method(m) for m in refine_methods]
    budget = Budget(time_budget_s, x.shape[0], x.device)
    for k, name in enumerate(refine_methods, start=len(methods)):
        todo = undecided_at(lb, ub, thresholds)
        idx = (todo if eligible is None else todo & eligible).nonzero().flatten()
        if idx.numel() == 0:
            break

        def run_bound(part, name=name):
            run = _padded(part)
            _, lo, hi = bound(x[run], name, dtype)
            return lo[:part.numel()], hi[:part.numel()]

        idx, res = _timed(run_bound, idx, budget, (cost_key or id(bound), name, str(x.device), tuple(x.shape[1:])))
        if res is None:
            continue
        lb[idx] = torch.maximum(lb[idx], res[0])
        ub[idx] = torch.minimum(ub[idx], res[1])
        method[idx] = k
    if recheck_tol > 0 and resolve_dtype(dtype) != torch.float64:
        idx = near_thresholds(lb, ub, thresholds, recheck_tol, lb_exact).nonzero().flatten()
        if idx.numel():
            used = methods + refine_methods
            deepest = int(method[idx].max())
            run, n = _padded(idx), idx.numel()
            again = gate_interval(bound, x[run], used[:deepest + 1], dtype=torch.float64)
            new_lb, new_ub = round_down(again.lb[:n], lb.dtype), round_up(again.ub[:n], ub.dtype)
            for t in thresholds:
                t = t[idx] if torch.is_tensor(t) and t.dim() else t  # per-input thresholds
                flipped[idx] |= ((new_lb >= t) != (lb[idx] >= t)) | ((new_ub >= t) != (ub[idx] >= t))
            lb[idx], ub[idx] = new_lb, new_ub
            rechecked[idx] = True
    return GateInterval(interval.g, lb, ub, method, rechecked, flipped)
