"""Core stage: the accurate network (any timm model or the small CPU core), trained naturally or
with PGD at a small eps (docs/METHOD.md section 6). It never needs to be certifiable."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ace_lightning.attacks import adversarial_correct, pgd
from ace_lightning.nets import eval_mode
from ace_lightning.stages.base import StageModule
from ace_lightning.stages.common import l1_penalty
from ace_lightning.errors import ConfigError


class CoreStage(StageModule):
    metric_names = ("nat_acc", "pgd_acc")
    key_metric = "val/nat_acc"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Mapping[str, Any],
        lr_schedule: Mapping[str, Any],
        mode: str = "natural",
        train_eps: float = 0.0,
        pgd_steps: int = 8,
        pgd_step_size: float = 0.25,
        eval_eps: float = 0.0,
        eval_pgd_steps: int = 10,
        l1: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        if channels_last:  # NHWC convolutions: faster for many conv nets, different float rounding
            net = net.to(memory_format=torch.channels_last)
        super().__init__(net, optimizer, lr_schedule)
        self.check_config({"mode": mode, "train_eps": train_eps}, eval_eps)
        self.mode, self.train_eps = mode, float(train_eps)
        self.pgd_steps, self.pgd_step_size = int(pgd_steps), float(pgd_step_size)
        self.eval_eps, self.eval_pgd_steps, self.l1 = float(eval_eps), int(eval_pgd_steps), float(l1)
        self.channels_last = bool(channels_last)
        self.save_hyperparameters(ignore=["net"])

    @staticmethod
    def check_config(st: Mapping[str, Any], eps: float) -> None:
        """One-line ConfigErrors before any data is loaded (eps: the run's, for the PGD evaluation)."""
        mode, train_eps = st.get("mode", "natural"), st.get("train_eps", 0.0)
        if mode not in ("natural", "pgd"):
            raise ConfigError(f"core training mode must be 'natural' or 'pgd', got {mode!r}")
        if mode == "pgd" and not 0.0 < float(train_eps) <= 1.0:
            raise ConfigError(f"PGD core training needs train_eps in (0, 1], got {train_eps}")
        if not 0.0 <= float(eps) <= 1.0:
            raise ConfigError(f"eps must be in [0, 1] (pixel space, e.g. 2/255 = 0.00784), got {eps}")

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """The batch in the net's memory format (NHWC with ``channels_last``)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._layout(x)
        if self.mode == "pgd":
            with eval_mode(self.net):  # attack the current weights with frozen BN statistics
                x = pgd(self.net, x, y, self.train_eps, self.pgd_steps, self.pgd_step_size, random_start=True)
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.l1:
            loss = loss + self.l1 * l1_penalty(self.net)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_train_step({"train/loss": loss, "train/acc": acc})
        return loss

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._layout(x)
        with torch.no_grad():
            nat = self.net(x).argmax(-1) == y
        out = {"nat_acc": nat}
        if self.eval_eps > 0 and self.eval_pgd_steps > 0:
            out["pgd_acc"] = adversarial_correct(self.net, x, y, self.eval_eps, steps=self.eval_pgd_steps)
        return out
