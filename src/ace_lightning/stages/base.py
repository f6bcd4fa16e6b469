"""Shared LightningModule plumbing for the training stages: optimiser and per-epoch LR schedule
from config, epoch metrics that are exact under DDP (torchmetrics sums, not means of means)."""
from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from ace_lightning.stages.schedules import step_decay

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def build_optimizer(params, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    cfg = dict(cfg)
    name = str(cfg.pop("name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        cfg.setdefault("momentum", 0.9)
    return OPTIMIZERS[name](params, **cfg)


class StageModule(L.LightningModule):
    """Holds ``net`` (the network the stage trains) and named accuracy metrics per split."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, net: nn.Module, optimizer: Mapping[str, Any], lr_schedule: Mapping[str, Any],
                 lr_decay_start_epoch: int = 0) -> None:
        super().__init__()
        self.net = net
        self.optimizer_cfg = dict(optimizer)
        self.lr_schedule_cfg = dict(lr_schedule or {})
        self.lr_decay_start_epoch = int(lr_decay_start_epoch)
        self.metrics = nn.ModuleDict({
            f"{split}_{name}": MeanMetric() for split in ("val", "test") for name in self.metric_names
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self):
        opt = build_optimizer(self.net.parameters(), self.optimizer_cfg)
        every = int(self.lr_schedule_cfg.get("step_epochs", 0) or 0)
        gamma = float(self.lr_schedule_cfg.get("gamma", 1.0))
        start = self.lr_decay_start_epoch

        def factor(epoch: int) -> float:
            return step_decay(epoch, start, every, gamma)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def update_metrics(self, split: str, values: Mapping[str, torch.Tensor]) -> None:
        """values: name -> per-input 0/1 tensor (weights every input equally across batches/ranks)."""
        for name, v in values.items():
            metric = self.metrics[f"{split}_{name}"]
            metric.update(v.float())
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in (
                "nat_acc", "cert_acc"), metric_attribute=f"metrics.{split}_{name}")

    def validation_step(self, batch, batch_idx):
        self.update_metrics("val", self.evaluate(*batch))

    def test_step(self, batch, batch_idx):
        self.update_metrics("test", self.evaluate(*batch))

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
