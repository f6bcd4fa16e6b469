"""Certified-training losses (docs/METHOD.md sections 6 and 11), one small class per method, shared
by the cert stage (margins z_y - z_j) and the gate stage (one signed gate logit).

Every method sees the same problem: a spec C ([B, S, K]) whose rows should stay positive over the
ball (the margins e_y - e_j for a cert-net; +g for a gate input that should fire, -g for one that
should not), and a per-input loss of a lower bound of C f (the worst-case CE of the negated margins;
the gate's weighted BCE). The methods differ in the lower bound they feed it:

- IBP / CROWN-IBP (Gowal et al. 2018, Zhang et al. 2020): bounds over the whole ball.
- SABR (Mueller et al., ICLR'23): IBP over a small box of radius lambda * eps around a PGD point
  found inside the ball, the box shifted to stay inside the ball and [0, 1]. Not a certificate.
- MTL-IBP (De Palma et al., ICLR'24): alpha * L(IBP over the ball) + (1 - alpha) * L(C f(x_adv)).
- CC-IBP: L(alpha * IBP lower bound + (1 - alpha) * C f(x_adv)): a convex combination of logits.
- Exp-IBP: L(IBP)^alpha * L(C f(x_adv))^(1 - alpha).
- Shi et al. (NeurIPS'21): IBP initialisation and the warm-up regularisers on the bounds of every
  ReLU's input (bound tightness, ReLU balance), usable with any method above.

Training attacks run with the net in eval mode (BatchNorm statistics untouched) and maximise the
same loss the method bounds; the bound pass comes before any plain forward of the same net in
the step (auto_LiRPA bumps the parameters' version counters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ace_lightning.attacks.pgd import pgd
from ace_lightning.bounds import bound_pass, input_box
from ace_lightning.nets import eval_mode
from ace_lightning.errors import ConfigError
from ace_lightning.registries import Registry

# method name -> factory(sabr_lambda, alpha, attack knobs) -> the method's loss; each method registers
# itself below its class, with its aliases
CERT_METHODS: Registry = Registry("certified-training method")

PerInputLoss = Callable[[torch.Tensor], torch.Tensor]  # lower bounds of C f [B, S] -> loss [B]


def normalize_training_method(method: str) -> str:
    """Canonical training-method name (or the one-line ConfigError naming the closest known one)."""
    return CERT_METHODS.canonical(method)


@dataclass
class LossOutput:
    """The method's loss (mean over the batch), its per-input values, the lower bounds of C f over
    the full ball when the method computed them (selection co-training uses them), the logits at
    x when its bound pass ran there (else None: the caller runs the net), the bounds of every
    ReLU's input of its bound pass and that pass's input half-width (Shi's regulariser)."""

    loss: torch.Tensor
    per_input: torch.Tensor
    ball_lb: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    relu_bounds: Optional[list]
    input_halfwidth: Optional[torch.Tensor]


@dataclass
class TrainingAttack:
    steps: int
    step_size: float
    eps_factor: float = 1.0
    restarts: int = 1
    decay_at: Sequence[float] = ()

    def __call__(self, net: nn.Module, x: torch.Tensor, C: torch.Tensor, eps: float,
                 loss_of_lb: PerInputLoss) -> torch.Tensor:
        """A point of B(x, eps_factor x eps) ∩ [0, 1] that maximises the loss of C f (eval mode)."""
        with eval_mode(net):
            return pgd(net, x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device),
                       min(1.0, eps * self.eps_factor), steps=self.steps, step_size=self.step_size,
                       random_start=True, restarts=self.restarts, decay_at=self.decay_at,
                       loss_fn=lambda logits, _y: loss_of_lb(torch.einsum("bsk,bk->bs", C, logits)))

    @classmethod
    def with_defaults(cls, knobs: Optional[dict], steps: int, step_size: float,
                      decay_at: Sequence[float] = ()) -> "TrainingAttack":
        """The method's attack: its paper's defaults (PGD steps, step size relative to the attack
        radius, step x 0.1 at these fractions of the steps), overridden by the knobs set (not null):
        steps, step_size, eps_factor (radius = eps_factor x eps), restarts, decay_at."""
        given = {"steps": steps, "step_size": step_size, "decay_at": decay_at,
                 **{k: v for k, v in (knobs or {}).items() if v is not None and k in cls.__dataclass_fields__}}
        return cls(**{**given, "decay_at": tuple(given["decay_at"])})


