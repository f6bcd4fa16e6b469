"""Exact output ranges of tiny nets (LPs over their ReLU activation regions): the ground truth the
reference bounds (ace_lightning.bounds.reference) and the bound layer are tested against. Only
the tests use it, so it lives with them."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ace_lightning.bounds.reference import Affine, Net, Relu, affine_forward, steps_for

_F64 = torch.float64
_LP_OPTS = dict(primal_feasibility_tolerance=1e-10, dual_feasibility_tolerance=1e-10)


def _lp(c: np.ndarray, A: list, b: list, box: np.ndarray):
    """min c.x over {x in box, A x <= b}; returns (value, x) or None if infeasible."""
    from scipy.optimize import linprog  # scipy: a test extra, imported where it is used

    res = linprog(c, A_ub=np.array(A) if A else None, b_ub=np.array(b) if b else None,
                  bounds=box, method="highs", options=_LP_OPTS)
    if res.status == 2:  # infeasible
        return None
    if res.status != 0:
        raise RuntimeError(f"linprog failed: {res.message}")
    return res.fun, res.x


def exact_output_range(net: Net, x_L: Tensor, x_U: Tensor, C: Optional[Tensor] = None,
                       x: Optional[Tensor] = None, max_relus: int = 12) -> tuple[Tensor, Tensor]:
    """Exact min/max of every output (or of ``C @ f``) over the box, for tiny nets.

    On each ReLU activation pattern the net is affine and the consistent inputs form a
    polytope, so the range is a max/min of LPs over patterns. Patterns are enumerated
    depth-first, one neuron at a time, and a neuron only branches if it can take both signs
    on the current polytope, which prunes the 2^n patterns to the (few) linear regions.

    The returned values are ``f`` evaluated at the LP optimisers (clipped to the box), so
    they are *attained*: ``lo >= true min`` and ``hi <= true max`` up to float rounding,
    and equal to them up to the LP tolerance (1e-10). Shapes [1, K] (or [1, S]), float64.
    """
    if x_L.shape[0] != 1:
        raise ValueError("exact_output_range handles one input at a time (batch of 1)")
    steps = steps_for(net, x_L, x_U, x)
    n_relu = sum(int(np.prod(s.shape)) for s in steps if isinstance(s, Relu))
    if n_relu > max_relus:
        raise ValueError(f"{n_relu} ReLUs is too many to enumerate (max_relus={max_relus})")
    lo_box = x_L.detach().cpu().to(_F64).flatten().numpy()
    hi_box = x_U.detach().cpu().to(_F64).flatten().numpy()
    box = np.stack([lo_box, hi_box], axis=1)
    spec = None if C is None else C.detach().cpu().to(_F64)[0].numpy()
    lows: list[tuple] = []  # (output index, LP optimiser, LP value), one per region
    highs: list[tuple] = []

    def zrange(g: np.ndarray, g0: float, A: list, b: list):
        """Sign range of z = g.x + g0 on the polytope: box bound first, LP if undecided."""
        pos, neg = np.clip(g, 0, None), np.clip(g, None, 0)
        zlo, zhi = pos @ lo_box + neg @ hi_box + g0, pos @ hi_box + neg @ lo_box + g0
        if zlo >= 0 or zhi <= 0 or not A:
            return zlo, zhi
        rlo, rhi = _lp(g, A, b, box), _lp(-g, A, b, box)
        if rlo is None or rhi is None:
            return None
        return rlo[0] + g0, -rhi[0] + g0

    def leaf(G: np.ndarray, g: np.ndarray, A: list, b: list):
        if spec is not None:
            G, g = spec @ G, spec @ g
        found_lo, found_hi = [], []
        for k in range(G.shape[0]):
            rlo, rhi = _lp(G[k], A, b, box), _lp(-G[k], A, b, box)
            if rlo is None or rhi is None:
                return  # empty region (only possible through LP round-off)
            found_lo.append((k, rlo[1], rlo[0] + g[k]))
            found_hi.append((k, rhi[1], -rhi[0] + g[k]))
        lows.extend(found_lo)
        highs.extend(found_hi)

    def visit(i: int, G: np.ndarray, g: np.ndarray, A: list, b: list, j: int, mask: list):
        """Process step i; for a ReLU step, neuron j next, ``mask`` = decided signs so far."""
        if i == len(steps):
            return leaf(G, g, A, b)
        s = steps[i]
        if isinstance(s, Affine):
            W, c = s.W.numpy(), s.b.numpy()
            return visit(i + 1, W @ G, W @ g + c, A, b, 0, [])
        if j == G.shape[0]:  # all neurons of this ReLU decided: apply the pattern
            m = np.array(mask, dtype=np.float64)
            return visit(i + 1, m[:, None] * G, m * g, A, b, 0, [])
        r = zrange(G[j], g[j], A, b)
        if r is None:
            return
        zlo, zhi = r
        if zhi > 0:  # active branch: z >= 0  <=>  -g.x <= g0
            extra = ([], []) if zlo >= 0 else ([-G[j]], [g[j]])
            visit(i, G, g, A + extra[0], b + extra[1], j + 1, mask + [1.0])
        if zlo < 0 or zhi <= 0:  # inactive branch: z <= 0
            extra = ([], []) if zhi <= 0 else ([G[j]], [-g[j]])
            visit(i, G, g, A + extra[0], b + extra[1], j + 1, mask + [0.0])

    d = lo_box.size
    visit(0, np.eye(d), np.zeros(d), [], [], 0, [])

    def value_at(witnesses: list) -> tuple[Tensor, Tensor]:
        """Evaluate the real (step) network at the LP optimisers.

        Doubles as a self-check of the region bookkeeping: on its region the net must
        coincide with the affine piece the LP optimised.
        """
        pts = torch.from_numpy(np.clip(np.stack([w for _, w, _ in witnesses]), lo_box, hi_box))
        out = affine_forward(steps, pts.view(-1, *x_L.shape[1:])).flatten(1)
        if spec is not None:
            out = out @ torch.from_numpy(spec).T
        idx = torch.tensor([k for k, _, _ in witnesses])
        vals = out[torch.arange(len(idx)), idx]
        lp_vals = torch.tensor([v for _, _, v in witnesses], dtype=_F64)
        if not torch.allclose(vals, lp_vals, rtol=1e-6, atol=1e-6):
            raise RuntimeError("exact_output_range: LP value disagrees with the network")
        return vals, idx

    if not lows:
        raise RuntimeError("no feasible activation region found (empty box?)")
    vlo, klo = value_at(lows)
    vhi, khi = value_at(highs)
    K = int(klo.max()) + 1
    lo = torch.stack([vlo[klo == k].min() for k in range(K)]).unsqueeze(0)
    hi = torch.stack([vhi[khi == k].max() for k in range(K)]).unsqueeze(0)
    return lo, hi
