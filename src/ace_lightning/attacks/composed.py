"""Attack on the composed model (docs/METHOD.md section 7): PGD that maximises the loss of a branch
while pushing the gates so that this branch answers (across the threshold toward the weaker
branch), for every branch, plus a smooth surrogate of the composed output; random restarts; every
iterate is checked against the *composed* prediction and the worst point per input is kept.

A certified input that this attack breaks is a soundness bug (tests/test_certify.py)."""
from __future__ import annotations

from typing import Sequence

import torch

from ace_lightning.attacks.pgd import check_loss, frozen, step_sizes
from ace_lightning.nets.layers import eval_mode
from ace_lightning.routing import composed_output, first_firing


# the core's gradient is computed where every gate is below its threshold + NEAR_MARGINS x margin:
# further above, the surrogate gives the core a weight below sigmoid(-20) and the core target's
# hinge must first bring the gates down (5 margins was measured to weaken the attack on the demo)
NEAR_MARGINS = 20.0


def _branch_outputs(model, z: torch.Tensor, thresholds: torch.Tensor, core_needed: torch.Tensor | None = None,
                    core_grad: bool = True, near: float = float("inf")) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of every cert-net and the core, and the gate values [B, n], all differentiable.

    The core is the costly net, so it runs only where its output can matter: on the inputs the
    gates route to it at this very point (no gradient unless ``core_grad``) and, when the attacked
    objective involves it (``core_grad``), where it may answer (``core_needed`` [B]: the gate
    bounds allow it somewhere on the ball; None: everywhere) and every gate is below its threshold
    + ``near`` at this point (further above, the objective's core term has no weight: its hinge
    or the surrogate's sigmoid first has to bring the gates down). Elsewhere its output is never
    selected and is filled with the last cert-net's logits."""
    cert_logits = [cert(z) for cert in model.certs]
    gates = torch.stack([model.gate_value(i, z, cert_logits[i]) for i in range(len(cert_logits))], dim=1)
    with torch.no_grad():  # the inputs the gates route to the core at this point: always computed
        rows = first_firing(gates.detach(), thresholds) == len(cert_logits)
        if core_grad:  # the attacked objective involves the core: where it may answer, near the thresholds
            close = (gates.detach() < thresholds + near).all(dim=1)
            rows |= close if core_needed is None else core_needed & close
    if bool(rows.all()):
        core = model.core(z) if core_grad else _no_grad(model.core, z)
    else:
        core = cert_logits[-1].detach().clone()
        if bool(rows.any()):
            out = model.core(z[rows]) if core_grad else _no_grad(model.core, z[rows])
            core = core.to(out.dtype)
            core[rows] = out
    return cert_logits + [core], gates


def _no_grad(net, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(z.detach())


def _composed_prediction(outputs: list[torch.Tensor], gates: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The composed model's label (the routing rule of ace_lightning.routing)."""
    return composed_output([o.argmax(-1) for o in outputs], first_firing(gates, thresholds))


def _objective(target: int, outputs, gates, y, thresholds, push: float, margin: float,
               loss_name: str = "ce") -> torch.Tensor:
    """Loss of branch ``target`` minus a hinge that rewards routing to it (target n = the core)."""
    n = gates.shape[1]
    branch_loss = check_loss(loss_name)
    loss = branch_loss(outputs[target], y)
    if target == -1:  # smooth surrogate of the composed output
        weights, rest = [], torch.ones_like(y, dtype=outputs[0].dtype)
        for i in range(n):
            s = torch.sigmoid((gates[:, i] - thresholds[i]) / max(margin, 1e-3))
            weights.append(rest * s)
            rest = rest * (1 - s)
        weights.append(rest)
        return sum(w * branch_loss(o, y) for w, o in zip(weights, outputs))
    for k in range(min(target, n)):  # earlier gates must stay below their thresholds
        loss = loss - push * torch.relu(gates[:, k] - thresholds[k] + margin)
    if target < n:  # and this one must fire
        loss = loss - push * torch.relu(thresholds[target] - gates[:, target] + margin)
    return loss


def attack_composed(model, x: torch.Tensor, y: torch.Tensor, eps: float,
                    thresholds: Sequence[float] | torch.Tensor | None = None, steps: int = 20,
                    restarts: int = 1, step_size: float = 0.1, push: float = 1.0,
                    margin: float = 0.05, loss: str = "ce", decay_at: Sequence[float] = (),
                    reachable: torch.Tensor | None = None, first_step: float | None = None,
                    candidates: Sequence[torch.Tensor] = (), generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(adv_correct [B] bool, x_adv [B, ...]): adv_correct is False iff some point found in the
    ball (x itself included) is misclassified by the composed model at ``thresholds``.

    ``reachable`` [B, n + 1] (branch k may answer somewhere on the ball, from the records' gate
    bounds; the core is column n): a branch that cannot answer is not attacked, and the core does
    not run for inputs that can never reach it. None: every branch, every input. ``loss``: ce or
    margin for the attacked branch; the step size (relative to eps) is multiplied by 0.1 at each
    fraction of the steps in ``decay_at``; ``first_step`` (relative to eps) sizes the first step of
    each restart and target. ``candidates``: points (each [B, ...], projected onto the ball) checked
    before the attack, e.g. the single nets' adversarial examples: an input broken there needs no
    attack. Random starts come from ``generator``, drawn for the whole batch at every restart and
    target (its use does not depend on which inputs broke)."""
    t = model.thresholds if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float64)
    t = t.to(x.device)
    check_loss(loss)
    x = x.detach()
    x_l, x_u = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    n = model.num_branches
    if reachable is None:
        reachable = torch.ones(x.shape[0], n + 1, dtype=torch.bool, device=x.device)
    reachable = reachable.to(x.device).bool()
    alphas = step_sizes(steps, step_size, eps, decay_at, first_step)
    with eval_mode(model):
        with frozen(model):
            with torch.no_grad():
                outs, gates = _branch_outputs(model, x, t, reachable[:, n], core_grad=False)
                correct = _composed_prediction(outs, gates, t) == y
                x_adv = x.clone()
                for point in candidates:  # cheap first: known adversarial points of the parts
                    live = correct.nonzero().flatten()
                    if live.numel() == 0:
                        break
                    z = torch.max(torch.min(point[live].to(x), x_u[live]), x_l[live])
                    outs, gates = _branch_outputs(model, z, t, reachable[live, n], core_grad=False)
                    wrong = _composed_prediction(outs, gates, t) != y[live]
                    x_adv[live[wrong]] = z[wrong]
                    correct[live[wrong]] = False
            targets = list(range(n + 1)) + [-1]
            for restart in range(max(1, restarts)):
                for target in targets:
                    start = None if restart == 0 else torch.rand(x.shape, generator=generator, dtype=x.dtype,
                                                                  device=x.device)
                    # only inputs not yet broken, and only where this branch (or, for the smooth
                    # surrogate, more than one branch) can answer
                    can = reachable[:, target] if target >= 0 else reachable.sum(dim=1) > 1
                    live = (correct & can).nonzero().flatten()
                    if live.numel() == 0 or eps <= 0:
                        continue
                    xs, ys, lo, hi = x[live], y[live], x_l[live], x_u[live]
                    core_needed = reachable[live, n]
                    z = xs if start is None else lo + (hi - lo) * start[live]
                    for step in range(steps + 1):
                        z = z.detach().requires_grad_(step < steps)
                        with torch.enable_grad():
                            outs, gates = _branch_outputs(model, z, t, core_needed, core_grad=target in (n, -1),
                                                          near=NEAR_MARGINS * margin)
                            if step < steps:
                                obj = _objective(target, outs, gates, ys, t, push, margin, loss)
                                grad, = torch.autograd.grad(obj.sum(), z)
                        with torch.no_grad():
                            wrong = _composed_prediction(outs, gates, t) != ys
                            x_adv[live[wrong]] = z.detach()[wrong]
                            correct[live[wrong]] = False
                        keep = ~wrong  # a broken input leaves the attack: its verdict is final
                        if step == steps or not bool(keep.any()):
                            break
                        live, ys, lo, hi, core_needed = live[keep], ys[keep], lo[keep], hi[keep], core_needed[keep]
                        z = torch.max(torch.min(z.detach()[keep] + alphas[step] * grad[keep].sign(), hi), lo)
    return correct, x_adv
