"""The audit's independent recomputation of the records' bounds (docs/METHOD.md section 13): (a) the
reference bounds (bounds/reference.py: pure torch, dense, float64, no auto_LiRPA) on every
certificate the composed model relies on, and (c) an exact MILP (bounds/milp.py) on a sample.
Neither is a violation by itself, except a MILP point below a recorded margin.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ace_lightning.ace import ACEModel
from ace_lightning.audit_claims import AuditSettings, Claims, announced, batches, listed, slack

# the reference method that recomputes a recorded method (alpha-CROWN: CROWN, looser, may not confirm)
REFERENCE_OF = {"IBP": "IBP", "CROWN-IBP": "CROWN-IBP", "CROWN": "CROWN", "alpha-CROWN": "CROWN"}
CROWN_BATCH = 4  # inputs per dense full-CROWN pass (its intermediate matrices are n_k x n_in per input)


def _margin_spec(y: torch.Tensor, k: int, dtype=torch.float64) -> torch.Tensor:
    """C [B, K-1, K] with rows e_y - e_j (j != y)."""
    eye = torch.eye(k, dtype=dtype)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    keep = torch.arange(k).unsqueeze(0) != y.unsqueeze(1)
    return c[keep].view(y.shape[0], k - 1, k)


def reference_problem(net: nn.Module, x: torch.Tensor, max_entries: int) -> Optional[str]:
    """None if the reference can bound ``net`` on inputs shaped like ``x``, else why not: a layer
    it does not model, or a dense matrix larger than ``max_entries`` (a big conv net)."""
    from ace_lightning.bounds.reference import supported

    why = supported(net)
    if why:
        return why
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(i[0][0].numel() * o[0].numel()))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(x[:1])
    for h in hooks:
        h.remove()
    if sizes and max(sizes) > max_entries:
        return (f"a layer's dense matrix would have {max(sizes):,} entries > reference_max_entries="
                f"{max_entries:,}: too large for the dense reference")
    return None


def _ref_fn(method: str) -> Callable:
    from ace_lightning.bounds import reference

    return {"IBP": reference.ibp, "CROWN-IBP": reference.crown_ibp, "CROWN": reference.crown}[method]


# -- (a) the reference bounds ----------------------------------------------------------------------

def _reference_margins(steps, x: torch.Tensor, y: torch.Tensor, eps: float, methods: np.ndarray,
                       batch: int, show: bool, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(min_j reference lower bound of z_y - z_j over the ball, prediction at x == y) per input,
    each with its reference method (IBP, CROWN-IBP or CROWN), float64."""
    from ace_lightning.bounds.reference import affine_forward

    out = np.full(len(y), np.nan)
    correct = np.zeros(len(y), bool)
    k = None
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        rows = np.flatnonzero(methods == method)
        size = batch if method != "CROWN" else CROWN_BATCH
        for part in announced(batches(rows, size), show, f"audit reference {method} ({what})"):
            xs = x[torch.as_tensor(part)].double()
            with torch.no_grad():
                logits = affine_forward(steps, xs).flatten(1)
            k = logits.shape[1]
            ys = y[torch.as_tensor(part)]
            correct[part] = (logits.argmax(-1) == ys).numpy()
            lo, hi = (xs - eps).clamp(0, 1), (xs + eps).clamp(0, 1)
            lb, _ = _ref_fn(method)(steps, lo, hi, C=_margin_spec(ys, k))
            out[part] = lb.min(dim=1).values.numpy()
    return out, correct


