"""The certification rule written from its definition (docs/METHOD.md 4.3), not from the code:
the oracle the rule's implementations (ace_lightning.rule, the sweep, composed_certified) are
tested against. It enumerates every way the gates can fall over the ball."""
from __future__ import annotations

import itertools
import math

from ace_lightning.sweep import METRICS


def brute_single(cols, T):
    """ace-method 4.5 written out, one input at a time (the one-pair case of `brute_cascade`)."""
    pair = {f"{k}_1": v for k, v in cols.items() if k in ("g", "lb_g", "ub_g", "cert_correct", "cert_ok")}
    return brute_cascade({**cols, **pair}, (T,), 1)


def brute_cascade(cols, T, n_pairs):
    """Semantic oracle written from docs/METHOD.md 4.3: a pair's interval is decided iff lb and ub
    are finite with lb <= g <= ub; then its gate may fire on the ball iff ub >= T and may stay off
    iff lb < T, otherwise it may do either. Enumerate every way the gates can fall; certified iff
    no value is NaN and every branch that can answer is certified."""
    n = len(cols["core_correct"])
    nat = cert = route = croute = undecided = 0
    for k in range(n):
        col = lambda name, i: float(cols[f"{name}_{i + 1}"][k])  # noqa: E731
        answer = next((i for i in range(n_pairs) if col("g", i) >= T[i]), None)
        nat += bool(cols[f"cert_correct_{answer + 1}"][k]) if answer is not None else bool(cols["core_correct"][k])
        route += answer is not None
        options = []
        for i in range(n_pairs):
            g, lb, ub = col("g", i), col("lb_g", i), col("ub_g", i)
            if math.isfinite(lb) and math.isfinite(ub) and lb <= g <= ub:
                options.append([s for s in (True, False) if (ub >= T[i] if s else lb < T[i])])
            else:
                options.append([True, False])
        possible = {next((i for i, s in enumerate(states) if s), None) for states in itertools.product(*options)}
        ok = lambda b: bool(cols["core_ok"][k]) if b is None else bool(cols[f"cert_ok_{b + 1}"][k])  # noqa: E731
        nan = any(math.isnan(col(c, i)) for c in ("g", "lb_g", "ub_g") for i in range(n_pairs))
        cert += not nan and all(ok(b) for b in possible)
        croute += len(possible) == 1 and None not in possible
        undecided += len(possible) > 1
    return dict(zip(METRICS, (nat / n, cert / n, route / n, croute / n, undecided / n)))