class CertifiedLoss:
    """IBP or CROWN-IBP over the whole ball (beta mixes CROWN-IBP with IBP)."""

    def __init__(self, method: str = "IBP") -> None:
        self.method = method
        self.bound = "CROWN-IBP" if method == "CROWN-IBP" else "IBP"

    def ball(self, net, x, C, eps, beta, relu_bounds):
        return bound_pass(net, x, C, eps=eps, method=self.bound, beta=beta if self.bound == "CROWN-IBP" else None,
                          relu_bounds=relu_bounds)

    def __call__(self, net: nn.Module, x: torch.Tensor, C: torch.Tensor, eps: float, loss_of_lb: PerInputLoss,
                 beta: Optional[float] = None, relu_bounds: bool = False) -> LossOutput:
        out = self.ball(net, x, C, eps, beta, relu_bounds)
        per = loss_of_lb(out.lb)
        return LossOutput(per.mean(), per, out.lb, out.logits, out.relu_bounds, _halfwidth(*input_box(x, eps)))


@CERT_METHODS.register("IBP")
def ibp_loss(sabr_lambda: float, alpha: float, attack: Optional[dict]) -> CertifiedLoss:
    """IBP over the whole ball (Gowal et al. 2018)."""
    return CertifiedLoss("IBP")


@CERT_METHODS.register("CROWN-IBP", aliases=("crown_ibp",))
def crown_ibp_loss(sabr_lambda: float, alpha: float, attack: Optional[dict]) -> CertifiedLoss:
    """CROWN-IBP over the whole ball (Zhang et al. 2020)."""
    return CertifiedLoss("CROWN-IBP")


