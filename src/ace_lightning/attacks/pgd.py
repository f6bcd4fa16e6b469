"""PGD on the l-inf ball intersected with [0, 1] (Madry et al.): the attack for adversarial core
training and for adversarial accuracy (an upper bound on robust accuracy; certified <= it)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ace_lightning.registries import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: Registry = Registry("attack loss")  # name -> per-input loss (logits, y) -> [B]; maximised


@LOSSES.register("ce")
def _ce_per_input(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


@LOSSES.register("margin")
def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per input: positive exactly where x' is misclassified (the loss of
    strong evaluation attacks: CE saturates on confident inputs, the margin does not)."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), -float("inf")).max(dim=1).values
    return other - true


def _project(z: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(z, x - eps), x + eps).clamp(0.0, 1.0)


def check_loss(loss: str) -> LossFn:
    """The per-input attack loss named ``loss`` (one-line error naming the closest known one)."""
    return LOSSES.get(loss)


def step_sizes(steps: int, step_size: float, eps: float, decay_at: Sequence[float] = (),
               first_step: Optional[float] = None) -> list[float]:
    """The absolute step of every PGD step: ``step_size`` x eps, x0.1 at each fraction of the
    steps in ``decay_at``; ``first_step`` x eps for the first one when given."""
    milestones = sorted(math.ceil(f * steps) for f in decay_at)
    alphas = [step_size * eps * 0.1 ** sum(step >= m for m in milestones) for step in range(steps)]
    if alphas and first_step is not None:
        alphas[0] = float(first_step) * eps
    return alphas


@contextlib.contextmanager
def frozen(net: nn.Module):
    """The net's parameters without gradients for an attack (only the input's is needed), then
    restored as they were."""
    requires = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        yield net
    finally:
        for p, r in zip(net.parameters(), requires):
            p.requires_grad_(r)


def pgd(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 8,
    step_size: float = 0.25,
    random_start: bool = True,
    restarts: int = 1,
    loss_fn: Optional[LossFn] = None,
    decay_at: Sequence[float] = (),
    noise: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Adversarial inputs maximising ``loss_fn(net(x'), y)`` (per-input CE by default).
    ``step_size`` is relative to eps (docs/METHOD.md: 0.25 eps); it is multiplied by 0.1 at each
    fraction of the steps in ``decay_at`` (SABR's schedule: 0.5, 0.8, 0.9). The point with the
    highest loss per input over every iterate of every restart is kept. The net's mode and
    parameters are left untouched. ``noise``: the random starts' offsets, one per restart (drawn by
    the caller; default: uniform on the ball, drawn here)."""
    if eps <= 0 or steps <= 0:
        return x.detach().clone()
    loss_fn = loss_fn or _ce_per_input
    alphas = step_sizes(steps, step_size, eps, decay_at)
    x = x.detach()
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    with frozen(net):
        for restart in range(max(1, restarts)):
            if not random_start:
                z = x
            else:
                z = x + (noise[restart] if noise is not None else torch.empty_like(x).uniform_(-eps, eps))
            z = _project(z, x, eps)
            for step in range(steps + 1):
                z.requires_grad_(step < steps)
                with torch.enable_grad():
                    loss = loss_fn(net(z), y)
                    if step < steps:
                        grad, = torch.autograd.grad(loss.sum(), z)
                loss = loss.detach()
                better = loss > best_loss
                best[better] = z.detach()[better]
                best_loss = torch.where(better, loss, best_loss)
                if step < steps:
                    z = _project(z.detach() + alphas[step] * grad.sign(), x, eps)
    return best.detach()


