"""Bounds of the entropy-selection gate g(x) = -H(softmax(f_cert(x))) over the ball (docs/METHOD.md
sections 2b, 5 and 6).

Upper bounds of H over B(x) prove "routed to the cert-net"; lower bounds prove "routed to the
core". Routes (``entropy_bounds``):
- "interval" (the reference code's): bound the logits, then interval arithmetic for H over that
  box. Sound, loose: the logit box forgets that all logits move together.
- "margin" (docs/METHOD.md section 5): from m = min_{j != yhat} lb(z_yhat - z_j) alone, the exact
  maximum of H over all logits whose others sit at least m below z_yhat
  (``entropy_upper_bound_margin``). Decreasing in m, so "certifiably selected" is a threshold on
  the certified margin (``margin_threshold_for_entropy``).
- "box": the same single bound pass (both sides of the K-1 margins) read as a box of relative
  logits z - z_yhat; upper bound = min of the margin bound and two bounds over that box. Never
  looser than "margin"; several times tighter on trained nets, whose K-1 margins differ widely.
Lower bounds always come from interval arithmetic (on the relative box for "margin" and "box").

Every bound is shift-invariant in the logits (H(z) = H(z - c)) and works in the input's dtype;
like the rest of the bound layer there is no outward rounding, so soundness holds up to the
rounding of that dtype (float64 in the tests).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ace_lightning.bounds.lirpa import bounded_module, output_bounds
from ace_lightning.bounds.precision import _working, precise
from ace_lightning.bounds.problem import margin_spec, normalize_method
from ace_lightning.errors import ConfigError

ROUTES = ("box", "margin", "interval")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) in nats over the last dim, in float64 whatever the logits' dtype: the value the
    composed model routes by (g = -H), so it must be accurate where the bounds are. Log-domain form
    with no cancellation: with d_j = max(z) - z_j >= 0 and s = sum over the non-arg-max j of
    e^{-d_j}, H = (sum_j d_j e^{-d_j}) / (1 + s) + log1p(s), a sum of non-negative terms (the
    log_softmax form loses every digit when H is tiny: it returned 0 or 1e-5 for H = 1e-20). A -inf
    logit contributes 0 (no NaN gradient); a NaN or +inf logit gives NaN."""
    z = logits.to(torch.float64)
    top, arg = z.max(dim=-1, keepdim=True)
    d = top - z
    finite = torch.isfinite(d)
    d = torch.where(finite, d, torch.zeros_like(d))
    e = torch.where(finite, torch.exp(-d), torch.zeros_like(d))
    s = e.scatter(-1, arg, 0.0).sum(-1)
    h = (d * e).sum(-1) / (1.0 + s) + torch.log1p(s)
    bad = ~torch.isfinite(top.squeeze(-1)) & ~(top.squeeze(-1) == -math.inf)  # +inf or NaN
    return torch.where(bad | torch.isnan(z).any(-1), torch.full_like(h, math.nan), h)


# -- soundness in floating point ------------------------------------------------------------------
# Every H bound below is computed in float64 and made outward: each candidate bound gets a slack
# of (8 (K + L) + 64) float64 ulps times its magnitude M (K classes, L the largest |logit| of the
# box: exp and log of values of size L lose about L ulps), plus an absolute floor far below any
# entropy a float32 net can produce but above every underflowed term (each < e^-745 * 745). So
# rounding and underflow can only widen the interval, and no upper bound of H is ever 0.
H_FLOOR = 1e-300
_U64 = float(torch.finfo(torch.float64).eps)