class SABRLoss(CertifiedLoss):
    """IBP over the small box [c - tau, c + tau] ∩ B(x, eps) ∩ [0, 1], tau = lambda * eps, c the PGD
    point clipped to [lo + tau, hi - tau] (lo, hi: the corners of B(x, eps) ∩ [0, 1])."""

    def __init__(self, lam: float, attack: TrainingAttack) -> None:
        super().__init__("SABR")
        self.lam, self.attack = float(lam), attack

    def small_box(self, x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = input_box(x, eps)
        tau = self.lam * eps
        centre = torch.minimum(torch.maximum(x_adv, lo + tau), hi - tau)
        return torch.maximum(centre - tau, lo), torch.minimum(centre + tau, hi)

    def __call__(self, net, x, C, eps, loss_of_lb, beta=None, relu_bounds=False) -> LossOutput:
        if self.lam >= 1.0:  # the small box is the ball
            return super().__call__(net, x, C, eps, loss_of_lb, None, relu_bounds)
        x_adv = self.attack(net, x, C, eps, loss_of_lb)
        lower, upper = self.small_box(x, x_adv, eps)
        out = bound_pass(net, (lower + upper) / 2, C, box=(lower, upper), method="IBP", relu_bounds=relu_bounds)
        per = loss_of_lb(out.lb)
        return LossOutput(per.mean(), per, None, None, out.relu_bounds, _halfwidth(lower, upper))


@CERT_METHODS.register("SABR")
def sabr_loss(sabr_lambda: float, alpha: float, attack: Optional[dict]) -> SABRLoss:
    """SABR with the paper's attack: 8 steps, step 0.5, x 0.1 at 50, 80 and 90% of them."""
    return SABRLoss(sabr_lambda, TrainingAttack.with_defaults(attack, 8, 0.5, (0.5, 0.8, 0.9)))


class ExpressiveLoss(CertifiedLoss):
    """MTL-IBP, CC-IBP and Exp-IBP: IBP over the ball combined with the adversarial point's values."""

    def __init__(self, method: str, alpha: float, attack: TrainingAttack) -> None:
        super().__init__(method)
        self.bound = "IBP"
        self.alpha, self.attack = float(alpha), attack

    def __call__(self, net, x, C, eps, loss_of_lb, beta=None, relu_bounds=False) -> LossOutput:
        x_adv = self.attack(net, x, C, eps, loss_of_lb)
        out = self.ball(net, x, C, eps, None, relu_bounds)  # the bound pass first, then plain forwards
        adv = torch.einsum("bsk,bk->bs", C, net(x_adv))
        a = self.alpha
        if self.method == "MTL-IBP":
            per = a * loss_of_lb(out.lb) + (1 - a) * loss_of_lb(adv)
        elif self.method == "CC-IBP":
            per = loss_of_lb(a * out.lb + (1 - a) * adv)
        else:  # Exp-IBP; both losses are positive (a CE, a BCE), clamped against log(0)
            per = loss_of_lb(out.lb).clamp(min=1e-12) ** a * loss_of_lb(adv).clamp(min=1e-12) ** (1 - a)
        return LossOutput(per.mean(), per, out.lb, out.logits, out.relu_bounds, _halfwidth(*input_box(x, eps)))


# the expressive losses with the papers' attack: one PGD step of 10 x the radius

@CERT_METHODS.register("MTL-IBP", aliases=("mtl_ibp", "mtlibp"))
def mtl_ibp_loss(sabr_lambda: float, alpha: float, attack: Optional[dict]) -> ExpressiveLoss:
    return ExpressiveLoss("MTL-IBP", alpha, TrainingAttack.with_defaults(attack, 1, 10.0))


@CERT_METHODS.register("CC-IBP", aliases=("cc_ibp", "ccibp"))
def cc_ibp_loss(sabr_lambda: float, alpha: float, attack: Optional[dict]) -> ExpressiveLoss:
    return ExpressiveLoss("CC-IBP", alpha, TrainingAttack.with_defaults(attack, 1, 10.0))


@CERT_METHODS.register("Exp-IBP", aliases=("exp_ibp", "expibp"))
def exp_ibp_loss(sabr_lambda: float, alpha: float, attack: Optional[dict]) -> ExpressiveLoss:
    return ExpressiveLoss("Exp-IBP", alpha, TrainingAttack.with_defaults(attack, 1, 10.0))


def _halfwidth(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    return (upper - lower) / 2


def build_loss(method: str, *, sabr_lambda: float = 0.4, alpha: float = 0.5,
               attack: Optional[dict] = None) -> CertifiedLoss:
    """The loss object of a training method with its knobs (attack: steps, step_size, eps_factor,
    restarts; null entries take the method's paper default)."""
    return CERT_METHODS.create(method, sabr_lambda, alpha, attack)


def check_method_knobs(method: str, sabr_lambda: float, alpha: float, attack: Optional[dict]) -> str:
    """One-line ValueErrors for the method's knobs; returns the canonical method name."""
    method = normalize_training_method(method)
    if not 0.0 < float(sabr_lambda) <= 1.0:
        raise ConfigError(f"sabr_lambda (SABR's small-box radius / eps) must be in (0, 1], got {sabr_lambda}")
    if not 0.0 < float(alpha) <= 1.0:
        raise ConfigError(f"alpha (the IBP weight of MTL-/CC-/Exp-IBP) must be in (0, 1], got {alpha}")
    atk = attack or {}
    if atk.get("steps") is not None and int(atk["steps"]) < 1:
        raise ConfigError(f"attack.steps must be >= 1, got {atk['steps']}")
    for key in ("step_size", "eps_factor"):
        if atk.get(key) is not None and not float(atk[key]) > 0:
            raise ConfigError(f"attack.{key} must be positive, got {atk[key]}")
    if atk.get("restarts") is not None and int(atk["restarts"]) < 1:
        raise ConfigError(f"attack.restarts must be >= 1, got {atk['restarts']}")
    return method


# -- Shi et al. (NeurIPS'21): fast certified training -------------------------------------------------

def ibp_init(net: nn.Module) -> list[str]:
    """IBP initialisation: every Conv2d/Linear weight but the last ~ N(0, 2 pi / fan_in^2), so
    interval widths neither explode nor vanish with depth (biases keep their init). Returns the
    re-initialised layers' names."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    done = []
    for name, m in layers[:-1]:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
        with torch.no_grad():
            m.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
        done.append(name)
    return done


def _input_std(net: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The std of the net's Normalize layer (1 without one), broadcastable to the input."""
    from ace_lightning.nets.layers import Normalize

    for m in net.modules():
        if isinstance(m, Normalize):
            return m.std.to(like)
    return torch.ones((), dtype=like.dtype, device=like.device)


def shi_regularizer(relu_bounds: Sequence[tuple[torch.Tensor, torch.Tensor]], input_halfwidth: torch.Tensor,
                    net: nn.Module, tol: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_tightness, L_relu) of Shi et al., averaged over the ReLU layers, from the bounds [l, u] of
    every ReLU's input. Tightness: relu(tol - t0 / mean((u - l)/2)) / tol, t0 the mean half-width of
    the (normalised) input box. ReLU balance: relu(tol - min(r, 1/r)) / tol for the ratio of the
    mean centre of the active to that of the inactive units, and the same for their variances."""
    t0 = (input_halfwidth / _input_std(net, input_halfwidth)).mean()
    tight = torch.zeros((), device=input_halfwidth.device)
    relu = torch.zeros((), device=input_halfwidth.device)
    for lower, upper in relu_bounds:
        centre, half = (upper + lower) / 2, (upper - lower) / 2
        tight = tight + nn.functional.relu(tol - t0 / half.mean().clamp(min=1e-12)) / tol
        active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
        delta = (centre - centre.mean()) ** 2
        mean_den, var_den = -(centre * inactive).mean(), (delta * inactive).sum()
        # a layer without inactive units has no ratio: its term is dropped (Shi et al. skip it). The
        # denominators are made safe before dividing: a masked inf still sends NaN gradients back.
        defined = (mean_den > 0) & (var_den > 0)
        one = torch.ones_like(mean_den)
        mean_ratio = (centre * active).mean() / torch.where(defined, mean_den, one)
        var_ratio = (delta * active).sum() / torch.where(defined, var_den, one)
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        term = (nn.functional.relu(tol - mean_ratio) + nn.functional.relu(tol - var_ratio)) / tol
        relu = relu + torch.where(defined, term, torch.zeros_like(term))  # no host sync
    n = max(1, len(relu_bounds))
    return tight / n, relu / n
