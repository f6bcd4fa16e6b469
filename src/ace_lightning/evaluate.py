"""A single certification network evaluated the way the composition is: natural accuracy,
certified accuracy by each bound method and by the cheap-to-tight ladder the certify stage uses,
adversarial accuracy under a strong attack (PGD, margin loss, many steps), and the time each took.

This is the number a single network is compared with ACE on (action=compare, experiments/): the
same certification for both, or the comparison is not honest. A certified input that the attack
breaks is a soundness bug and raises.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ace_lightning import console
from ace_lightning.ace import CertifySettings
from ace_lightning.attacks.pgd import adversarial_correct, counterexample_found
from ace_lightning.bounds import margin_lower_bounds
from ace_lightning.bounds.ladder import margin_ladder


def evaluate_net(net: nn.Module, batches: Iterable, eps: float, settings: Optional[CertifySettings] = None, *,
                 per_method: bool = True, attack_steps: int = 40, attack_restarts: int = 1,
                 attack_step_size: float = 0.1, progress: bool = False) -> dict[str, Any]:
    """Accuracies (fractions) and seconds over ``batches`` of (x, y[, ...]). ``per_method``: also
    certify every input with each method of settings.methods on its own."""
    settings = settings or CertifySettings()
    net.eval()
    n = nat = adv = 0
    ladder_ok = 0
    by_method = {m: 0 for m in settings.methods} if per_method else {}
    decided = {m: 0 for m in settings.methods}
    seconds = {"ladder": 0.0, "attack": 0.0, **{m: 0.0 for m in by_method}}
    for batch in console.progress(batches, progress, desc="evaluate"):  # rank zero only
        x, y = batch[0], batch[1]

        def refute(idx, x=x, y=y):
            return counterexample_found(net, x[idx], y[idx], eps, settings.refute_steps)

        t0 = time.perf_counter()
        with torch.no_grad():
            cert = margin_ladder(net, x, y, eps, settings.methods, dtype=settings.dtype,
                                 refute=refute,
                                 time_budget_s=settings.time_budget_s, recheck_tol=settings.recheck_tol)
        seconds["ladder"] += time.perf_counter() - t0
        nat += int((cert.logits.argmax(-1) == y).sum())  # the logits at x come with the first bound
        ladder_ok += int(cert.ok.sum())
        for k, m in enumerate(settings.methods):
            decided[m] += int((cert.method == k).sum())
        for m in by_method:
            t0 = time.perf_counter()
            with torch.no_grad():
                by_method[m] += int((margin_lower_bounds(net, x, y, eps, m).min(1).values > 0).sum())
            seconds[m] += time.perf_counter() - t0
        t0 = time.perf_counter()
        robust = adversarial_correct(net, x, y, eps, steps=attack_steps, step_size=attack_step_size,
                                     restarts=attack_restarts, loss="margin")
        seconds["attack"] += time.perf_counter() - t0
        broken = cert.ok & ~robust
        if broken.any():
            raise RuntimeError(f"SOUNDNESS BUG: {int(broken.sum())} certified input(s) broken by the attack")
        adv += int(robust.sum())
        n += len(y)
    rate = lambda k: k / max(1, n)  # noqa: E731
    return {"inputs": n, "eps": float(eps), "nat_acc": rate(nat), "cert_acc": rate(ladder_ok),
            "cert_acc_by_method": {m: rate(v) for m, v in by_method.items()},
            "decided_by": {m: rate(v) for m, v in decided.items()},
            "adv_acc": rate(adv), "attack": {"steps": attack_steps, "restarts": attack_restarts,
                                             "step_size": attack_step_size, "loss": "margin"},
            "certification": settings.as_dict(), "seconds": seconds}
