"""Certified training of a classifier at a target eps: the part the cert stage (stages/cert.py)
and the entropy stage (stages/entropy.py) share, so that neither stage imports the other.

L = kappa * CE(f(x), y) + (1 - kappa) * L_robust, with eps ramping 0 -> eps_train = factor x eps
after a natural warm-up, kappa 1 -> kappa_end and (CROWN-IBP) beta 1 -> 0 over the same ramp,
counted in steps (stages/base.py, stages/schedules.py); ``margin_pass`` is the one bound pass over
the margins z_y - z_j that gives L_robust and, for co-training, the margins themselves.
Validation: natural, IBP-certified (and CROWN-IBP-certified when affordable) and PGD accuracy at
the *target* eps, always in full precision.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ace_lightning.attacks import adversarial_correct
from ace_lightning.bounds import margin_lower_bounds, margin_spec, output_bounds, padded_rows, worst_case_ce
from ace_lightning.errors import ConfigError
from ace_lightning.nets import final_linear_name
from ace_lightning.stages.base import StageModule, check_val_crown_ibp
from ace_lightning.stages.losses import check_method_knobs
from ace_lightning.stages.schedules import CertSchedule, ramp_progress

CLASSIC = ("IBP", "CROWN-IBP")  # bounds over the whole ball; loss fusion and co-training apply


def certified_correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      method: str) -> torch.Tensor:
    """Per input: every margin z_y - z_j provably positive on the ball (implies correct at x)."""
    with torch.no_grad():
        return margin_lower_bounds(net, x, y, eps, method).min(dim=1).values > 0


class CertifiedStage(StageModule):
    """The schedules, the margin bound pass and the validation of a certified-training stage.
    Subclasses validate their knobs (``check_config``) before calling this constructor."""

    metric_names = ("nat_acc", "ibp_cert_acc", "crown_ibp_cert_acc", "cert_acc", "pgd_acc")
    key_metric = "val/cert_acc"
    precise_eval = True

    def __init__(self, net: nn.Module, optimizer: Mapping[str, Any], lr_schedule: Mapping[str, Any], eps: float,
                 method: str, eps_factor: float, warmup_epochs: float, ramp_epochs: float, ramp_shape: str,
                 kappa_end: float, loss_fusion: bool, l1: float, val_pgd_steps: int, val_crown_ibp: bool | str,
                 steps_per_epoch: Optional[int]) -> None:
        super().__init__(net, optimizer, lr_schedule,
                         lr_decay_start_epoch=int(round(warmup_epochs + ramp_epochs)))
        self.eps, self.method, self.eps_factor = float(eps), method, float(eps_factor)
        self.warmup_epochs, self.ramp_epochs = float(warmup_epochs), float(ramp_epochs)
        self.ramp_shape, self.kappa_end = ramp_shape, float(kappa_end)
        self.loss_fusion, self.l1 = bool(loss_fusion), float(l1)
        self.val_pgd_steps, self.val_crown_ibp = int(val_pgd_steps), check_val_crown_ibp(val_crown_ibp)
        self.num_classes = int(net.get_submodule(final_linear_name(net)).out_features)
        self.steps_per_epoch = steps_per_epoch
        self._schedule: Optional[CertSchedule] = None

    @staticmethod
    def check_method(st: Mapping[str, Any]) -> str:
        """The canonical training method, its knobs checked (one-line errors)."""
        method = check_method_knobs(st.get("method", "IBP"), st.get("sabr_lambda", 0.4), st.get("alpha", 0.5),
                                    st.get("attack"))
        if st.get("loss_fusion") and method not in CLASSIC:
            raise ConfigError(f"loss_fusion bounds the CE over the whole ball: IBP or CROWN-IBP only, not {method}")
        return method

    @staticmethod
    def check_schedule(st: Mapping[str, Any], eps: float) -> None:
        """eps, kappa and the ramp (one-line errors before any data is loaded)."""
        kappa_end = float(st.get("kappa_end", 0.5))
        if not 0.0 <= kappa_end <= 1.0:
            raise ConfigError(f"kappa_end must be in [0, 1], got {kappa_end}")
        if not 0.0 < float(eps) <= 1.0:
            raise ConfigError(f"eps must be in (0, 1] (pixel space, e.g. 2/255 = 0.00784), got {eps}")
        if float(st.get("eps_factor", 1.0)) <= 0:
            raise ConfigError(f"eps_factor must be positive, got {st.get('eps_factor')}")
        warmup, ramp = float(st.get("warmup_epochs", 0)), float(st.get("ramp_epochs", 0))
        epochs = st.get("epochs")
        if warmup < 0 or ramp < 0:
            raise ConfigError("warmup_epochs and ramp_epochs must be >= 0")
        if epochs is not None and warmup + ramp > float(epochs):
            raise ConfigError(f"eps schedule ends after training ends: warm-up {warmup:g} + ramp {ramp:g} "
                             f"epochs > {epochs} epochs (lower the ramp or raise stage.epochs)")
        ramp_progress(0, 0, 1, st.get("ramp_shape", "linear"))

    @classmethod
    def check_config(cls, st: Mapping[str, Any], eps: float) -> str:
        """One-line errors before any data is loaded; returns the canonical method name."""
        method = cls.check_method(st)
        cls.check_schedule(st, eps)
        return method

    def margin_pass(self, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float, beta: Optional[float],
                    upper: bool = False):
        """One bound pass over the margins z_y - z_j: (L_cert, robust CE, logits, lb, ub of the
        margins; ub only with ``upper``, else None), for the co-training losses that need the
        margins themselves."""
        if upper:
            C = margin_spec(y, self.num_classes, dtype=x.dtype)
            lb_d, ub_d, logits = output_bounds(self.net, x, eps, self.method, beta=beta, C=C, return_logits=True)
        else:
            (lb_d, logits), ub_d = margin_lower_bounds(self.net, x, y, eps, self.method, beta=beta,
                                                       return_logits=True), None
        robust = worst_case_ce(lb_d)
        l_cert = kappa * nn.functional.cross_entropy(logits, y) + (1.0 - kappa) * robust
        return l_cert, robust, logits, lb_d, ub_d

    # -- evaluation at the target eps -----------------------------------------------------------
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            nat = self.net(x).argmax(-1) == y
        ibp = certified_correct(self.net, x, y, self.eps, "IBP")
        out = {"nat_acc": nat, "ibp_cert_acc": ibp}
        cert = ibp
        if self.eval_crown_ibp():
            if self.fitting:  # validation: CROWN-IBP only where it can add a certificate (cert_acc is
                # the same; CROWN-IBP's own accuracy is reported on the test split)
                rows, n = padded_rows(nat & ~ibp)
                cert = ibp.clone()
                if n:
                    cert[rows[:n]] = certified_correct(self.net, x[rows], y[rows], self.eps, "CROWN-IBP")[:n]
            else:
                crown = certified_correct(self.net, x, y, self.eps, "CROWN-IBP")
                out["crown_ibp_cert_acc"] = crown
                cert = ibp | crown  # a certificate from either bound is a certificate
        out["cert_acc"] = cert
        if self.val_pgd_steps > 0:  # certified inputs are robust: PGD runs on the others
            out["pgd_acc"] = adversarial_correct(self.net, x, y, self.eps, steps=self.val_pgd_steps, known=cert)
        return out
