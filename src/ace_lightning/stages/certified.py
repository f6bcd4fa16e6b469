"""Certified training: what the cert (stages/cert.py), gate (stages/gate.py) and entropy
(stages/entropy.py) stages share, so that no stage imports another.

CertifiedStageModule owns, from a CertifiedTrainingConfig: the eps/kappa/beta ramp, eps 0 ->
eps_train = factor x eps after a natural warm-up, kappa 1 -> kappa_end and (CROWN-IBP) beta 1 -> 0
over the same ramp, counted in steps (stages/schedules.py); the L1 penalty; the per-step logging;
the validation policy (``val_crown_ibp``) and the rule that validation bounds with the tighter
method only the rows where it can change a metric. CertifiedClassifier adds the classifier's
L = kappa * CE(f(x), y) + (1 - kappa) * L_robust: ``margin_pass`` is the one bound pass over the
margins z_y - z_j that gives L_robust and, for co-training, the margins themselves. Validation:
natural, IBP-certified (and CROWN-IBP-certified when affordable) and PGD accuracy at the *target*
eps, always in full precision.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ace_lightning.attacks import adversarial_correct
from ace_lightning.bounds import margin_lower_bounds, margin_spec, output_bounds, padded_rows, worst_case_ce
from ace_lightning.nets import eval_mode, final_linear_name
from ace_lightning.stages.base import StageModule
from ace_lightning.stages.common import l1_penalty
from ace_lightning.stages.configs import CertifiedTrainingConfig, ClassifierTrainingConfig
from ace_lightning.stages.schedules import CertSchedule


def certified_correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      method: str) -> torch.Tensor:
    """Per input: every margin z_y - z_j provably positive on the ball (implies correct at x)."""
    with torch.no_grad():
        return margin_lower_bounds(net, x, y, eps, method).min(dim=1).values > 0


def check_boundable(net: nn.Module, dm: Any) -> None:
    """Fail before training when the bound layer cannot handle the net (one-line ValueError)."""
    shape = tuple(dm.info.input_shape)
    x = torch.full((2, *shape), 0.5)
    with eval_mode(net):
        output_bounds(net, x, 0.01, "IBP")


class CertifiedStageModule(StageModule):
    """The schedules, L1, logging and validation policy of a certified-training stage, from its
    validated config; ``method`` is the canonical training method."""

    precise_eval = True

    def __init__(self, net: nn.Module, config: CertifiedTrainingConfig, eps: float, method: str) -> None:
        super().__init__(net, config.optimizer, config.lr_schedule,
                         lr_decay_start_epoch=int(round(config.warmup_epochs + config.ramp_epochs)))
        self.config = config
        self.eps, self.method = float(eps), method
        self.l1, self.val_crown_ibp = float(config.l1), config.val_crown_ibp
        self.steps_per_epoch = config.steps_per_epoch
        self._schedule: Optional[CertSchedule] = None
        self.save_hyperparameters(config.hparams(method=method, eps=self.eps))

    @property
    def per_epoch(self) -> int:
        return self.steps_per_epoch or max(1, int(self.trainer.num_training_batches))

    @property
    def schedule(self) -> CertSchedule:
        if self._schedule is None:
            c = self.config
            self._schedule = CertSchedule(
                eps_train=min(1.0, self.eps * float(c.eps_factor)),
                warmup_steps=int(round(float(c.warmup_epochs) * self.per_epoch)),
                ramp_steps=int(round(float(c.ramp_epochs) * self.per_epoch)),
                kappa_end=float(c.kappa_end), shape=c.ramp_shape)
        return self._schedule

    @property
    def fitting(self) -> bool:
        """Inside Trainer.fit (validation between epochs), not test / validate / a direct call."""
        trainer = self._trainer
        return trainer is not None and trainer.state.fn == "fit"

    def eval_crown_ibp(self) -> bool:
        """Whether this validation/test pass also bounds with CROWN-IBP (``val_crown_ibp``): true,
        false, or "after_ramp": only once eps has reached its target (validation before that
        certifies with the training method alone; it cannot select the checkpoint, whose
        certified accuracy at the target eps is far higher after the ramp). Test: always."""
        mode = self.val_crown_ibp
        if mode != "after_ramp":
            return bool(mode)
        if not self.fitting:
            return True  # test, validate (a pretrained net), direct calls: the net is final
        s = self.schedule
        return self.global_step >= s.warmup_steps + s.ramp_steps

    def rows_to_tighten(self, open_rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(rows, n) a tighter bound sees: in validation only the ``open_rows`` where it can change a
        metric (padded, the first n real), else every row (test reports its own metric too)."""
        if self.fitting:
            return padded_rows(open_rows)
        return torch.arange(open_rows.shape[0], device=open_rows.device), open_rows.shape[0]

    def schedule_at(self, step: int) -> tuple[float, float, Optional[float]]:
        """(eps, kappa, beta) at an optimiser step; beta only for CROWN-IBP training."""
        beta = self.schedule.beta(step) if self.method == "CROWN-IBP" else None
        return self.schedule.eps(step), self.schedule.kappa(step), beta

    def with_l1(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss plus the L1 penalty (docs/METHOD.md section 6), when ``l1`` is set."""
        return loss + self.l1 * l1_penalty(self.net) if self.l1 else loss

    def log_certified_step(self, shown: Mapping[str, Any], eps_t: float, kappa: float, beta: Optional[float],
                           **quiet: Any) -> None:
        """A step's values (``shown`` in the progress bar too) and where the ramp stands."""
        self.log_train_step(shown, {"train/eps": eps_t, "train/kappa": kappa,
                                    "train/beta": beta if beta is not None else 0.0, **quiet})


class CertifiedClassifier(CertifiedStageModule):
    """Certified training of a classifier (cert, entropy): the margin bound pass and the
    validation at the target eps."""

    metric_names = ("nat_acc", "ibp_cert_acc", "crown_ibp_cert_acc", "cert_acc", "pgd_acc")

    def __init__(self, net: nn.Module, config: ClassifierTrainingConfig, eps: float, method: str) -> None:
        super().__init__(net, config, eps, method)
        self.loss_fusion, self.val_pgd_steps = bool(config.loss_fusion), int(config.val_pgd_steps)
        self.num_classes = int(net.get_submodule(final_linear_name(net)).out_features)

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
                rows, n = self.rows_to_tighten(nat & ~ibp)
                cert = ibp.clone()
                if n:
                    cert[rows[:n]] = certified_correct(self.net, x[rows], y[rows], self.eps, "CROWN-IBP")[:n]
            else:
                crown = certified_correct(self.net, x, y, self.eps, "CROWN-IBP")
                out["crown_ibp_cert_acc"] = crown
                cert = ibp | crown  # a certificate from either bound is a certificate
        out["cert_acc"] = cert
        if self.val_pgd_steps > 0:  # certified inputs are robust: PGD runs on the others
            out["pgd_acc"] = adversarial_correct(self.net, x, y, self.eps, steps=self.val_pgd_steps,
                                                 known=cert)
        return out
