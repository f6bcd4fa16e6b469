"""Certification-network stage: certified training (docs/METHOD.md sections 6 and 11).

L = kappa * CE(f(x), y) + (1 - kappa) * L_method, over the eps/kappa/beta ramp of
stages/certified.py (shared with the entropy stage). L_method (stages/losses.py): IBP or CROWN-IBP,
CE(-lb(C f), y) over the ball; SABR, the same over a small box around a PGD point; MTL-IBP,
CC-IBP, Exp-IBP, IBP mixed with the adversarial loss. Shi et al.'s IBP initialisation
(``shi_init``) and warm-up regularisers (``shi_regularizer``, weight x (1 - eps_t / eps_train)
while eps ramps) go with any of them.

Optional selection co-training (``select_weight`` lambda > 0, from ``select_start_epoch``, by
default the end of the ramp): L = (1 - lambda) L_cert + lambda L_sel with the selection margin loss
below, the margin analogue of the entropy co-training of section 6. A selector can only tell
certified from uncertified inputs if the certified ones carry large certified margins and the
uncertified ones look uncertain at x: the loss asks for both (what it buys each selector is
measured in experiments/gate_tuning_fmnist.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ace_lightning.bounds import margin_ce, margin_spec, robust_ce_loss
from ace_lightning.config import to_dict
from ace_lightning.errors import ConfigError, InputNotFoundError
from ace_lightning.nets import check_net_config
from ace_lightning.rundir import sha256_file
from ace_lightning.stages.certified import CertifiedClassifier
from ace_lightning.stages.configs import CLASSIC, ClassifierTrainingConfig
from ace_lightning.stages.losses import CertifiedLoss, build_loss, ibp_init, shi_regularizer
from ace_lightning.stages.runner import Stage, StageInputs

SHI_WARMUP_EPS = 1e-6  # Shi et al.: the regulariser's bounds during the natural warm-up


def selection_margin_loss(lb_margins: torch.Tensor, logits: torch.Tensor, margin: float,
                          uncertified_weight: float = 1.0, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_sel (mean over the batch), from the certified margins M = min_j lb(z_y - z_j) over the ball
    (``lb_margins``: [B, K-1]) and the logits at x: relu(margin - M) / margin where M >= 0 (push the
    certificate's margin up to ``margin``), uncertified_weight * (z_top1 - z_top2)(x) / margin
    elsewhere (an input that cannot be certified should look uncertain at x, so a selector rejects it).
    With labels ``y`` only misclassified uncertified inputs are pushed (``select_negatives: wrong``):
    routing a correct one costs no natural accuracy."""
    m_cert = lb_margins.min(dim=1).values
    top2 = logits.topk(2, dim=-1).values
    natural_gap = top2[:, 0] - top2[:, 1]
    certified = (m_cert >= 0).detach()
    push = uncertified_weight * natural_gap
    if y is not None:
        push = torch.where(logits.argmax(-1) != y, push, torch.zeros_like(push))
    per_input = torch.where(certified, nn.functional.relu(margin - m_cert), push)
    return per_input.mean() / margin