def adversarial_correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                        steps: int = 20, step_size: float = 0.1, restarts: int = 1,
                        loss: str = "ce", decay_at: Sequence[float] = (),
                        known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean per input: still classified correctly after PGD (and at x itself), the attack of
    the training stages' validation (the certify stage's evaluation attack is ``pgd_pruned``).
    ``loss``: ce or margin. ``known`` [B] bool: inputs already known robust (certified; sound
    bounds), counted robust and not attacked; the random starts are still drawn for the whole
    batch, so the global RNG stream (and a training run that validates this way) is the same as
    for an attack on every input."""
    loss_fn = check_loss(loss)
    with torch.no_grad():
        correct = net(x).argmax(-1) == y
    if known is None:  # one PGD over the whole batch (training stages: their random starts and RNG use)
        x_adv = pgd(net, x, y, eps, steps=steps, step_size=step_size, restarts=restarts,
                    loss_fn=loss_fn, decay_at=decay_at)
        with torch.no_grad():
            return correct & (net(x_adv).argmax(-1) == y)
    if eps <= 0 or steps <= 0:
        return correct
    noise = [torch.empty_like(x).uniform_(-eps, eps) for _ in range(max(1, restarts))]
    live = (correct & ~known.to(correct.device)).nonzero().flatten()
    if live.numel():
        x_adv = pgd(net, x[live], y[live], eps, steps=steps, step_size=step_size, restarts=restarts,
                    loss_fn=loss_fn, decay_at=decay_at, noise=[n[live] for n in noise])
        with torch.no_grad():
            correct[live] = net(x_adv).argmax(-1) == y[live]
    return correct


def pgd_pruned(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20,
               step_size: float = 0.1, restarts: int = 1, loss: str = "margin", decay_at: Sequence[float] = (),
               first_step: Optional[float] = None, generator: Optional[torch.Generator] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation attack: (correct [B] bool, x_adv): correct is False iff some iterate (x itself
    included) is misclassified, and x_adv holds that first misclassified point (x where none).
    An input leaves the attack at that point, so the work follows the inputs still standing; when
    most of a step's inputs broke, the gradient of the rest is recomputed on them alone (cheaper
    than a backward pass through all). The first restart starts from x (its first forward pass is
    the natural check), later ones from random points of the ball drawn for the whole batch from
    ``generator`` (the draws, hence the verdicts, do not depend on which inputs broke earlier).
    ``first_step`` (relative to eps): the size of each restart's first step (1.0: the FGSM corner)."""
    loss_fn = check_loss(loss)
    x = x.detach()
    x_adv = x.clone()
    if eps <= 0 or steps <= 0:
        with torch.no_grad():
            return net(x).argmax(-1) == y, x_adv
    correct = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    alphas = step_sizes(steps, step_size, eps, decay_at, first_step)
    # every random start drawn up front: the generator's use does not depend on the verdicts
    noise = [torch.empty(x.shape, dtype=x.dtype, device=x.device).uniform_(-eps, eps, generator=generator)
             for _ in range(max(1, restarts) - 1)]
    with frozen(net):
        for restart in range(max(1, restarts)):
            live = correct.nonzero().flatten()
            if live.numel() == 0:
                break
            x0, y0 = x[live], y[live]
            z = x0 if restart == 0 else _project(x0 + noise[restart - 1][live], x0, eps)
            for step in range(steps + 1):
                z = z.detach().requires_grad_(step < steps)
                with torch.enable_grad():
                    logits = net(z)
                with torch.no_grad():
                    broken = logits.argmax(-1) != y0
                    if bool(broken.any()):
                        hit = live[broken]
                        correct[hit] = False
                        x_adv[hit] = z.detach()[broken]
                    keep = ~broken
                n_keep = int(keep.sum())
                if step == steps or n_keep == 0:
                    break
                if 2 * n_keep <= keep.numel():  # most broke: a fresh pass over the rest alone
                    z = z.detach()[keep].requires_grad_(True)
                    with torch.enable_grad():
                        grad, = torch.autograd.grad(loss_fn(net(z), y0[keep]).sum(), z)
                else:
                    with torch.enable_grad():
                        grad, = torch.autograd.grad(loss_fn(logits, y0).sum(), z)
                    z, grad = z.detach()[keep], grad[keep]
                live, x0, y0 = live[keep], x0[keep], y0[keep]
                z = _project(z.detach() + alphas[step] * grad.sign(), x0, eps)
    return correct, x_adv


def pgd_minimize(objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float,
                 steps: int = 20, step_size: float = 0.1, restarts: int = 1, decay_at: Sequence[float] = (),
                 first_step: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 stop_below: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest value [B], the point that took it): signed-gradient descent of a per-input
    objective over the l-inf ball intersected with [0, 1]. The attack on a *bound* rather than a
    label: the audit looks for a point where a gate value or a margin lies below what the records
    certified (a misclassification is the special case "margin below 0"). ``objective(z, idx)`` ->
    [len(idx)] values at points z of the inputs ``idx`` (labels and bounds are per input). The
    first restart starts at x, later ones at random points of the ball drawn for the whole batch
    from ``generator``; every iterate counts. ``stop_below`` [B]: an input leaves once its value
    drops below it (a counterexample is final). Nets inside the objective keep their parameters'
    gradients off through ``frozen`` at the caller."""
    x = x.detach()
    idx_all = torch.arange(x.shape[0], device=x.device)
    with torch.no_grad():
        best = objective(x, idx_all).detach().clone()
    best_x = x.clone()
    if eps <= 0 or steps <= 0 or x.shape[0] == 0:
        return best, best_x
    alphas = step_sizes(steps, step_size, eps, decay_at, first_step)
    noise = [torch.empty(x.shape, dtype=x.dtype, device=x.device).uniform_(-eps, eps, generator=generator)
             for _ in range(max(1, restarts) - 1)]

    def standing() -> torch.Tensor:
        return idx_all if stop_below is None else (best >= stop_below).nonzero().flatten()

    for restart in range(max(1, restarts)):
        live = standing()
        if live.numel() == 0:
            break
        x0 = x[live]
        z = x0 if restart == 0 else _project(x0 + noise[restart - 1][live], x0, eps)
        for step in range(steps + 1):
            z = z.detach().requires_grad_(step < steps)
            with torch.enable_grad():
                value = objective(z, live)
                grad = torch.autograd.grad(value.sum(), z)[0] if step < steps else None
            with torch.no_grad():
                v = value.detach()
                better = v < best[live]
                best[live[better]] = v[better]
                best_x[live[better]] = z.detach()[better]
                keep = torch.ones_like(better) if stop_below is None else best[live] >= stop_below[live]
            if step == steps or not bool(keep.any()):
                break
            live, x0 = live[keep], x0[keep]
            z = _project(z.detach()[keep] - alphas[step] * grad[keep].sign(), x0, eps)
    return best, best_x


def counterexample_found(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10) -> torch.Tensor:
    """Per input: PGD (margin loss, from x itself: deterministic, so records do not depend on a
    seed) found a misclassified point in the ball. Such inputs cannot be certified by any sound
    bound, so certifiers spare them the expensive methods."""
    if steps <= 0:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    x_adv = pgd(net, x, y, eps, steps=steps, step_size=0.25, random_start=False, loss_fn=margin_loss)
    with torch.no_grad():
        return net(x_adv).argmax(-1) != y