def _reference_interval(steps, x: torch.Tensor, eps: float, methods: list[tuple[str, ...]], batch: int,
                        show: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(g at x, lb, ub) of a one-logit selector net per input: the intersection of the reference
    intervals of that input's methods, float64."""
    from ace_lightning.bounds.reference import affine_forward

    n = x.shape[0]
    g, lb, ub = np.full(n, np.nan), np.full(n, -np.inf), np.full(n, np.inf)
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        rows = np.flatnonzero([method in m for m in methods])
        size = batch if method != "CROWN" else CROWN_BATCH
        for part in announced(batches(rows, size), show, f"audit reference {method} (gate)"):
            xs = x[torch.as_tensor(part)].double()
            lo, hi = (xs - eps).clamp(0, 1), (xs + eps).clamp(0, 1)
            l, u = _ref_fn(method)(steps, lo, hi)
            with torch.no_grad():
                g[part] = affine_forward(steps, xs).flatten(1)[:, 0].numpy()
            lb[part] = np.maximum(lb[part], l.flatten(1)[:, 0].numpy())
            ub[part] = np.minimum(ub[part], u.flatten(1)[:, 0].numpy())
    return g, lb, ub


def _gate_methods_used(recorded: str, certification: Mapping[str, Any]) -> tuple[str, ...]:
    """The reference methods whose intersection recomputes a recorded gate interval: every
    gate method, and the refine methods up to the recorded one (its ``gate_method``)."""
    base = list(certification.get("gate_methods") or ["IBP", "CROWN-IBP"])
    refine = list(certification.get("refine_methods") or [])
    used = base + (refine[:refine.index(recorded) + 1] if recorded in refine else [])
    return tuple(sorted({REFERENCE_OF[m] for m in used if m in REFERENCE_OF}))


def reference_check(model: ACEModel, x: torch.Tensor, y: torch.Tensor, claims: Claims, eps: float,
                    certification: Mapping[str, Any], s: AuditSettings) -> tuple[dict, np.ndarray]:
    """(a): every certificate the composed model relies on at its thresholds, recomputed with the
    reference bounds (the method the records name; alpha-CROWN by CROWN), then the whole rule on
    the reference's bounds. Unconfirmed inputs are listed; none of this is a violation. Also
    returns which branches may answer each input by the reference's own gate intervals, widened
    by ``tol`` ([N, n + 1]; a gate the reference did not bound may fire anywhere): the branches the
    composed attack must try, ruled out by a bound that shares no code with the records'."""
    from ace_lightning.bounds.reference import affine_layers

    t0 = time.perf_counter()
    n = claims.n_pairs
    tol = float(s.reference_tol)
    cert_ok, g, lb, ub = claims.cert_ok.copy(), claims.g.copy(), claims.lb.copy(), claims.ub.copy()
    core_ok = claims.core_ok.copy()
    out: dict[str, Any] = {"ran": True, "tol": tol, "pairs": [], "notes": []}
    wide_lb, wide_ub = np.full_like(claims.lb, -np.inf), np.full_like(claims.ub, np.inf)
    for k in range(n):
        pair: dict[str, Any] = {}
        rows = np.flatnonzero(claims.certified & claims.reachable[:, k])  # they need cert_ok_k
        net = model.certs[k]
        why = reference_problem(net, x, s.reference_max_entries)
        if why:
            pair["cert_net"] = {"skipped": why, "relied_on": int(rows.size)}
            out["notes"].append(f"pair {k + 1}: cert-net certificates taken from the records ({why})")
        else:
            steps = affine_layers(net, x[:1].double())
            recorded = claims.cert_method[k][rows]
            methods = np.array([REFERENCE_OF.get(m, "IBP") for m in recorded])
            ref, correct = _reference_margins(steps, x[torch.as_tensor(rows)] if rows.size else x[:0],
                                              y[torch.as_tensor(rows)] if rows.size else y[:0], eps, methods,
                                              s.reference_batch_size, s.progress, "cert-net")
            confirmed = correct & (ref > -tol)
            cert_ok[k, rows] = confirmed
            by_method = {}
            for m in sorted(set(recorded.tolist())):
                sel = recorded == m
                same = REFERENCE_OF.get(m) == m
                above = claims.cert_margin[k][rows][sel] - ref[sel]  # > 0: the record claims more
                by_method[m] = {"checked": int(sel.sum()), "confirmed": int(confirmed[sel].sum()),
                                "reference": REFERENCE_OF.get(m, "IBP"),
                                "max_abs_diff": float(np.abs(above).max()) if same and above.size else None,
                                "max_recorded_above_reference": float(above.max()) if same and above.size else None}
            pair["cert_net"] = {
                "relied_on": int(rows.size), "confirmed": int(confirmed.sum()),
                "confirmed_strictly": int((correct & (ref > 0)).sum()), "by_method": by_method,
                "unconfirmed": listed([{"index": int(claims.index[r]), "method": str(recorded[i]),
                                         "recorded": float(claims.cert_margin[k][r]), "reference": float(ref[i]),
                                         "correct_at_x": bool(correct[i])}
                                        for i, r in enumerate(rows) if not confirmed[i]])}
        if model.selection[k] != "gate":
            pair["gate"] = {"skipped": f"{model.selection[k]} selection: its interval comes from the cert-net's "
                                       f"margins (checked above)"}
        else:
            gate = model.gates[str(k)]
            why = reference_problem(gate, x, s.reference_max_entries)
            fires, silent = claims.fires(k), claims.silent(k)
            if why:
                pair["gate"] = {"skipped": why, "relied_on": int((fires | silent).sum())}
                out["notes"].append(f"pair {k + 1}: gate intervals taken from the records ({why})")
            else:
                steps = affine_layers(gate, x[:1].double())
                rows_g = np.flatnonzero(claims.certified)
                used = [_gate_methods_used(m, certification) for m in claims.gate_method[k][rows_g]]
                gx, rl, ru = _reference_interval(steps, x[torch.as_tensor(rows_g)] if rows_g.size else x[:0],
                                                 eps, used, s.reference_batch_size, s.progress)
                T = float(claims.thresholds[k])
                delta = tol * (1 + abs(T))  # the stated tolerance, applied in the records' favour
                g[k, rows_g] = gx
                lb[k, rows_g] = np.minimum(rl + delta, gx)
                ub[k, rows_g] = np.maximum(ru - delta, gx)
                wide_lb[k, rows_g] = rl - slack(np.full_like(rl, T), s.tol)
                wide_ub[k, rows_g] = ru + slack(np.full_like(ru, T), s.tol)
                checks = []
                for claim, mask, ok in (("fires", fires, lb[k] >= T), ("silent", silent, ub[k] < T)):
                    sel = mask[rows_g]
                    checks.append((claim, rows_g[sel], ok[rows_g][sel], rl[sel] if claim == "fires" else ru[sel]))
                pair["gate"] = {
                    "relied_on": int(sum(r.size for _, r, _, _ in checks)),
                    "confirmed": int(sum(o.sum() for _, _, o, _ in checks)),
                    "methods": sorted({m for u in used for m in u}),
                    # > 0: the recorded interval is narrower than the reference's on that side
                    "max_recorded_lb_above_reference": float((claims.lb[k][rows_g] - rl).max()) if rows_g.size else None,
                    "max_recorded_ub_below_reference": float((ru - claims.ub[k][rows_g]).max()) if rows_g.size else None,
                    "unconfirmed": listed([{"index": int(claims.index[r]), "claim": claim, "threshold": T,
                                             "recorded": float((claims.lb if claim == "fires" else claims.ub)[k][r]),
                                             "reference": float(v)}
                                            for claim, rs, oks, vals in checks
                                            for r, ok_r, v in zip(rs, oks, vals) if not ok_r])}
        out["pairs"].append(pair)
    core_rows = np.flatnonzero(claims.certified & claims.reachable[:, n])
    if core_rows.size:
        method = certification.get("core_method")
        why = reference_problem(model.core, x, s.reference_max_entries) if method else \
            "the records certify the core but name no core_method"
        if why:
            out["core"] = {"skipped": why, "relied_on": int(core_rows.size)}
            out["notes"].append(f"core certificates taken from the records ({why})")
        else:
            steps = affine_layers(model.core, x[:1].double())
            ref, correct = _reference_margins(steps, x[torch.as_tensor(core_rows)], y[torch.as_tensor(core_rows)], eps,
                                              np.full(core_rows.size, REFERENCE_OF[method]), s.reference_batch_size,
                                              s.progress, "core")
            core_ok[core_rows] = correct & (ref > -tol)
            out["core"] = {"relied_on": int(core_rows.size), "confirmed": int(core_ok[core_rows].sum())}
    confirmed = claims.rule(g, lb, ub, cert_ok, core_ok)
    rows = np.flatnonzero(claims.certified)
    out["certified"] = int(rows.size)
    out["confirmed"] = int(confirmed[rows].sum())
    out["unconfirmed"] = listed([int(claims.index[r]) for r in rows if not confirmed[r]])
    out["seconds"] = time.perf_counter() - t0
    return out, claims.reachable_with(g, wide_lb, wide_ub)


# -- (c) the exact check ---------------------------------------------------------------------------

def milp_check(model: ACEModel, x: torch.Tensor, y: torch.Tensor, claims: Claims, eps: float,
               s: AuditSettings, found_bad: Optional[set] = None) -> dict:
    """(c): the exact minimum of each sampled input's smallest cert-net margin over the ball
    (MILP), against its recorded bound (cert_margin: a lower bound whether or not it certified).
    A point of the ball below the recorded bound is a violation. The solver's lower bound, at the
    optimum or at the time limit, proves a certified margin (>= the record) or an uncertified input
    robust (> 0), up to the solver's tolerances. The sample: inputs the cert-net classifies
    correctly at x, half of them certified (seeded)."""
    from ace_lightning.bounds.milp import min_margin_milp, net_steps, scipy_missing

    if s.milp_sample == 0:
        return {"ran": False, "reason": "milp_sample=0"}
    missing = scipy_missing()
    if missing:
        return {"ran": False, "reason": missing}
    t0 = time.perf_counter()
    rng = np.random.default_rng(int(s.seed))
    out: dict[str, Any] = {"ran": True, "time_limit_s": float(s.milp_time_limit_s),
                           "max_unstable": int(s.milp_max_unstable), "pairs": [], "violations": 0}
    for k in range(claims.n_pairs):
        net = model.certs[k]
        why = reference_problem(net, x, s.reference_max_entries)
        if why:
            out["pairs"].append({"pair": k + 1, "skipped": why})
            continue
        certified = np.flatnonzero(claims.cert_ok[k] & claims.cert_correct[k])
        open_ = np.flatnonzero(~claims.cert_ok[k] & claims.cert_correct[k])
        half = min(certified.size, (s.milp_sample + 1) // 2)
        take = min(open_.size, s.milp_sample - half)
        half = min(certified.size, s.milp_sample - take)
        sample = np.concatenate([rng.choice(certified, half, replace=False), rng.choice(open_, take, replace=False)])
        steps = net_steps(net, x[:1])
        entries = []
        for r in announced(sample, s.progress, f"audit MILP cert-net {k + 1} (one input a batch)"):
            res = min_margin_milp(net, x[int(r)].unsqueeze(0), int(y[int(r)]), eps,
                                  time_limit_s=float(s.milp_time_limit_s), max_unstable=int(s.milp_max_unstable),
                                  steps=steps)
            bound = float(claims.cert_margin[k][r])
            violation = res.attained is not None and res.attained < bound - float(slack(np.array(bound), s.tol))
            if violation and found_bad is not None:
                found_bad.add(int(claims.index[r]))
            entries.append({"index": int(claims.index[r]), "certified": bool(claims.cert_ok[k][r]),
                            "recorded": bound, "status": res.status, "exact": res.minimum,
                            "dual_bound": res.dual_bound, "attained": res.attained, "unstable": res.unstable,
                            "seconds": round(res.seconds, 3), "gap": None if res.minimum is None else res.minimum - bound,
                            "violation": bool(violation), **({"reason": res.reason} if res.reason else {})})
        solved = [e for e in entries if e["status"] == "optimal"]
        gaps = [e["gap"] for e in solved if e["certified"]]
        bounded = [e for e in entries if e["certified"] and e["dual_bound"] is not None]
        out["pairs"].append({
            "pair": k + 1, "sampled": len(entries), "solved": len(solved),
            "skipped": sum(e["status"] == "skipped" for e in entries),
            "time_limit": sum(e["status"] == "time_limit" for e in entries),
            "violations": sum(e["violation"] for e in entries),
            "certified_sampled": int(half), "mean_gap_certified": float(np.mean(gaps)) if gaps else None,
            # the solver's lower bound (optimal or not) already at least the recorded margin
            "certified_proved": sum(e["dual_bound"] >= e["recorded"] for e in bounded),
            "uncertified_sampled": int(take),
            "uncertified_robust": sum(1 for e in entries if not e["certified"] and e["dual_bound"] is not None
                                      and e["dual_bound"] > 0),
            "uncertified_not_robust": sum(1 for e in entries if not e["certified"] and e["attained"] is not None
                                          and e["attained"] <= 0),
            "inputs": entries})
        out["violations"] += out["pairs"][-1]["violations"]
    out["seconds"] = time.perf_counter() - t0
    return out