@dataclass(kw_only=True)
class CertConfig(ClassifierTrainingConfig):
    """conf/stage/cert.yaml (every knob documented there)."""

    stage = "cert"

    folder: Optional[str]
    sabr_lambda: float
    alpha: float
    attack: Optional[dict]
    shi_init: bool
    shi_regularizer: bool
    shi_reg_weight: float
    shi_tol: float
    pretrained_path: Optional[str]
    select_weight: float
    select_margin: float
    select_uncertified_weight: float
    select_negatives: str
    select_start_epoch: Optional[float]
    select_lr: Optional[float]
    select_lr_step_epochs: int

    def method_knobs(self) -> dict[str, Any]:
        return {"sabr_lambda": self.sabr_lambda, "alpha": self.alpha, "attack": self.attack}

    def selects_last(self) -> bool:
        """Selection co-training trades a little certified accuracy for selectability: the best val
        cert_acc would pick a checkpoint from before it, so the last weights are exported instead."""
        return float(self.select_weight) > 0

    def stage_folder(self) -> str:
        """The stage folder: a cascade's second cert-net has its own (cert_2)."""
        return str(self.folder or "cert")

    def check_stage_knobs(self, method: str) -> None:
        if not float(self.shi_reg_weight) >= 0:
            raise ConfigError(f"shi_reg_weight must be >= 0, got {self.shi_reg_weight}")
        if not 0.0 < float(self.shi_tol) <= 1.0:
            raise ConfigError(f"shi_tol must be in (0, 1], got {self.shi_tol}")
        warmup, ramp, epochs = float(self.warmup_epochs), float(self.ramp_epochs), self.epochs
        lam = float(self.select_weight)
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"select_weight (lambda of the selection co-training) must be in [0, 1], got {lam}")
        if lam > 0:
            if method == "SABR":
                raise ConfigError("select_weight > 0 needs certified margins over the whole ball, which SABR "
                                  "does not compute: use IBP, CROWN-IBP, MTL-IBP, CC-IBP or Exp-IBP")
            if not float(self.select_margin) > 0:
                raise ConfigError(f"select_margin must be positive, got {self.select_margin}")
            if self.select_negatives not in ("uncertified", "wrong"):
                raise ConfigError(f"select_negatives must be uncertified or wrong, got {self.select_negatives!r}")
            if float(self.select_uncertified_weight) < 0:
                raise ConfigError(f"select_uncertified_weight must be >= 0, got {self.select_uncertified_weight}")
            if self.loss_fusion:
                raise ConfigError("select_weight > 0 needs the margin bounds: set loss_fusion: false")
            start = self.select_start_epoch
            if start is not None and float(start) < warmup + ramp:
                raise ConfigError(f"select_start_epoch {start} is inside the eps schedule (warm-up + ramp = "
                                  f"{warmup + ramp:g} epochs): the selection loss needs the full eps")
            if start is not None and float(start) >= float(epochs):
                raise ConfigError(f"select_start_epoch {start} >= epochs {epochs}: the selection loss would never run")
            if self.select_lr is not None and not float(self.select_lr) > 0:
                raise ConfigError(f"select_lr must be positive (or null: keep the stage's lr schedule), "
                                  f"got {self.select_lr}")
        folder = self.stage_folder()
        if not folder.startswith("cert") or "/" in folder or folder.startswith("certify"):
            raise ConfigError(f"stage.folder must name a cert stage folder such as cert or cert_2, got {folder!r}")


