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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

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
from ace_lightning.nets import check_net_config
from ace_lightning.rundir import check_same_data, load_weights, require_stage, stage_weights
from ace_lightning.stages.certified import CertifiedClassifier
from ace_lightning.stages.configs import CLASSIC, ClassifierTrainingConfig
from ace_lightning.stages.runner import Stage, StageInputs


def natural_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_ent at eps = 0: H/log K where argmax = y, (log K - H)/log K elsewhere (mean)."""
    log_k = math.log(logits.shape[-1])
    h = entropy(logits)
    return (torch.where(logits.argmax(-1) == y, h, log_k - h) / log_k).mean()


@dataclass(kw_only=True)
class EntropyConfig(ClassifierTrainingConfig):
    """conf/stage/entropy.yaml (every knob documented there)."""

    stage = "entropy"

    init_from_cert: bool
    cert_stage: Optional[str]
    lam: float
    tau: float
    route: str

    def check_stage_knobs(self, method: str) -> None:
        if method not in CLASSIC:
            raise ConfigError(f"the entropy stage co-trains with IBP or CROWN-IBP bounds over the ball, not "
                              f"{self.method}: train the cert stage with it and use entropy selection on it "
                              f"(stage=certify stage.selection=entropy stage.entropy_stage=cert)")
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ConfigError(f"lambda (stage.lam) must be in [0, 1], got {self.lam}")
        if not (float(self.tau) > 0 and math.isfinite(float(self.tau))):
            raise ConfigError(f"tau must be a positive entropy in nats (select iff H <= tau), got {self.tau}")
        if str(self.route).lower() not in ROUTES:
            raise ConfigError(f"unknown entropy route {self.route!r}; choose one of {', '.join(ROUTES)}")


@dataclass
class EntropyInputs(StageInputs):
    """The run folder's inputs, and the manifest of the cert-net the stage fine-tunes."""

    cert_manifest: Optional[dict] = None  # init_from_cert: the manifest of the cert-net's stage


class EntropyStage(CertifiedClassifier):
    metric_names = CertifiedClassifier.metric_names + ("certified_selection_rate", "false_selection_rate",
                                                       "selection_rate")

    def __init__(self, net: nn.Module, config: EntropyConfig, eps: float) -> None:
        super().__init__(net, config, eps, config.method)
        self.lam, self.tau, self.route = float(config.lam), float(config.tau), str(config.route).lower()

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
        loss = self.with_l1((1.0 - self.lam) * l_cert + self.lam * l_ent)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_certified_step({"train/loss": loss, "train/robust_loss": robust, "train/entropy_loss": l_ent,
                                 "train/acc": acc}, eps_t, kappa, beta)
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


def read_entropy_inputs(cfg: Mapping[str, Any], config: EntropyConfig) -> EntropyInputs:
    """The cert-net to fine-tune (``init_from_cert``: its stage's weights and net), else cert_net."""
    inputs = EntropyInputs(folder="entropy", eps=float(cfg["eps"]), net=dict(to_dict(cfg["cert_net"])))
    if config.init_from_cert:
        cert_stage, run_dir = str(config.cert_stage or "cert"), Path(cfg["run_dir"]).resolve()
        manifest = require_stage(run_dir, cert_stage, "entropy")
        path, sha = stage_weights(run_dir, cert_stage, manifest, "entropy")
        inputs.net = dict(manifest["net"])
        inputs.inputs["cert"] = {"stage": cert_stage, "path": str(path), "sha256": sha}
        inputs.cert_manifest = manifest
    return inputs


def make_entropy(net: nn.Module, dm: Any, config: EntropyConfig, inputs: EntropyInputs) -> EntropyStage:
    if inputs.cert_manifest is not None:
        cert = inputs.inputs["cert"]
        check_same_data(dm.info, inputs.cert_manifest, cert["stage"], "entropy")
        load_weights(net, Path(cert["path"]), f"stage 'entropy': cert-net of stage '{cert['stage']}'")
    return EntropyStage(net, config, inputs.eps)


def entropy_manifest(module: EntropyStage, config: EntropyConfig, inputs: EntropyInputs) -> dict:
    """The composition's selector: g(x) = -H(x) >= -tau."""
    return {"selection": {"type": "entropy", "tau": float(config.tau), "threshold": -float(config.tau),
                          "route": str(config.route).lower(), "lam": float(config.lam),
                          "init_from_cert": bool(config.init_from_cert)}}


def check_entropy_job(cfg: Mapping[str, Any], config: EntropyConfig) -> None:
    """A cert-net trained from scratch: cert_net is a net."""
    if not config.init_from_cert:
        check_net_config(to_dict(cfg["cert_net"]), "cert_net")


STAGE = Stage("entropy", EntropyConfig, net_key="entropy_net", weights="entropy_cert.pt", key_metric="val/cert_acc",
              make_module=make_entropy, read_inputs=read_entropy_inputs, check=check_entropy_job,
              manifest_extra=entropy_manifest, certified=True)
