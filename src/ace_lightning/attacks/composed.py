"""Attack on the composed model (docs/METHOD.md section 7): PGD that maximises the loss of a branch
while pushing the gates so that this branch answers (across the threshold toward the weaker
branch), for every branch, plus a smooth surrogate of the composed output; random restarts; every
iterate is checked against the *composed* prediction and the worst point per input is kept.

A certified input that this attack breaks is a soundness bug (tests/test_certify.py)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ace_lightning.routing import composed_output, first_firing


def _branch_outputs(model, z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of every cert-net and the core, and the gate values [B, n], all differentiable."""
    cert_logits = [cert(z) for cert in model.certs]
    gates = [model.gate_value(i, z, cert_logits[i]) for i in range(len(cert_logits))]
    return cert_logits + [model.core(z)], torch.stack(gates, dim=1)


def _composed_prediction(outputs: list[torch.Tensor], gates: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The composed model's label (the routing rule of ace_lightning.routing)."""
    return composed_output([o.argmax(-1) for o in outputs], first_firing(gates, thresholds))


def _objective(target: int, outputs, gates, y, thresholds, push: float, margin: float) -> torch.Tensor:
    """Loss of branch ``target`` minus a hinge that rewards routing to it (target n = the core)."""
    n = gates.shape[1]
    loss = nn.functional.cross_entropy(outputs[target], y, reduction="none")
    if target == -1:  # smooth surrogate of the composed output
        weights, rest = [], torch.ones_like(y, dtype=outputs[0].dtype)
        for i in range(n):
            s = torch.sigmoid((gates[:, i] - thresholds[i]) / max(margin, 1e-3))
            weights.append(rest * s)
            rest = rest * (1 - s)
        weights.append(rest)
        return sum(w * nn.functional.cross_entropy(o, y, reduction="none") for w, o in zip(weights, outputs))
    for k in range(min(target, n)):  # earlier gates must stay below their thresholds
        loss = loss - push * torch.relu(gates[:, k] - thresholds[k] + margin)
    if target < n:  # and this one must fire
        loss = loss - push * torch.relu(thresholds[target] - gates[:, target] + margin)
    return loss


def attack_composed(model, x: torch.Tensor, y: torch.Tensor, eps: float,
                    thresholds: Sequence[float] | torch.Tensor | None = None, steps: int = 20,
                    restarts: int = 1, step_size: float = 0.1, push: float = 1.0,
                    margin: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(adv_correct [B] bool, x_adv [B, ...]): adv_correct is False iff some point found in the
    ball (x itself included) is misclassified by the composed model at ``thresholds``."""
    t = model.thresholds if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32)
    t = t.to(x.device)
    was = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.detach()
    x_l, x_u = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    try:
        with torch.no_grad():
            outs, gates = _branch_outputs(model, x)
            correct = _composed_prediction(outs, gates, t) == y
        x_adv = x.clone()
        n = model.num_branches
        targets = list(range(n + 1)) + [-1]
        alpha = step_size * eps
        for restart in range(max(1, restarts)):
            for target in targets:
                live = correct.nonzero().flatten()  # only inputs not yet broken are attacked
                if live.numel() == 0 or eps <= 0:
                    break
                xs, ys, lo, hi = x[live], y[live], x_l[live], x_u[live]
                z = xs if restart == 0 else lo + (hi - lo) * torch.rand_like(xs)
                for step in range(steps + 1):
                    z = z.detach().requires_grad_(step < steps)
                    with torch.enable_grad():
                        outs, gates = _branch_outputs(model, z)
                        if step < steps:
                            obj = _objective(target, outs, gates, ys, t, push, margin)
                            grad, = torch.autograd.grad(obj.sum(), z)
                    with torch.no_grad():
                        wrong = _composed_prediction(outs, gates, t) != ys
                        hit = live[wrong & correct[live]]
                        x_adv[hit] = z.detach()[wrong & correct[live]]
                        correct[hit] = False
                    if step < steps:
                        z = torch.max(torch.min(z.detach() + alpha * grad.sign(), hi), lo)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was)
    return correct, x_adv
