"""The exact minimum of a ReLU net's smallest margin over the ball, by mixed-integer programming.

Why: a certificate says min over x' in B(x) of min_j (z_y - z_j)(x') >= the certified margin. A
relaxation (IBP, CROWN) only bounds that minimum; a MILP computes it (Tjeng et al., *Evaluating
Robustness of Neural Networks with Mixed Integer Programming*, ICLR 2019), so the audit of a run
folder (docs/METHOD.md section 13) can compare each certified margin with the exact value and
tell how many uncertified inputs are robust after all. Exponential in the number of unstable
ReLUs, hence only for small nets and a sample of inputs.

Encoding (everything in float64, the net from bounds/reference.py's dense steps, so this shares
no code with auto_LiRPA): variables are the input x (in the box B(x) intersected with [0, 1]) and
every ReLU's output h; between ReLUs the affine steps are multiplied into one sparse matrix. A
neuron with pre-activation z in [l, u] (the intersection of reference IBP and CROWN bounds) is
  u <= 0: h = 0;   l >= 0: h = z;   else, with a binary d: h >= z, h >= 0, h <= u d,
  h <= z - l (1 - d)                                          (big-M with the neuron's own bounds).
The objective min_j m_j takes one binary s_j per margin that can be the smallest (lb_j <= the
smallest ub): t >= m_j - M_j (1 - s_j), sum_j s_j = 1, minimise t (M_j = ub_j - min_k lb_k, so an
unselected row never binds). scipy.optimize.milp (HiGHS) solves it; scipy is imported lazily
(``pip install ace-lightning[audit]``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ace_lightning.bounds.reference import Relu, Step, affine_forward, affine_layers, interval_pre_bounds

_F64 = torch.float64


def scipy_missing() -> Optional[str]:
    """None when scipy's MILP solver is importable, else the one line that says what to install."""
    need = "the exact check needs scipy >= 1.9 (pip install 'ace-lightning[audit]' or pip install scipy)"
    try:
        from scipy.optimize import milp
    except ImportError:
        return need
    return None if callable(milp) else need


@dataclass
class MarginMILP:
    """One input's exact check. ``status``: optimal | time_limit | skipped | failed.
    ``minimum``: the solver's optimum (optimal only); ``dual_bound``: a lower bound of the true
    minimum (the solver's, up to its feasibility tolerance); ``attained``: min_j margin evaluated
    in float64 at the solver's point, a value the net really takes on the ball (>= the true
    minimum); ``unstable``: ReLUs that needed a binary; ``reason``: why it was skipped or failed."""

    status: str
    unstable: int = 0
    minimum: Optional[float] = None
    dual_bound: Optional[float] = None
    attained: Optional[float] = None
    point: Optional[Tensor] = field(default=None, repr=False)
    seconds: float = 0.0
    reason: Optional[str] = None


