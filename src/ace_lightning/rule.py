"""The certification rule of ACE (docs/METHOD.md section 4.3), one definition for every caller:
the composed model's ``predict``, the certify stage's records, the threshold sweep, the attack's
"already certified" set and the exported operating point all decide with these functions.

A selector's interval [lb, ub] over the ball is *decided* only if lb and ub are finite numbers
with lb <= g(x) <= ub. Anything else (an inverted interval from rounding, a NaN, an infinity, a
value at x outside its own bounds) is *undecided*: the selector may fire and may stay silent, so
every branch it can lead to must be certified. A NaN anywhere in an input's intervals means the
input is not certified at all. Written in numpy over arrays [n_pairs, N] (one row per cascade
pair), so the sweep can evaluate it for many thresholds at once; ``ace.composed_certified`` is the
torch front of the same functions.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def decided(g: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """Per pair and input: the interval is usable (finite, lb <= g <= ub, so lb <= ub)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(lb) & np.isfinite(ub) & (lb <= g) & (g <= ub)


def poisoned(g: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """[N]: some pair's g, lb or ub is NaN: the input is not certified, whatever else holds."""
    bad = np.isnan(g) | np.isnan(lb) | np.isnan(ub)
    return bad.any(axis=0) if bad.ndim > 1 else bad


def surely_fires(ok: np.ndarray, lb_fires: np.ndarray) -> np.ndarray:
    """The selector fires on the whole ball: a decided interval with lb >= T."""
    return ok & lb_fires


def may_fire(ok: np.ndarray, ub_fires: np.ndarray) -> np.ndarray:
    """The selector fires somewhere on the ball: ub >= T, or the interval is undecided."""
    return ~ok | ub_fires


def branch_outcomes(sure: np.ndarray, may: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """From per-pair "surely fires" / "may fire" [n, N]: (may_answer per pair, core may answer,
    surely_answers per pair). Pair k may answer somewhere on the ball iff it may fire and no earlier
    pair surely fires; the core iff no pair surely fires. Pair k surely answers iff it surely fires
    and every earlier pair surely stays silent."""
    n = sure.shape[0]
    blocked = np.zeros(sure.shape[1:], dtype=bool)  # an earlier pair surely fires
    silent = np.ones(sure.shape[1:], dtype=bool)   # every earlier pair surely stays silent
    may_answer, sure_answer = [], []
    for k in range(n):
        may_answer.append(~blocked & may[k])
        sure_answer.append(silent & sure[k])
        blocked = blocked | sure[k]
        silent = silent & ~may[k]
    return may_answer, ~blocked, sure_answer


def certified(sure: np.ndarray, may: np.ndarray, cert_ok: np.ndarray, core_ok: np.ndarray,
              bad: np.ndarray) -> np.ndarray:
    """[N]: every branch that may answer somewhere on the ball is certified, and no NaN (``bad``).
    With decided intervals some branch always may answer (lb >= T implies ub >= T), so the rule
    is never vacuous."""
    may_answer, core_may, _ = branch_outcomes(sure, may)
    ok = ~bad & (~core_may | core_ok)
    for k, may_k in enumerate(may_answer):
        ok &= ~may_k | cert_ok[k]
    return ok


def per_input_thresholds(thresholds: np.ndarray, n_inputs: int, kappa: Optional[np.ndarray] = None,
                         cls: Optional[np.ndarray] = None, lb: Optional[np.ndarray] = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thresholds each predicate compares with, [n, N] each: (t_g for g(x) >= t, t_lb for
    "surely fires" lb >= t, t_ub for "may fire" ub >= t). A pair's threshold T is the same for all
    three. Margin selection with class thresholds (``kappa`` [n, K], a row of NaN for the pairs
    without; ``cls`` [n, N] the cert-net's class at x) fires at a point where class c is predicted
    iff gap >= kappa_c + T, and its records hold the gap g(x), a lower bound lb of the gap that
    is > 0 only if the class cannot change on the ball, and an upper bound ub (docs/METHOD.md
    section 5b). So: t_g = kappa_c(x) + T; surely fires iff lb > 0 and lb >= kappa_c(x) + T, or
    every kappa + T <= 0 (the gap is >= 0); may fire iff ub >= kappa_c(x) + T where the class is
    fixed (lb > 0, ``lb`` [n, N]), else iff ub >= min kappa + T (some class may be on top)."""
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1, 1)
    t_g = np.repeat(t, n_inputs, axis=1)
    t_lb, t_ub = t_g.copy(), t_g.copy()
    if kappa is None:
        return t_g, t_lb, t_ub
    kappa = np.asarray(kappa, dtype=np.float64)
    for k in range(t.shape[0]):
        if np.isnan(kappa[k]).all():
            continue
        c = np.asarray(cls[k], dtype=np.int64)
        per = kappa[k][c] + t[k]
        t_g[k] = per
        everywhere = np.max(kappa[k]) + t[k] <= 0
        t_lb[k] = -np.inf if everywhere else np.maximum(per, np.nextafter(0.0, 1.0))
        fixed = np.zeros(n_inputs, bool) if lb is None else np.asarray(lb[k]) > 0
        t_ub[k] = np.where(fixed, per, np.min(kappa[k]) + t[k])
    return t_g, t_lb, t_ub


def certified_at(g: np.ndarray, lb: np.ndarray, ub: np.ndarray, thresholds: np.ndarray,
                 cert_ok: np.ndarray, core_ok: np.ndarray, kappa: Optional[np.ndarray] = None,
                 cls: Optional[np.ndarray] = None) -> np.ndarray:
    """The rule at one threshold vector: g, lb, ub, cert_ok [n, N]; thresholds [n]; core_ok [N];
    ``kappa``/``cls``: class thresholds of margin selection (``per_input_thresholds``)."""
    _, t_lb, t_ub = per_input_thresholds(thresholds, np.shape(lb)[-1], kappa, cls, lb)
    ok = decided(g, lb, ub)
    with np.errstate(invalid="ignore"):
        return certified(surely_fires(ok, lb >= t_lb), may_fire(ok, ub >= t_ub), cert_ok.astype(bool),
                         core_ok.astype(bool), poisoned(g, lb, ub))


def reachable_at(g: np.ndarray, lb: np.ndarray, ub: np.ndarray, thresholds: np.ndarray,
                 kappa: Optional[np.ndarray] = None, cls: Optional[np.ndarray] = None) -> np.ndarray:
    """[N, n + 1]: branch k (the core last) may answer somewhere on the ball. What an attack must
    try; the complement is what the bounds rule out."""
    _, t_lb, t_ub = per_input_thresholds(thresholds, np.shape(lb)[-1], kappa, cls, lb)
    ok = decided(g, lb, ub)
    with np.errstate(invalid="ignore"):
        may_answer, core_may, _ = branch_outcomes(surely_fires(ok, lb >= t_lb), may_fire(ok, ub >= t_ub))
    return np.stack(may_answer + [core_may], axis=1)