class CertStage(CertifiedClassifier):
    def __init__(self, net: nn.Module, config: CertConfig, eps: float) -> None:
        super().__init__(net, config, eps, config.method)
        self.select_weight, self.select_margin = float(config.select_weight), float(config.select_margin)
        self.select_uncertified_weight = float(config.select_uncertified_weight)
        self.select_negatives = str(config.select_negatives)
        self.select_start_epoch = (float(config.warmup_epochs) + float(config.ramp_epochs)
                                   if config.select_start_epoch is None else float(config.select_start_epoch))
        self.select_lr = None if config.select_lr is None else float(config.select_lr)
        self.select_lr_step_epochs = int(config.select_lr_step_epochs)
        self.loss_fn = build_loss(config.method, sabr_lambda=config.sabr_lambda, alpha=config.alpha,
                                  attack=dict(config.attack or {}))
        self.shi_regularizer = bool(config.shi_regularizer)
        self.shi_reg_weight, self.shi_tol = float(config.shi_reg_weight), float(config.shi_tol)
        if config.shi_init:  # a resumed run restores its checkpoint's weights over this
            ibp_init(self.net)

    def lr_factor(self, epoch: int) -> float:
        """The stage's step decay; with ``select_lr`` the co-training phase restarts at select_lr and
        decays by the same gamma every select_lr_step_epochs (a warm restart: co-training a converged
        cert-net at its final, decayed lr barely moves it)."""
        start = int(math.ceil(self.select_start_epoch - 1e-9))
        if self.select_weight <= 0 or self.select_lr is None or epoch < start:
            return super().lr_factor(epoch)
        gamma = float(self.lr_schedule_cfg.get("gamma", 1.0))
        base = float(self.optimizer_cfg.get("lr", 1e-3))
        return self.select_lr / base * gamma ** ((epoch - start) // max(1, self.select_lr_step_epochs))

    def selection_loss(self, lb_margins: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_sel with this stage's knobs (select_negatives: wrong passes the labels)."""
        return selection_margin_loss(lb_margins, logits, self.select_margin, self.select_uncertified_weight,
                                     y if self.select_negatives == "wrong" else None)

    def selecting(self, step: int) -> bool:
        """Selection co-training runs from select_start_epoch (default: the end of the eps ramp)."""
        if self.select_weight <= 0:
            return False
        ramp_end = self.schedule.warmup_steps + self.schedule.ramp_steps
        return step >= max(ramp_end, int(round(self.select_start_epoch * self.per_epoch)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        step = self.global_step
        eps_t, kappa, beta = self.schedule_at(step)
        extra: dict[str, torch.Tensor] = {}
        relus = None
        if eps_t <= 0:
            if self.shi_regularizer:  # the regulariser shapes the bounds from the first step
                out = CertifiedLoss("IBP")(self.net, x, margin_spec(y, self.num_classes, dtype=x.dtype),
                                           SHI_WARMUP_EPS, margin_ce, relu_bounds=True)
                logits, relus = out.logits, (out.relu_bounds, out.input_halfwidth)
            else:
                logits = self.net(x)
            robust = torch.zeros((), device=x.device)
            loss = nn.functional.cross_entropy(logits, y)
        elif self.method in CLASSIC and not self.shi_regularizer:
            # the classic path: IBP / CROWN-IBP over the whole ball (optionally loss fusion)
            if self.selecting(step):  # one bound pass gives both losses
                l_cert, robust, logits, lb_d, _ = self.margin_pass(x, y, eps_t, kappa, beta)
                l_sel = self.selection_loss(lb_d, logits, y)
                loss = (1.0 - self.select_weight) * l_cert + self.select_weight * l_sel
                extra["train/selection_loss"] = l_sel
            else:
                robust, logits = robust_ce_loss(self.net, x, y, eps_t, self.method, beta=beta,
                                                loss_fusion=self.loss_fusion, return_logits=True)
                loss = kappa * nn.functional.cross_entropy(logits, y) + (1.0 - kappa) * robust
        else:
            C = margin_spec(y, self.num_classes, dtype=x.dtype)
            out = self.loss_fn(self.net, x, C, eps_t, margin_ce, beta, relu_bounds=self.shi_regularizer)
            logits = out.logits if out.logits is not None else self.net(x)
            robust = out.loss
            loss = kappa * nn.functional.cross_entropy(logits, y) + (1.0 - kappa) * robust
            if self.selecting(step):  # the method's full-ball margins give the selection loss too
                l_sel = self.selection_loss(out.ball_lb, logits, y)
                loss = (1.0 - self.select_weight) * loss + self.select_weight * l_sel
                extra["train/selection_loss"] = l_sel
            if self.shi_regularizer:
                relus = (out.relu_bounds, out.input_halfwidth)
        if relus is not None:
            weight = self.shi_reg_weight * (1.0 - eps_t / self.schedule.eps_train)
            if weight > 0:
                tight, balance = shi_regularizer(relus[0], relus[1], self.net, self.shi_tol)
                loss = loss + weight * (tight + balance)
                extra.update({"train/shi_tightness": tight, "train/shi_relu": balance})
        loss = self.with_l1(loss)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_certified_step({"train/loss": loss, "train/robust_loss": robust, "train/acc": acc, **extra},
                                eps_t, kappa, beta)
        return loss


def read_cert_inputs(cfg: Mapping[str, Any], config: CertConfig) -> StageInputs:
    """An external cert-net (``pretrained_path``) is an input: its path and sha256."""
    inputs = StageInputs(folder=config.stage_folder(), eps=float(cfg["eps"]))
    if config.pretrained_path:
        path = Path(str(config.pretrained_path)).expanduser().resolve()
        inputs.pretrained = str(path)
        inputs.inputs["pretrained"] = {"path": str(path), "sha256": sha256_file(path)}
    return inputs


def make_cert(net: nn.Module, dm: Any, config: CertConfig, inputs: StageInputs) -> CertStage:
    if inputs.pretrained:
        config = replace(config, shi_init=False)  # the imported weights are the net
    return CertStage(net, config, inputs.eps)


def check_cert_job(cfg: Mapping[str, Any], config: CertConfig) -> None:
    """The external weights exist; the cert-net's config is a net."""
    if config.pretrained_path:
        path = Path(str(config.pretrained_path)).expanduser().resolve()
        if not path.is_file():
            raise InputNotFoundError(f"stage.pretrained_path: weight file not found: {path}")
    check_net_config(to_dict(cfg["cert_net"]), "cert_net")


STAGE = Stage("cert", CertConfig, net_key="cert_net", weights="cert.pt", key_metric="val/cert_acc",
              make_module=make_cert, read_inputs=read_cert_inputs, check=check_cert_job, certified=True)
