"""Entropy-selection stage (docs/METHOD.md sections 2b, 5 and 6): co-train the cert-net so that its
own entropy works as the gate, g(x) = -H(softmax(f_cert(x))) with threshold T = -tau.

    L = (1 - lambda) L_cert + lambda L_ent,      lambda = 0.5 by default,

L_cert the cert stage's loss (kappa CE(f(x), y) + (1 - kappa) CE(-lb(C f), y), same eps / kappa /
beta schedules) and L_ent the worst-case entropy loss of ``bounds.entropy``: ub(H)/log K on inputs
the cert-net classifies correctly, (log K - lb(H))/log K on the others (linear in H like the
reference). Without loss fusion both losses come from ONE bound pass: the bounds of the margins
z_y - z_j (lower bounds for L_cert, both sides for L_ent). During the natural warm-up (eps 0) L_ent
is the same expression on the clean entropy.

By default the cert-net of the 'cert' stage is fine-tuned (``init_from_cert``); with
``init_from_cert: false`` it is trained from scratch with ``cert_net`` (the paper's co-training).
Exports ``entropy_cert.pt`` and a manifest whose ``selection`` is
{"type": "entropy", "tau": tau, "threshold": -tau, "route": ...}.

Validation adds, at the target eps and tau: certified_selection_rate (lb_g >= -tau, i.e. the
entropy upper bound <= tau, on inputs the net certifies), false_selection_rate (g(x) >= -tau on
inputs it does not certify) and selection_rate. The best checkpoint is still chosen by
val/cert_acc (the composition sweeps tau afterwards).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ace_lightning.bounds import (
    entropy,
    entropy_gate_bounds,
    entropy_selection_loss,
    entropy_selection_loss_from_margins,
    robust_ce_loss,
)
from ace_lightning.bounds.entropy import ROUTES
from ace_lightning.config import to_dict
from ace_lightning.errors import ConfigError
from ace_lightning.rundir import check_same_data, load_weights, require_stage, stage_weights
from ace_lightning.stages.certified import CLASSIC, CertifiedStage
from ace_lightning.stages.common import l1_penalty
from ace_lightning.stages.runner import run_training_stage


def natural_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_ent at eps = 0: H/log K where argmax = y, (log K - H)/log K elsewhere (mean)."""
    log_k = math.log(logits.shape[-1])
    h = entropy(logits)
    return (torch.where(logits.argmax(-1) == y, h, log_k - h) / log_k).mean()


class EntropyStage(CertifiedStage):
    metric_names = CertifiedStage.metric_names + ("certified_selection_rate", "false_selection_rate",
                                                  "selection_rate")
    key_metric = "val/cert_acc"

    def __init__(self, net: nn.Module, optimizer: Mapping[str, Any], lr_schedule: Mapping[str, Any],
                 eps: float, lam: float = 0.5, tau: float = 1.0, route: str = "box", method: str = "IBP",
                 eps_factor: float = 1.05, warmup_epochs: float = 1, ramp_epochs: float = 10,
                 ramp_shape: str = "linear", kappa_end: float = 0.5, loss_fusion: bool = False, l1: float = 1e-5,
                 epochs: Optional[int] = None, val_pgd_steps: int = 10, val_crown_ibp: bool | str = True,
                 steps_per_epoch: Optional[int] = None) -> None:
        self.check_entropy_config(lam, tau, route)
        method = self.check_config(dict(method=method, kappa_end=kappa_end, epochs=epochs,
                                        warmup_epochs=warmup_epochs, ramp_epochs=ramp_epochs,
                                        ramp_shape=ramp_shape, eps_factor=eps_factor, loss_fusion=loss_fusion), eps)
        super().__init__(net, optimizer, lr_schedule, eps, method, eps_factor, warmup_epochs, ramp_epochs,
                         ramp_shape, kappa_end, loss_fusion, l1, val_pgd_steps, val_crown_ibp, steps_per_epoch)
        self.lam, self.tau, self.route = float(lam), float(tau), str(route).lower()
        self.save_hyperparameters(ignore=["net"])

    @staticmethod
    def check_entropy_config(lam: float, tau: float, route: str) -> None:
        if not 0.0 <= float(lam) <= 1.0:
            raise ConfigError(f"lambda (stage.lam) must be in [0, 1], got {lam}")
        if not (float(tau) > 0 and math.isfinite(float(tau))):
            raise ConfigError(f"tau must be a positive entropy in nats (select iff H <= tau), got {tau}")
        if str(route).lower() not in ROUTES:
            raise ConfigError(f"unknown entropy route {route!r}; choose one of {', '.join(ROUTES)}")

    def training_step(self, batch, batch_idx):
        x, y = batch
        step = self.global_step
        eps_t, kappa, beta = self.schedule_at(step)
        if eps_t <= 0:
            logits = self.net(x)
            robust = torch.zeros((), device=x.device)
            l_cert = nn.functional.cross_entropy(logits, y)
            l_ent = natural_entropy_loss(logits, y)
        elif self.loss_fusion:
            robust, logits = robust_ce_loss(self.net, x, y, eps_t, self.method, beta=beta,
                                            loss_fusion=True, return_logits=True)
            l_cert = kappa * nn.functional.cross_entropy(logits, y) + (1.0 - kappa) * robust
            l_ent = entropy_selection_loss(self.net, x, y, eps_t, self.method, beta=beta)
        else:  # one bound pass: margins z_y - z_j, both sides
            l_cert, robust, logits, lb_d, ub_d = self.margin_pass(x, y, eps_t, kappa, beta, upper=True)
            l_ent = entropy_selection_loss_from_margins(lb_d, ub_d, y, logits.argmax(-1) == y)
        loss = (1.0 - self.lam) * l_cert + self.lam * l_ent
        if self.l1:
            loss = loss + self.l1 * l1_penalty(self.net)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_train_step({"train/loss": loss, "train/robust_loss": robust, "train/entropy_loss": l_ent,
                             "train/acc": acc},
                            {"train/eps": eps_t, "train/kappa": kappa, "train/beta": beta if beta is not None else 0.0})
        return loss

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().evaluate(x, y)
        with torch.no_grad():
            g, lb_g, _ = entropy_gate_bounds(self.net, x, self.eps, "IBP", self.route)
            if self.eval_crown_ibp():
                _, lb2, _ = entropy_gate_bounds(self.net, x, self.eps, "CROWN-IBP", self.route)
                lb_g = torch.maximum(lb_g, lb2)
        t = -self.tau
        cert = out["cert_acc"].bool()
        selected = g >= t
        extra = {"selection_rate": selected, "certified_selection_rate": (lb_g >= t)[cert],
                 "false_selection_rate": selected[~cert]}
        out.update({k: v for k, v in extra.items() if v.numel()})
        return out


