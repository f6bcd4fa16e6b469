"""Core stage: the accurate network (any timm model or the small CPU core), trained naturally or
with PGD at a small eps (docs/METHOD.md section 6). It never needs to be certifiable."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ace_lightning.attacks import adversarial_correct, pgd
from ace_lightning.config import to_dict
from ace_lightning.errors import ConfigError
from ace_lightning.nets import check_net_config, eval_mode
from ace_lightning.stages.base import StageModule
from ace_lightning.stages.common import l1_penalty
from ace_lightning.stages.configs import StageConfig
from ace_lightning.stages.runner import Stage, StageInputs


@dataclass(kw_only=True)
class CoreConfig(StageConfig):
    """conf/stage/core.yaml (every knob documented there)."""

    stage = "core"

    mode: str
    train_eps: float
    pgd_steps: int
    pgd_step_size: float
    eval_pgd_steps: int
    channels_last: bool
    mixed_precision: bool

    def validate(self, eps: float) -> None:
        """eps: the run's, for the PGD evaluation."""
        if self.mode not in ("natural", "pgd"):
            raise ConfigError(f"core training mode must be 'natural' or 'pgd', got {self.mode!r}")
        if self.mode == "pgd" and not 0.0 < float(self.train_eps) <= 1.0:
            raise ConfigError(f"PGD core training needs train_eps in (0, 1], got {self.train_eps}")
        if not 0.0 <= float(eps) <= 1.0:
            raise ConfigError(f"eps must be in [0, 1] (pixel space, e.g. 2/255 = 0.00784), got {eps}")
        super().validate(eps)

    def mixed(self) -> bool:
        return self.mixed_precision


class CoreStage(StageModule):
    metric_names = ("nat_acc", "pgd_acc")

    def __init__(self, net: nn.Module, config: CoreConfig, eval_eps: float) -> None:
        if config.channels_last:  # NHWC convolutions: faster for many conv nets, different float rounding
            net = net.to(memory_format=torch.channels_last)
        super().__init__(net, config.optimizer, config.lr_schedule)
        self.mode, self.train_eps = config.mode, float(config.train_eps)
        self.pgd_steps, self.pgd_step_size = int(config.pgd_steps), float(config.pgd_step_size)
        self.eval_eps, self.eval_pgd_steps, self.l1 = float(eval_eps), int(config.eval_pgd_steps), float(config.l1)
        self.channels_last = bool(config.channels_last)
        self.save_hyperparameters(config.hparams(eval_eps=self.eval_eps))

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


def make_core(net: nn.Module, dm: Any, config: CoreConfig, inputs: StageInputs) -> CoreStage:
    return CoreStage(net, config, eval_eps=inputs.eps)


def check_core_net(cfg: Any, config: CoreConfig) -> None:
    check_net_config(to_dict(cfg["core_net"]), "core_net")


STAGE = Stage("core", CoreConfig, net_key="core_net", weights="core.pt", key_metric="val/nat_acc",
              make_module=make_core, check=check_core_net)
