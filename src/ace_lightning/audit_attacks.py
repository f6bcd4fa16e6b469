"""The audit's attacks (docs/METHOD.md section 13, (b)): on every input certified at the exported
thresholds, each recorded bound's own quantity is minimised (the cert-net's smallest margin, the
gate value on the side the certificate uses) and the composed model is attacked as deployed;
AutoAttack too when it is installed. A point beyond a recorded bound is a violation.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ace_lightning.ace import ACEModel
from ace_lightning.audit_claims import AuditSettings, Claims, announced, batches, listed, slack


def min_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min_{j != y} z_y - z_j per input (negative: misclassified): the attacks' margin loss, negated."""
    from ace_lightning.attacks.pgd import margin_loss

    return -margin_loss(logits, y)


def recorded_selector(model: ACEModel, k: int, z: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The selector quantity the records bound (g, lb_g, ub_g): g_k itself, except for margin
    selection, whose records hold the cert-net's top-1 minus top-2 gap while the model fires at
    gap - kappa_c >= T (ACEModel.gate_value subtracts the predicted class's kappa)."""
    if model.selection[k] != "margin":
        return model.gate_value(k, z, logits)
    logits = model.certs[k](z) if logits is None else logits
    value = model.gate_value(k, z, logits)
    return value + model.class_thresholds[k].to(value)[logits.argmax(-1)]


def _minimize(objective, x: torch.Tensor, stop: torch.Tensor, eps: float, s: AuditSettings, generator,
              show: bool, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """pgd_minimize over chunks of ``s.batch_size`` inputs (objective(z, idx) with idx into x)."""
    from ace_lightning.attacks.pgd import pgd_minimize

    best, pts = torch.empty(x.shape[0]), x.clone()
    for part in announced(batches(np.arange(x.shape[0]), int(s.batch_size)), show, desc):
        sel = torch.as_tensor(part)
        v, p = pgd_minimize(lambda z, idx, sel=sel: objective(z, sel[idx]), x[sel], eps, steps=int(s.steps),
                            step_size=float(s.step_size), restarts=int(s.restarts), decay_at=tuple(s.decay_at),
                            generator=generator, stop_below=stop[sel])
        best[sel], pts[sel] = v.float(), p
    return best, pts


def attack_check(model: ACEModel, x: torch.Tensor, y: torch.Tensor, claims: Claims, eps: float,
                 s: AuditSettings, found_bad: Optional[set] = None, proven: Optional[np.ndarray] = None) -> dict:
    """(b): on every input certified at the exported thresholds, minimise each recorded bound's
    own quantity (the cert-net's smallest margin, the gate value on the side the certificate
    uses) and attack the composed model as deployed, seeded with the points found. A value beyond
    the recorded bound (by more than ``tol`` x (1 + |bound|), the float32 rounding of the
    records) or a wrong answer of the composed model is a violation; the violating inputs'
    indices are added to ``found_bad``. ``proven`` [N, n + 1]: the branches that may answer by the
    reference's bounds (reference_check); the composed attack skips the others (None: none)."""
    found_bad = set() if found_bad is None else found_bad
    from ace_lightning.attacks.composed import attack_composed
    from ace_lightning.attacks.pgd import frozen, pgd_pruned

    t0 = time.perf_counter()
    n = claims.n_pairs
    rows = np.flatnonzero(claims.certified)
    out: dict[str, Any] = {"steps": int(s.steps), "restarts": int(s.restarts), "step_size": float(s.step_size),
                           "loss": "margin", "tol": float(s.tol), "inputs": int(rows.size), "violations": 0,
                           "cert_net": [], "gate": []}
    generator = torch.Generator().manual_seed(int(s.seed))
    candidates = []  # points found by the part attacks, tried first on the composed model

    def wide(net: nn.Module) -> nn.Module:
        return copy.deepcopy(net).double().eval()

    with frozen(model):
        for k in range(n):
            net, net64 = model.certs[k], wide(model.certs[k])
            sel = np.flatnonzero(claims.certified & claims.reachable[:, k])
            entry: dict[str, Any] = {"pair": k + 1, "attacked": int(sel.size), "violations": 0}
            t1 = time.perf_counter()
            if sel.size:
                xs, ys = x[torch.as_tensor(sel)], y[torch.as_tensor(sel)]
                bound = claims.cert_margin[k][sel]
                stop = torch.as_tensor(bound - slack(bound, s.tol), dtype=torch.float64)
                _, pts = _minimize(lambda z, idx: min_margin(net(z), ys[idx]), xs, stop, eps, s, generator,
                                   s.progress, f"audit attack cert-net {k + 1}")
                with torch.no_grad():
                    found = min_margin(net64(pts.double()), ys).numpy()
                    wrong = (net(pts).argmax(-1) != ys).numpy()
                bad = (found < bound - slack(bound, s.tol)) | wrong
                found_bad.update(int(claims.index[r]) for r in sel[bad])
                entry.update({"violations": int(bad.sum()), "misclassified": int(wrong.sum()),
                              "min_gap": float((found - bound).min()), "mean_gap": float((found - bound).mean()),
                              "listed": listed([{"index": int(claims.index[r]), "recorded": float(bound[i]),
                                                  "found": float(found[i]), "misclassified": bool(wrong[i])}
                                                 for i, r in enumerate(sel) if bad[i]])})
                full = x[torch.as_tensor(rows)].clone()
                full[torch.as_tensor(np.searchsorted(rows, sel))] = pts
                candidates.append(full)
            entry["seconds"] = time.perf_counter() - t1
            out["cert_net"].append(entry)
            gate_fn = (lambda z, k=k: recorded_selector(model, k, z))
            gate64 = wide(model.gates[str(k)]) if model.selector(k).network else None
            for claim, mask, sign in (("fires", claims.fires(k), 1.0), ("silent", claims.silent(k), -1.0)):
                sel = np.flatnonzero(mask)
                entry = {"pair": k + 1, "claim": claim, "attacked": int(sel.size), "violations": 0}
                t1 = time.perf_counter()
                if sel.size:
                    xs = x[torch.as_tensor(sel)]
                    bound = (claims.lb if claim == "fires" else claims.ub)[k][sel]
                    stop = torch.as_tensor(sign * bound - slack(bound, s.tol), dtype=torch.float64)
                    _, pts = _minimize(lambda z, idx, sign=sign: sign * gate_fn(z), xs, stop, eps, s, generator,
                                       s.progress, f"audit attack gate {k + 1} ({claim})")
                    with torch.no_grad():
                        if gate64 is not None:
                            g64 = gate64(pts.double()).squeeze(-1).numpy()
                        else:
                            g64 = recorded_selector(model, k, pts.double(), wide(model.certs[k])(pts.double())).numpy()
                        fired = (model.gate_value(k, pts) >= float(claims.thresholds[k])).numpy()  # as deployed
                    bad = sign * g64 < sign * bound - slack(bound, s.tol)
                    crossed = ~fired if claim == "fires" else fired
                    found_bad.update(int(claims.index[r]) for r in sel[bad | crossed])
                    entry.update({"violations": int((bad | crossed).sum()), "crossed_threshold": int(crossed.sum()),
                                  "min_gap": float((sign * (g64 - bound)).min()),
                                  "listed": listed([{"index": int(claims.index[r]), "recorded": float(bound[i]),
                                                      "found": float(g64[i]), "crossed_threshold": bool(crossed[i])}
                                                     for i, r in enumerate(sel) if bad[i] or crossed[i]])})
                    full = x[torch.as_tensor(rows)].clone()
                    full[torch.as_tensor(np.searchsorted(rows, sel))] = pts
                    candidates.append(full)
                entry["seconds"] = time.perf_counter() - t1
                out["gate"].append(entry)
        sel = np.flatnonzero(claims.certified & claims.reachable[:, n])  # certificates that need core_ok
        entry = {"attacked": int(sel.size), "violations": 0}
        if sel.size:
            ok = torch.ones(sel.size, dtype=torch.bool)
            for part in batches(np.arange(sel.size), int(s.batch_size)):
                p = torch.as_tensor(sel[part])
                ok[torch.as_tensor(part)], _ = pgd_pruned(model.core, x[p], y[p], eps, steps=int(s.steps),
                                                          step_size=float(s.step_size), restarts=int(s.restarts),
                                                          decay_at=tuple(s.decay_at), generator=generator)
            found_bad.update(int(claims.index[r]) for r in sel[~ok.numpy()])
            entry.update({"violations": int((~ok).sum()),
                          "listed": listed([int(claims.index[r]) for i, r in enumerate(sel) if not ok[i]])})
        out["core"] = entry
    entry = {"attacked": 0, "violations": 0}
    t1 = time.perf_counter()
    if s.composed and rows.size:
        broken = np.zeros(rows.size, bool)
        for part in announced(batches(np.arange(rows.size), int(s.batch_size)), s.progress,
                              "audit attack composed model"):
            p, r = torch.as_tensor(part), torch.as_tensor(rows[part])
            reach = None if proven is None else torch.as_tensor(proven[rows[part]])
            ok, _ = attack_composed(model, x[r], y[r], eps, model.thresholds, steps=int(s.steps), reachable=reach,
                                    restarts=int(s.restarts), step_size=float(s.step_size), loss="margin",
                                    decay_at=tuple(s.decay_at), candidates=[c[p] for c in candidates],
                                    generator=generator)
            broken[part] = ~ok.numpy()
        found_bad.update(int(claims.index[r]) for r in rows[broken])
        entry = {"attacked": int(rows.size), "violations": int(broken.sum()),
                 "listed": listed([int(claims.index[r]) for r in rows[broken]]), "seconds": time.perf_counter() - t1,
                 "branches_ruled_out_by_reference": 0 if proven is None else int((~proven[rows]).sum())}
    out["composed"] = entry
    out["violations"] = sum(e["violations"] for e in out["cert_net"] + out["gate"]) + out["core"]["violations"] \
        + entry["violations"]
    out["seconds"] = time.perf_counter() - t0
    return out


class _Composed(nn.Module):
    """The composed model as one differentiable classifier for AutoAttack: every branch runs, the
    routing rule picks each input's logits (the gradient flows through the answering branch)."""

    def __init__(self, model: ACEModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from ace_lightning.routing import composed_output, first_firing

        outs = [cert(z) for cert in self.model.certs]
        gates = torch.stack([self.model.gate_value(i, z, outs[i]) for i in range(len(outs))], dim=1)
        return composed_output(outs + [self.model.core(z)], first_firing(gates.detach(), self.model.thresholds))


def autoattack_module():
    """The AutoAttack class (fra31's ``autoattack`` or PyPI's ``pyautoattack``), or None."""
    for name in ("autoattack", "pyautoattack"):
        try:
            return __import__(name, fromlist=["AutoAttack"]).AutoAttack
        except ImportError:
            continue
    return None


def autoattack_check(model: ACEModel, x: torch.Tensor, y: torch.Tensor, claims: Claims, eps: float,
                     s: AuditSettings, found_bad: Optional[set] = None) -> dict:
    """AutoAttack (Croce and Hein, ICML 2020) on the composed model at every certified input,
    when installed (an optional extra: it is not on PyPI under its own name). Any input it
    breaks is a violation."""
    import inspect

    if s.autoattack == "off":
        return {"ran": False, "reason": "autoattack=off"}
    AutoAttack = autoattack_module()
    if AutoAttack is None:
        return {"ran": False, "reason": "not installed (pip install git+https://github.com/fra31/auto-attack, "
                                        "or pyautoattack)"}
    rows = np.flatnonzero(claims.certified)
    num_classes = int(model.certs[0](x[:1]).shape[-1])
    attacks = [a for a in s.autoattack_attacks if num_classes >= 4 or a in ("apgd-ce", "square", "fab")]
    if not rows.size:
        return {"ran": False, "reason": "no certified input"}
    t0 = time.perf_counter()
    params = inspect.signature(AutoAttack.__init__).parameters
    wrapped = _Composed(model).eval()
    kw = {"norm": "Linf", "eps": float(eps), "version": "custom", "device": "cpu", "seed": int(s.seed)}
    kw["attacks_to_run" if "attacks_to_run" in params else "attacks"] = list(attacks)
    if "verbose" in params:
        kw["verbose"] = False
    adversary = AutoAttack(wrapped, **kw)
    if hasattr(adversary, "apgd_targeted"):
        adversary.apgd_targeted.n_target_classes = min(9, num_classes - 1)
    if hasattr(adversary, "fab"):
        adversary.fab.n_target_classes = min(9, num_classes - 1)
    run = adversary.run_standard_evaluation
    size = "bs" if "bs" in inspect.signature(run).parameters else "batch_size"
    r = torch.as_tensor(rows)
    with torch.no_grad():
        x_adv = run(x[r], y[r], **{size: int(s.batch_size)})
        x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv  # pyautoattack: (x_adv, y_adv)
        x_adv = torch.max(torch.min(x_adv, (x[r] + eps).clamp(0, 1)), (x[r] - eps).clamp(0, 1))
        wrong = (model(x_adv).argmax(-1) != y[r]).numpy()
    if found_bad is not None:
        found_bad.update(int(claims.index[i]) for i in rows[wrong])
    return {"ran": True, "package": AutoAttack.__module__.split(".")[0], "attacks": list(attacks),
            "attacked": int(rows.size), "violations": int(wrong.sum()),
            "listed": listed([int(claims.index[i]) for i in rows[wrong]]), "seconds": time.perf_counter() - t0}