def run_entropy(cfg: Mapping[str, Any], callbacks: tuple = (),
                pre_check: Optional[Callable[[nn.Module, Any], None]] = None) -> dict:
    st = to_dict(cfg["stage"])
    eps = float(cfg["eps"])
    if CertifiedStage.check_config(st, eps) not in CLASSIC:
        raise ConfigError(f"the entropy stage co-trains with IBP or CROWN-IBP bounds over the ball, not "
                         f"{st.get('method')}: train the cert stage with it and use entropy selection on it "
                         f"(stage=certify stage.selection=entropy stage.entropy_stage=cert)")
    EntropyStage.check_entropy_config(st["lam"], st["tau"], st["route"])
    run_dir = Path(cfg["run_dir"]).resolve()
    init = bool(st.get("init_from_cert", True))
    cert_stage = str(st.get("cert_stage") or "cert")
    inputs: dict[str, Any] = {}
    if init:
        cert_manifest = require_stage(run_dir, cert_stage, "entropy")
        cert_path, cert_sha = stage_weights(run_dir, cert_stage, cert_manifest, "entropy")
        net_cfg = dict(cert_manifest["net"])
        inputs["cert"] = {"stage": cert_stage, "path": str(cert_path), "sha256": cert_sha}
    else:
        net_cfg = dict(to_dict(cfg["cert_net"]))
    def make(net: nn.Module, dm: Any) -> EntropyStage:
        if init:
            check_same_data(dm.info, cert_manifest, cert_stage, "entropy")
            load_weights(net, cert_path, f"stage 'entropy': cert-net of stage '{cert_stage}'")
        return EntropyStage(net, st["optimizer"], st["lr_schedule"], eps=eps, lam=st["lam"], tau=st["tau"],
                            route=st["route"], method=st["method"], eps_factor=st["eps_factor"],
                            warmup_epochs=st["warmup_epochs"], ramp_epochs=st["ramp_epochs"],
                            ramp_shape=st["ramp_shape"], kappa_end=st["kappa_end"],
                            loss_fusion=st["loss_fusion"], l1=st["l1"], epochs=st["epochs"],
                            val_pgd_steps=st["val_pgd_steps"], val_crown_ibp=st["val_crown_ibp"])

    plain = dict(to_dict(cfg))
    plain["entropy_net"] = net_cfg
    selection = {"type": "entropy", "tau": float(st["tau"]), "threshold": -float(st["tau"]),
                 "route": str(st["route"]).lower(), "lam": float(st["lam"]), "init_from_cert": init}
    return run_training_stage(plain, "entropy", make, "entropy_net", EntropyStage.key_metric,
                              "entropy_cert.pt", inputs=inputs, pre_check=pre_check, callbacks=callbacks,
                              manifest_extra=lambda module: {"selection": selection})
