"""Certification-network stage: certified training with IBP or CROWN-IBP (ace-method.md section 6).

L = kappa * CE(f(x), y) + (1 - kappa) * CE(-lb(C f), y), with eps ramping 0 -> eps_train =
factor x eps after a natural warm-up, kappa 1 -> kappa_end and (CROWN-IBP) beta 1 -> 0 over the
same ramp, counted in steps. Validation: natural, IBP-certified (and CROWN-IBP-certified when
affordable) and PGD accuracy at the *target* eps.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ace_lightning.attacks import adversarial_correct
from ace_lightning.bounds import margin_lower_bounds, normalize_method, robust_ce_loss
from ace_lightning.stages.base import StageModule
from ace_lightning.stages.common import l1_penalty
from ace_lightning.stages.schedules import CertSchedule, ramp_progress

TRAIN_METHODS = ("IBP", "CROWN-IBP")


def certified_correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      method: str) -> torch.Tensor:
    """Per input: every margin z_y - z_j provably positive on the ball (implies correct at x)."""
    with torch.no_grad():
        return margin_lower_bounds(net, x, y, eps, method).min(dim=1).values > 0


class CertStage(StageModule):
    metric_names = ("nat_acc", "ibp_cert_acc", "crown_ibp_cert_acc", "cert_acc", "pgd_acc")
    key_metric = "val/cert_acc"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Mapping[str, Any],
        lr_schedule: Mapping[str, Any],
        eps: float,
        method: str = "IBP",
        eps_factor: float = 1.05,
        warmup_epochs: float = 1,
        ramp_epochs: float = 10,
        ramp_shape: str = "linear",
        kappa_end: float = 0.5,
        loss_fusion: bool = False,
        l1: float = 1e-5,
        epochs: Optional[int] = None,
        val_pgd_steps: int = 10,
        val_crown_ibp: bool = True,
        steps_per_epoch: Optional[int] = None,
    ) -> None:
        method = self.check_config(dict(method=method, kappa_end=kappa_end, epochs=epochs,
                                        warmup_epochs=warmup_epochs, ramp_epochs=ramp_epochs,
                                        ramp_shape=ramp_shape, eps_factor=eps_factor), eps)
        super().__init__(net, optimizer, lr_schedule,
                         lr_decay_start_epoch=int(round(warmup_epochs + ramp_epochs)))
        self.eps, self.method, self.eps_factor = float(eps), method, float(eps_factor)
        self.warmup_epochs, self.ramp_epochs = float(warmup_epochs), float(ramp_epochs)
        self.ramp_shape, self.kappa_end = ramp_shape, float(kappa_end)
        self.loss_fusion, self.l1 = bool(loss_fusion), float(l1)
        self.val_pgd_steps, self.val_crown_ibp = int(val_pgd_steps), bool(val_crown_ibp)
        self.steps_per_epoch = steps_per_epoch
        self._schedule: Optional[CertSchedule] = None
        self.save_hyperparameters(ignore=["net"])

    @staticmethod
    def check_config(st: Mapping[str, Any], eps: float) -> str:
        """One-line ValueErrors before any data is loaded; returns the canonical method name."""
        method = normalize_method(st.get("method", "IBP"))
        if method not in TRAIN_METHODS:
            raise ValueError(f"cert-net training method must be one of {', '.join(TRAIN_METHODS)}, got {method!r}")
        kappa_end = float(st.get("kappa_end", 0.5))
        if not 0.0 <= kappa_end <= 1.0:
            raise ValueError(f"kappa_end must be in [0, 1], got {kappa_end}")
        if not 0.0 < float(eps) <= 1.0:
            raise ValueError(f"eps must be in (0, 1] (pixel space, e.g. 2/255 = 0.00784), got {eps}")
        if float(st.get("eps_factor", 1.0)) <= 0:
            raise ValueError(f"eps_factor must be positive, got {st.get('eps_factor')}")
        warmup, ramp = float(st.get("warmup_epochs", 0)), float(st.get("ramp_epochs", 0))
        epochs = st.get("epochs")
        if warmup < 0 or ramp < 0:
            raise ValueError("warmup_epochs and ramp_epochs must be >= 0")
        if epochs is not None and warmup + ramp > float(epochs):
            raise ValueError(f"eps schedule ends after training ends: warm-up {warmup:g} + ramp {ramp:g} "
                             f"epochs > {epochs} epochs (lower the ramp or raise stage.epochs)")
        ramp_progress(0, 0, 1, st.get("ramp_shape", "linear"))
        return method

    # -- schedules ---------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        x, y = batch
        step = self.global_step
        eps_t, kappa, beta = self.schedule_at(step)
        if eps_t <= 0:
            logits = self.net(x)
            robust = torch.zeros((), device=x.device)
            loss = nn.functional.cross_entropy(logits, y)
        else:
            robust, logits = robust_ce_loss(self.net, x, y, eps_t, self.method, beta=beta,
                                            loss_fusion=self.loss_fusion, return_logits=True)
            natural = nn.functional.cross_entropy(logits, y)
            loss = kappa * natural + (1.0 - kappa) * robust
        if self.l1:
            loss = loss + self.l1 * l1_penalty(self.net)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_train_step({"train/loss": loss, "train/robust_loss": robust, "train/acc": acc},
                            {"train/eps": eps_t, "train/kappa": kappa, "train/beta": beta if beta is not None else 0.0})
        return loss

    # -- evaluation at the target eps -----------------------------------------------------------
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            nat = self.net(x).argmax(-1) == y
        ibp = certified_correct(self.net, x, y, self.eps, "IBP")
        out = {"nat_acc": nat, "ibp_cert_acc": ibp}
        cert = ibp
        if self.val_crown_ibp:
            crown = certified_correct(self.net, x, y, self.eps, "CROWN-IBP")
            out["crown_ibp_cert_acc"] = crown
            cert = ibp | crown  # a certificate from either bound is a certificate
        out["cert_acc"] = cert
        if self.val_pgd_steps > 0:
            out["pgd_acc"] = adversarial_correct(self.net, x, y, self.eps, steps=self.val_pgd_steps)
        return out