def _h_slack(mag: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    return (8.0 * (k + scale) + 64.0) * _U64 * mag.abs() + H_FLOOR


def _outward_h(lower: list, upper: list, scale: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lb_H, ub_H) from candidate bounds [(value, magnitude), ...] (each sound in real arithmetic):
    the best candidate after its slack, with the trivial 0 <= H <= log K among them. NaN in any
    candidate stays NaN (the certification rule never certifies it)."""
    log_k = torch.full_like(scale, math.log(k))
    hi = log_k + _h_slack(log_k, torch.zeros_like(scale), k)  # true for any logits: no scale
    for value, mag in upper:  # fmin: a candidate made NaN by infinite box bounds says nothing
        hi = torch.fmin(hi, value + _h_slack(mag, scale, k))
    lo = torch.zeros_like(scale)  # H >= 0 exactly, also as computed by entropy() (non-negative terms)
    for value, mag in lower:
        lo = torch.fmax(lo, value - _h_slack(mag, scale, k))
    return lo, hi


def _to_dtype_outward(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype):
    from ace_lightning.bounds.outward import round_down, round_up

    return round_down(lo, dtype), round_up(hi, dtype)


def _loo_logsumexp(v: torch.Tensor) -> torch.Tensor:
    """LSE_{j != i} v_j for every i, in O(K): subtract exp(v_i) from the shifted sum (at least 1 is
    left when i is not the arg-max, so no cancellation); the arg-max entry is computed directly."""
    if v.shape[-1] == 1:
        return torch.full_like(v, -math.inf)
    top, arg = v.max(dim=-1, keepdim=True)
    e = torch.exp(v - top)
    rest = torch.log((e.sum(-1, keepdim=True) - e).clamp_min(torch.finfo(v.dtype).tiny)) + top
    at_top = torch.logsumexp(v.scatter(-1, arg, -math.inf), dim=-1, keepdim=True)
    return rest.scatter(-1, arg, at_top)


def _log_prob_bounds(lb: torch.Tensor, ub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact range of log p_i, p = softmax(z), over the box: p_i = sigmoid(z_i - LSE_{j != i} z_j)
    grows with z_i and shrinks with every other z_j, so the extremes sit at the vertices
    (lb_i, ub_{-i}) and (ub_i, lb_{-i})."""
    logp_lo = torch.nn.functional.logsigmoid(lb - _loo_logsumexp(ub))
    logp_hi = torch.nn.functional.logsigmoid(ub - _loo_logsumexp(lb))
    return logp_lo, logp_hi


def _optimal_shift(corner: torch.Tensor, p_first: torch.Tensor, p_second: torch.Tensor) -> torch.Tensor:
    """The shift c minimising the convex piecewise-linear -c - sum_i (corner_i - c) q_i(c), where
    q_i = p_first_i while corner_i > c and p_second_i once corner_i < c: its slope
    -1 + sum_{corner_i > c} p_first_i + sum_{corner_i < c} p_second_i changes only at the corners,
    so the minimum is at the first sorted corner where the slope turns non-negative. Any c is
    sound (H(z) = H(z - c)); this one is the tightest. Detached: c is a constant of the box."""
    corner, p_first, p_second = corner.detach(), p_first.detach(), p_second.detach()
    srt, idx = corner.sort(dim=-1)
    first, second = p_first.gather(-1, idx), p_second.gather(-1, idx)
    tail_first = first.flip(-1).cumsum(-1).flip(-1) - first  # sum over the corners above the k-th
    slope = -1.0 + tail_first + second.cumsum(-1)  # right-slope at the k-th sorted corner
    k = (slope < 0).sum(-1, keepdim=True).clamp(max=corner.shape[-1] - 1)
    return srt.gather(-1, k)


def _lse_form(lb, ub, p_lo, p_hi, upper: bool):
    """H = LSE(z - c) - sum_i p_i (z_i - c), each piece bounded on its own: LSE is increasing in
    every z_i; p_i lies in [p_lo_i, p_hi_i]; the product of p_i >= 0 with z_i - c in [a_i, b_i]
    lies in [a_i * (p_lo_i if a_i >= 0 else p_hi_i), b_i * (p_hi_i if b_i >= 0 else p_lo_i)].
    The reference code used c = 0 (and a looser range of p_i); the best c per side makes the
    result shift-invariant. Returns (value, magnitude of its terms) for the outward slack."""
    if upper:
        c = _optimal_shift(lb, p_lo, p_hi)
        a = lb - c
        lse, term = torch.logsumexp(ub, dim=-1), a * torch.where(a >= 0, p_lo, p_hi)
    else:  # maximising -c - sum (ub_i - c) q_i(c): the same rule on -ub with the roles swapped
        c = -_optimal_shift(-ub, p_lo, p_hi)
        a = ub - c
        lse, term = torch.logsumexp(lb, dim=-1), a * torch.where(a >= 0, p_hi, p_lo)
    value = lse - c.squeeze(-1) - term.sum(-1)
    # a difference of terms of size ~|z|: its rounding error scales with them, not with H
    return value, lse.abs() + c.squeeze(-1).abs() + term.abs().sum(-1)


def _plogp_form(logp_lo, logp_hi, upper: bool):
    """H = sum_i h(p_i) with h(p) = -p log p concave on [0, 1] (max at 1/e): per term the max over
    [p_lo, p_hi] is h(clamp(1/e)), the min is at an end. Computed from log p (finite gradients
    when p underflows)."""
    def h(logp):
        return -torch.exp(logp) * logp
    if upper:
        return h(torch.maximum(torch.minimum(torch.full_like(logp_lo, -1.0), logp_hi), logp_lo)).sum(-1)
    return torch.minimum(h(logp_lo), h(logp_hi)).sum(-1)


def _interval_candidates(lb: torch.Tensor, ub: torch.Tensor, form: str, upper: bool, lower: bool
                         ) -> tuple[list, list, torch.Tensor]:
    """Candidate (value, magnitude) bounds of H over the logit box by interval arithmetic, lower
    and upper, and the box's scale (largest |bound| per row), all float64."""
    if form not in ("best", "lse", "plogp"):
        raise ConfigError(f"unknown interval form {form!r}; choose best, lse or plogp")
    scale = torch.maximum(lb.abs(), ub.abs()).amax(-1)
    logp_lo, logp_hi = _log_prob_bounds(lb, ub)
    p_lo, p_hi = logp_lo.exp(), logp_hi.exp()
    cands: dict[bool, list] = {False: [], True: []}
    for want, side in ((lower, False), (upper, True)):
        if not want:
            continue
        if form in ("best", "lse"):
            cands[side].append(_lse_form(lb, ub, p_lo, p_hi, side))
        if form in ("best", "plogp"):
            v = _plogp_form(logp_lo, logp_hi, side)
            cands[side].append((v, v))
    return cands[False], cands[True], scale


def _interval_entropy_bounds(lb: torch.Tensor, ub: torch.Tensor, form: str = "best",
                             upper: bool = True, lower: bool = True):
    """Interval arithmetic for H over the logit box, in the "lse" form (the reference's), the
    "plogp" form, or the "best" of both (each is sound, so their min/max is), computed in float64
    and widened outward (``_outward_h``): within [0, log K] up to that slack. Returns float64."""
    lb, ub = lb.to(torch.float64), ub.to(torch.float64)
    lo_c, hi_c, scale = _interval_candidates(lb, ub, form, upper, lower)
    lo, hi = _outward_h(lo_c, hi_c, scale, lb.shape[-1])
    nan = torch.isnan(lb).any(-1) | torch.isnan(ub).any(-1)
    lo, hi = torch.where(nan, math.nan, lo), torch.where(nan, math.nan, hi)
    return (lo if lower else None), (hi if upper else None)


def _max_entropy_prob_box(lb: torch.Tensor, ub: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Upper bound of H over the logit box through its exact probability ranges: max of H over
    Pi = {p : p_lo <= p <= p_hi, sum p = 1}, a superset of the reachable softmax vectors.
    Certificate (Gibbs): H(p) <= -sum_i p_i log q_i for every p and every distribution q, and the
    right side is linear in p, so its max over Pi is a fractional knapsack (fill from p_lo, most
    -log q first). With q the max-entropy point of Pi (q_i = clamp(lambda, p_lo_i, p_hi_i), found by
    bisection) the bound equals max_Pi H (minimax); q is only a certificate, so imprecision in
    lambda costs tightness, never soundness. Differentiable through p_lo, p_hi. Returns (value,
    magnitude) in the box's dtype, for the outward slack of ``_outward_h``."""
    logp_lo, logp_hi = _log_prob_bounds(lb, ub)
    p_lo, p_hi = logp_lo.exp(), logp_hi.exp()
    with torch.no_grad():
        lam_lo = torch.zeros_like(p_lo[..., :1])
        lam_hi = torch.ones_like(lam_lo)
        for _ in range(iters):
            lam = 0.5 * (lam_lo + lam_hi)
            short = torch.minimum(torch.maximum(lam, p_lo), p_hi).sum(-1, keepdim=True) < 1.0
            lam_lo, lam_hi = torch.where(short, lam, lam_lo), torch.where(short, lam_hi, lam)
        q = torch.minimum(torch.maximum(lam_hi, p_lo), p_hi).clamp_min(torch.finfo(p_lo.dtype).tiny)
        cost = -(q.log() - q.sum(-1, keepdim=True).log())  # -log q, q normalised: >= 0
        order = cost.argsort(dim=-1, descending=True)
    cost = cost.gather(-1, order)
    lo, hi = p_lo.gather(-1, order), p_hi.gather(-1, order)
    room = (hi - lo).clamp_min(0.0)
    left = (1.0 - lo.sum(-1, keepdim=True)) - (room.cumsum(-1) - room)  # mass left before item k
    p = lo + torch.minimum(left.clamp_min(0.0), room)
    value = (p * cost).sum(-1)
    return value, value + cost.amax(-1)  # the fill's mass is exact to ~1 ulp: error ~ ulp x max cost


def entropy_upper_bound_interval(lb: torch.Tensor, ub: torch.Tensor, *, form: str = "best") -> torch.Tensor:
    """Upper bound of H(softmax(z)) over the logit box [lb, ub] (Tensor[B]) by interval arithmetic:
    form "lse" is the reference's LSE(z) - sum p_i z_i (with exact ranges of p_i and the best
    constant shift), "plogp" is sum_i -p_i log p_i, "best" the smaller of the two."""
    return _interval_entropy_bounds(lb, ub, form, lower=False)[1]


def entropy_lower_bound_interval(lb: torch.Tensor, ub: torch.Tensor, *, form: str = "best") -> torch.Tensor:
    """Lower bound of H(softmax(z)) over the logit box [lb, ub] (Tensor[B]), >= 0; forms as above."""
    return _interval_entropy_bounds(lb, ub, form, upper=False)[0]


def entropy_upper_bound_margin(m: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Max of H(softmax(z)) over all z with z_yhat - z_j >= m for every j != yhat (Tensor like m):
    log S + (K-1) m e^{-m} / S with S = 1 + (K-1) e^{-m} for m >= 0, log K for m < 0.

    Proof. With r = e^{-m} the constraint set is {p in the simplex: p_j <= r p_yhat for all
    j != yhat}: convex, and symmetric under permutations of the K-1 other classes. H is concave, so
    averaging a maximiser over those permutations stays feasible and is no worse: the maximum is
    at p = (1 - (K-1)q, q, ..., q) with q <= r / (1 + (K-1)r). Along that family
    dH/dq = (K-1) log((1 - (K-1)q) / q) >= 0 for q <= 1/K, and r / (1 + (K-1)r) <= 1/K iff r <= 1
    iff m >= 0. So for m >= 0 the maximum is at q = r/S, i.e. all other logits exactly m below the
    top, where H = log S + (K-1) m r / S; it is attained, so no bound that sees only m is tighter.
    For m < 0 the uniform vector is feasible: log K. Monotone: q* = r/(1+(K-1)r) grows with r,
    H grows with q on [0, 1/K], so the bound is continuous and strictly decreasing on m >= 0 from
    log K (m = 0) to 0 (m -> inf). Nothing requires yhat to stay the arg-max; the bound only uses
    the K-1 margin constraints."""
    k = int(num_classes)
    if k < 2:
        raise ConfigError(f"entropy bounds need at least 2 classes, got {num_classes}")
    m = torch.as_tensor(m)
    m = m if m.is_floating_point() else m.double()
    mc = torch.nan_to_num(m, nan=0.0).clamp_min(0.0)  # NaN margin: assume nothing (log K)
    r = torch.exp(-mc)
    s = 1.0 + (k - 1) * r
    m_r = torch.where(torch.isinf(mc), torch.zeros_like(mc), mc * r)  # inf * 0 -> 0
    return (torch.log1p((k - 1) * r) + (k - 1) * m_r / s).clamp(0.0, math.log(k))


def _margin_bound_float(m: float, k: int) -> float:
    r = math.exp(-m)
    return math.log1p((k - 1) * r) + (k - 1) * m * r / (1.0 + (k - 1) * r)


def margin_threshold_for_entropy(tau: float, num_classes: int) -> float:
    """The smallest certified margin m with entropy_upper_bound_margin(m) <= tau, so that
    "ub(H) <= tau" is exactly "m >= threshold". Bisection in float64 that keeps the upper end
    feasible, so the returned m always satisfies the bound (errs on the safe side by < 1e-12
    relative). -inf when tau >= log K (every input qualifies), +inf when tau <= 0 (none does)."""
    k = int(num_classes)
    if k < 2:
        raise ConfigError(f"entropy bounds need at least 2 classes, got {num_classes}")
    tau = float(tau)
    if math.isnan(tau):
        raise ConfigError("tau must be a number")
    if tau >= math.log(k):
        return -math.inf
    if tau <= 0.0:
        return math.inf
    lo, hi = 0.0, 1.0
    while _margin_bound_float(hi, k) > tau:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _margin_bound_float(mid, k) <= tau:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-13 * hi:
            break
    return hi


def _relative_box(lb_d: torch.Tensor, ub_d: torch.Tensor, ref: torch.Tensor):
    """Box of w = z - z_ref (length K, w_ref = 0) from bounds of the margins z_ref - z_j (rows of
    margin_spec(ref): j != ref in increasing order). Differentiable (gather)."""
    batch, km1 = lb_d.shape
    k = km1 + 1
    j = torch.arange(k, device=lb_d.device).unsqueeze(0)
    ref = ref.view(-1, 1)
    col = torch.where(j < ref, j + 1, torch.where(j == ref, torch.zeros_like(j), j)).expand(batch, k)
    zero = torch.zeros_like(lb_d[:, :1])
    w_lo = torch.cat([zero, -ub_d], dim=1).gather(1, col)
    w_hi = torch.cat([zero, -lb_d], dim=1).gather(1, col)
    return w_lo, w_hi


@precise
def entropy_bounds_from_margins(lb_d: torch.Tensor, ub_d: Optional[torch.Tensor], ref: torch.Tensor,
                                route: str = "box") -> tuple[torch.Tensor, torch.Tensor]:
    """(lb_H, ub_H) from bounds [lb_d, ub_d] (Tensor[B, K-1]) of the margins z_ref - z_j over the
    ball, rows ordered as margin_spec(ref). Sound for ANY reference class (H(z) = H(z - z_ref)), so a
    certifier can reuse the pass it makes for cert_ok with ref = y; the margin upper bound is only
    informative where ref is the predicted class (m >= 0 forces that).
    route "margin": ub from m = min_j lb_d alone (entropy_upper_bound_margin).
    route "box": the box of relative logits w = z - z_ref, ub = min of the margin bound, interval
    arithmetic on that box and the max entropy over its probability ranges (all sound, so the
    min is); never looser than "margin", usually much tighter (margins differ across classes).
    lb_H by interval arithmetic on the relative box for both (0 if ub_d is None). Computed in
    float64 with outward slack (``_outward_h``: rounding and underflow only widen; ub_H > 0), then
    rounded outward to the margins' dtype; NaN margins give NaN."""
    route = str(route).lower()
    if route not in ("box", "margin"):
        raise ConfigError(f"entropy from margin bounds: route must be box or margin, got {route!r}")
    num_classes = lb_d.shape[-1] + 1
    ref = torch.as_tensor(ref, device=lb_d.device).long().view(-1)
    if ref.shape[0] != lb_d.shape[0] or (ref.numel() and (ref.min() < 0 or ref.max() >= num_classes)):
        raise ConfigError(f"ref must be {lb_d.shape[0]} class indices in [0, {num_classes})")
    work = lb_d.dtype if lb_d.dtype in (torch.float32, torch.float64) else torch.float32
    lb64 = lb_d.to(torch.float64)
    m = lb64.min(dim=-1).values
    h_margin = entropy_upper_bound_margin(m, num_classes)  # the exact max: positive terms, relative error
    upper, lower, scale = [(h_margin, h_margin)], [], m.abs().nan_to_num(posinf=0.0)
    nan = torch.isnan(lb64).any(-1)
    if ub_d is None:
        if route == "box":
            raise ConfigError("route 'box' needs upper bounds of the margins too")
    else:
        ub64 = ub_d.to(torch.float64)
        nan |= torch.isnan(ub64).any(-1)
        w_lo, w_hi = _relative_box(lb64, ub64, ref)
        lower, box_upper, scale = _interval_candidates(w_lo, w_hi, "best", upper=route == "box", lower=True)
        if route == "box":
            upper += box_upper + [_max_entropy_prob_box(w_lo, w_hi)]
    h_lo, h_hi = _outward_h(lower, upper, scale, num_classes)
    h_lo, h_hi = torch.where(nan, math.nan, h_lo), torch.where(nan, math.nan, h_hi)
    return _to_dtype_outward(h_lo, h_hi, work)


@torch.no_grad()
def _predicted_class(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """argmax net(x) without moving train-mode BatchNorm statistics (the bound pass that follows
    runs the net once more, as every bound call does)."""
    saved = [(b, b.detach().clone()) for b in net.buffers()]
    try:
        return net(x).argmax(-1)
    finally:
        for buf, value in saved:
            buf.copy_(value)


def _margin_pass(net, x, ref, eps, method, beta):
    """Lower and upper bounds of z_ref - z_j (j != ref) plus the clean logits, in one bound pass."""
    kind = "alpha" if normalize_method(method) == "alpha-CROWN" else "plain"
    num_classes = bounded_module(net, x, kind).ace_num_outputs  # cached: no extra trace
    ref = torch.as_tensor(ref, device=x.device).long().view(-1)
    if ref.shape[0] != x.shape[0] or (ref.numel() and (ref.min() < 0 or ref.max() >= num_classes)):
        raise ConfigError(f"labels must be {x.shape[0]} class indices in [0, {num_classes})")
    C = margin_spec(ref, num_classes, dtype=x.dtype)
    return output_bounds(net, x, eps, method, beta=beta, C=C, return_logits=True)


def _entropy_bounds(net, x, eps, method, route, beta, dtype=None):
    route = str(route).lower()
    if route not in ROUTES:
        raise ConfigError(f"unknown entropy route {route!r}; choose one of {', '.join(ROUTES)}")
    from ace_lightning.bounds.outward import param_dtype, widen

    deployed = param_dtype(net)
    net, x, work = _working(net, x, dtype)
    if route == "interval":
        lb, ub, logits = output_bounds(net, x, eps, method, beta=beta, return_logits=True)
        # the bound pass and the deployed forward pass round: widen the logit box by their slack
        lb, ub = widen(lb, ub, 1.0 + lb.abs().amax(-1, keepdim=True) + ub.abs().amax(-1, keepdim=True), work, deployed)
        h_lo, h_hi = _to_dtype_outward(*_interval_entropy_bounds(lb, ub), work)
        return h_lo, h_hi, logits
    yhat = _predicted_class(net, x)
    lb_d, ub_d, logits = _margin_pass(net, x, yhat, eps, method, beta)
    # a margin z_yhat - z_j is a difference of logits: its rounding scales with the logits' size
    lb_d, ub_d = widen(lb_d, ub_d, 1.0 + 2.0 * logits.detach().abs().amax(-1, keepdim=True) + lb_d.abs() + ub_d.abs(),
                       work, deployed)
    h_lo, h_hi = entropy_bounds_from_margins(lb_d, ub_d, yhat, route)
    return h_lo, h_hi, logits


@precise
def entropy_bounds(net: nn.Module, x: torch.Tensor, eps: float, method: str = "IBP",
                   route: str = "box", *, beta: Optional[float] = None, dtype=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lb_H, ub_H), Tensor[B] each, bounds of H(softmax(net(x'))) over x' in B(x) intersected with
    [0, 1]. Routes "margin" and "box" make one bound pass for both sides of the K-1 margins of the
    class predicted at x (see entropy_bounds_from_margins); "interval" bounds the logits and uses
    interval arithmetic on that box (the reference route, with the tighter of two interval forms).
    Full precision in ``dtype`` like every bound (bounds/lirpa.py)."""
    h_lo, h_hi, _ = _entropy_bounds(net, x, eps, method, route, beta, dtype)
    return h_lo, h_hi


@precise
def entropy_gate_bounds(net: nn.Module, x: torch.Tensor, eps: float, method: str = "IBP",
                        route: str = "box", *, beta: Optional[float] = None, dtype=None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, lb_g, ub_g) for the gate g = -H(softmax(net(x))) (docs/METHOD.md section 2b: select the
    cert-net iff g >= T = -tau): lb_g = -ub_H, ub_g = -lb_H; g from the same forward pass."""
    h_lo, h_hi, logits = _entropy_bounds(net, x, eps, method, route, beta, dtype)
    return -entropy(logits), -h_hi, -h_lo


@precise
def entropy_selection_loss_from_margins(lb_d: torch.Tensor, ub_d: torch.Tensor, y: torch.Tensor,
                                        correct: torch.Tensor) -> torch.Tensor:
    """L_ent from bounds of the margins z_y - z_j (margin_spec(y) rows), so a trainer can share
    one bound pass with the certified loss: mean over the batch of ub_H / log K where the net is
    correct at x and (log K - lb_H) / log K elsewhere; in [0, 1], linear in H like the reference."""
    h_lo, h_hi = entropy_bounds_from_margins(lb_d, ub_d, y, "box")
    log_k = math.log(lb_d.shape[-1] + 1)
    return (torch.where(correct.view(-1).bool(), h_hi, log_k - h_lo) / log_k).mean()


@precise
def entropy_selection_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                           method: str = "IBP", *, beta: Optional[float] = None) -> torch.Tensor:
    """Worst-case entropy loss for co-training the cert-net with the entropy gate (docs/METHOD.md
    section 6): push ub(H) down where argmax net(x) == y, push lb(H) up elsewhere.

    Bound choice: the "box" bounds on the relative logits z - z_y, from the specification-folded
    margin bounds (rows e_y - e_j, the same pass certified training makes; CROWN-IBP's beta mixes
    both sides). Reference class y, not the predicted class: sound for any class, for correct
    inputs it is the predicted class anyway, and it needs no extra forward. The min in "box" keeps
    a gradient where the margin bound alone would be flat (log K wherever the certified margin is
    negative, i.e. on every input not yet robust): the interval and probability-box terms are
    differentiable everywhere."""
    y = torch.as_tensor(y, device=x.device).long().view(-1)
    lb_d, ub_d, logits = _margin_pass(net, x, y, eps, method, beta)
    correct = logits.argmax(-1) == y
    return entropy_selection_loss_from_margins(lb_d, ub_d, y, correct)