@contextlib.contextmanager
def _solver_quiet():
    """HiGHS prints some debugging lines with C's printf, on the process's stdout (where the
    audit's verdict goes): stdout's file descriptor points to /dev/null for the solve."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stdout (pytest) has no descriptor
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _chains(steps: Sequence[Step]) -> list[tuple]:
    """Affine steps between ReLUs multiplied together: [(W sparse csr, b, relu step index or None
    for the output)]; the first chain starts at the input."""
    import scipy.sparse as sp

    out, W, b = [], None, None
    for i, s in enumerate(steps):
        if isinstance(s, Relu):
            out.append((W, b, i))
            W = b = None
            continue
        Ws = sp.csr_matrix(s.W.numpy())
        bs = s.b.numpy()
        W, b = (Ws, bs) if W is None else (Ws @ W, Ws @ b + bs)
    out.append((W, b, None))
    return out


def unstable_count(pre: dict) -> int:
    """ReLUs whose input can take both signs on the ball (each needs a binary)."""
    return int(sum(((lo < 0) & (hi > 0)).sum().item() for lo, hi in pre.values()))


def min_margin_milp(net, x: Tensor, y: int, eps: float, *, time_limit_s: float = 30.0,
                    max_unstable: int = 400, mip_rel_gap: float = 1e-9,
                    steps: Optional[Sequence[Step]] = None) -> MarginMILP:
    """Exact min over x' in B(x, eps) intersected with [0, 1] of min_{j != y} z_y(x') - z_j(x')
    for one input ``x`` [1, C, H, W] of an eval-mode ReLU net the reference supports. Skipped
    (status 'skipped', with the reason) when more than ``max_unstable`` ReLUs are unstable;
    ``time_limit_s`` bounds the solver (status 'time_limit': the bounds it had). ``steps``: the
    net's reference steps, when the caller bounds many inputs of one net."""
    missing = scipy_missing()
    if missing:
        return MarginMILP("skipped", reason=missing)
    from scipy.optimize import Bounds, LinearConstraint, milp
    import scipy.sparse as sp

    t0 = time.perf_counter()
    x = x.detach().cpu().to(_F64)
    if x.shape[0] != 1:
        raise ValueError("min_margin_milp checks one input at a time (batch of 1)")
    steps = list(steps) if steps is not None else affine_layers(net, x)
    x_L, x_U = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    pre = interval_pre_bounds(steps, x_L, x_U)
    n_unstable = unstable_count(pre)
    if n_unstable > max_unstable:
        return MarginMILP("skipped", n_unstable, seconds=time.perf_counter() - t0,
                          reason=f"{n_unstable} unstable ReLUs > milp_max_unstable={max_unstable}")
    chains = _chains(steps)
    K = chains[-1][0].shape[0]
    others = [j for j in range(K) if j != y]
    C = np.zeros((K - 1, K))
    C[np.arange(K - 1), y] = 1.0
    C[np.arange(K - 1), others] = -1.0

    # variable layout: x | h of every ReLU layer | d (one binary per unstable ReLU) | s_j | t
    sizes = [x_L.numel()] + [pre[i][0].shape[1] for _, _, i in chains[:-1]]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n_cont = int(offsets[-1])
    lo = [x_L.flatten().numpy()]
    hi = [x_U.flatten().numpy()]
    rows, row_lo, row_hi = [], [], []  # sparse blocks over the continuous variables, then the binaries
    bin_cols = []  # per block of rows: None, or (binary ids, their coefficients)
    n_bin = 0
    for k, (W, b, relu) in enumerate(chains[:-1]):
        l, u = (v[0].numpy() for v in pre[relu])
        n_here = sizes[k + 1]
        lo.append(np.where(l >= 0, l, 0.0))
        hi.append(np.maximum(u, 0.0))
        active, unstable = np.flatnonzero(l >= 0), np.flatnonzero((l < 0) & (u > 0))
        # z = W h_prev + b; rows act on [h_prev, h]
        def block(idx):
            left = sp.csr_matrix((len(idx), offsets[k]))
            mid = -W[idx]
            here = sp.csr_matrix((np.ones(len(idx)), (np.arange(len(idx)), idx)), shape=(len(idx), n_here))
            right = sp.csr_matrix((len(idx), n_cont - offsets[k + 2]))
            return sp.hstack([left, mid, here, right]).tocsr()
        if active.size:  # h = z
            rows.append(block(active))
            row_lo.append(b[active])
            row_hi.append(b[active])
            bin_cols.append(None)
        if unstable.size:
            ids = np.arange(n_bin, n_bin + unstable.size)
            n_bin += unstable.size
            rows.append(block(unstable))  # h >= z
            row_lo.append(b[unstable])
            row_hi.append(np.full(unstable.size, np.inf))
            bin_cols.append(None)
            rows.append(block(unstable))  # h - l d <= z - l
            row_lo.append(np.full(unstable.size, -np.inf))
            row_hi.append(b[unstable] - l[unstable])
            bin_cols.append((ids, -l[unstable]))
            here = sp.csr_matrix((np.ones(unstable.size), (np.arange(unstable.size), offsets[k + 1] + unstable)),
                                 shape=(unstable.size, n_cont))
            rows.append(here)  # h - u d <= 0
            row_lo.append(np.full(unstable.size, -np.inf))
            row_hi.append(np.zeros(unstable.size))
            bin_cols.append((ids, -u[unstable]))
    W, b, _ = chains[-1]
    M = sp.csr_matrix(C) @ W  # margins m = M h_last + mb
    mb = C @ b
    last_lo, last_hi = np.concatenate(lo[-1:]), np.concatenate(hi[-1:])
    Md = M.toarray()
    m_lb = np.clip(Md, 0, None) @ last_lo + np.clip(Md, None, 0) @ last_hi + mb  # interval bounds
    m_ub = np.clip(Md, 0, None) @ last_hi + np.clip(Md, None, 0) @ last_lo + mb
    cand = np.flatnonzero(m_lb <= m_ub.min())
    n_sel = cand.size if cand.size > 1 else 0
    n_var = n_cont + n_bin + n_sel + (1 if n_sel else 0)

    def widen(block: "sp.csr_matrix", binaries=None) -> "sp.csr_matrix":
        extra = sp.csr_matrix((block.shape[0], n_var - n_cont))
        if binaries is not None:
            ids, coef = binaries
            extra = sp.csr_matrix((coef, (np.arange(len(ids)), ids)), shape=(block.shape[0], n_var - n_cont))
        return sp.hstack([block, extra]).tocsr()

    A = [widen(r, bc) for r, bc in zip(rows, bin_cols)]
    c = np.zeros(n_var)
    last = slice(offsets[-2], offsets[-1])
    if n_sel:
        big = m_ub[cand] - m_lb[cand].min()
        t_col, s_cols = n_var - 1, n_cont + n_bin + np.arange(n_sel)
        rows_t = sp.lil_matrix((n_sel, n_var))
        rows_t[:, last] = -Md[cand]
        rows_t[np.arange(n_sel), s_cols] = -big
        rows_t[:, t_col] = 1.0
        A.append(rows_t.tocsr())  # t - m_j - M_j s_j >= mb_j - M_j
        row_lo.append(mb[cand] - big)
        row_hi.append(np.full(n_sel, np.inf))
        pick = sp.lil_matrix((1, n_var))
        pick[0, s_cols] = 1.0
        A.append(pick.tocsr())  # sum_j s_j = 1
        row_lo.append(np.ones(1))
        row_hi.append(np.ones(1))
        c[t_col] = 1.0
        const = 0.0
    else:
        j = int(cand[0]) if cand.size else int(np.argmin(m_lb))
        c[last] = Md[j]
        const = float(mb[j])
    var_lo = np.concatenate(lo + [np.zeros(n_bin + n_sel)] + ([np.full(1, m_lb.min())] if n_sel else []))
    var_hi = np.concatenate(hi + [np.ones(n_bin + n_sel)] + ([np.full(1, np.inf)] if n_sel else []))
    integrality = np.concatenate([np.zeros(n_cont), np.ones(n_bin + n_sel), np.zeros(1 if n_sel else 0)])
    with _solver_quiet():
        res = milp(c, constraints=LinearConstraint(sp.vstack(A).tocsr(), np.concatenate(row_lo), np.concatenate(row_hi)),
                   integrality=integrality, bounds=Bounds(var_lo, var_hi),
                   options={"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_rel_gap), "disp": False})
    out = MarginMILP({0: "optimal", 1: "time_limit"}.get(res.status, "failed"), n_unstable,
                     reason=None if res.status in (0, 1) else str(res.message))
    dual = getattr(res, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual):
        out.dual_bound = float(dual) + const
    if res.x is not None:
        point = torch.from_numpy(np.clip(res.x[:sizes[0]], x_L.flatten().numpy(), x_U.flatten().numpy()))
        point = point.view_as(x)
        logits = affine_forward(steps, point).flatten(1)[0].numpy()
        out.attained = float((C @ logits).min())
        out.point = point
        if res.status == 0:
            out.minimum = float(res.fun) + const
    out.seconds = time.perf_counter() - t0
    return out


def net_steps(net: nn.Module, x: Tensor) -> list[Step]:
    """The reference's dense steps of an eval-mode net for inputs shaped like ``x`` (built once
    per net and reused for every input of the sample)."""
    return affine_layers(net, x.detach().cpu().to(_F64)[:1])


__all__ = ["MarginMILP", "min_margin_milp", "net_steps", "scipy_missing", "unstable_count"]
