"""Shared LightningModule plumbing for the training stages: optimiser and per-epoch LR schedule
from config, epoch metrics that are exact under DDP (torchmetrics sums, not means of means)."""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from ace_lightning.bounds import full_precision
from ace_lightning.stages.schedules import step_decay
from ace_lightning.errors import ConfigError

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def build_optimizer(params, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """From the stage's ``optimizer`` config: ``_target_`` (any optimizer class, built with
    hydra.utils.instantiate) or the short form ``name: adam | adamw | sgd``."""
    cfg = dict(cfg)
    if "_target_" in cfg:
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            return instantiate({**cfg, "_partial_": True})(params)
        except InstantiationException as err:
            raise ConfigError(f"optimizer {cfg['_target_']!r} cannot be built: {err}") from None
    name = str(cfg.pop("name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        cfg.setdefault("momentum", 0.9)
    return OPTIMIZERS[name](params, **cfg)


def check_optimizer(cfg: Any) -> None:
    """The stage's ``optimizer`` config names an optimizer that exists (built later, with the
    parameters: build_optimizer); one-line ConfigError otherwise."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"optimizer must be a mapping (_target_: torch.optim.Adam, lr: ...), got {cfg!r}")
    if "_target_" in cfg:
        from hydra.utils import get_class

        try:
            get_class(str(cfg["_target_"]))
        except Exception as err:  # ImportError, ValueError: not a class
            reason = " ".join(str(err).split()).split(" Are you sure")[0]
            raise ConfigError(f"optimizer '{cfg['_target_']}' cannot be imported ({reason})") from None
        return
    name = str(cfg.get("name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")


def check_val_crown_ibp(value: Any) -> bool | str:
    """``val_crown_ibp``: true, false or "after_ramp" (one-line error otherwise)."""
    if isinstance(value, bool) or value == "after_ramp":
        return value
    raise ConfigError(f"val_crown_ibp must be true, false or after_ramp, got {value!r}")


class StageModule(L.LightningModule):
    """Holds ``net`` (the network the stage trains) and named accuracy metrics per split."""

    metric_names: tuple[str, ...] = ()
    # Certified stages evaluate in full precision whatever trainer.precision says (their bounds
    # always are; natural accuracy and PGD then see the same arithmetic); the core may stay mixed.
    precise_eval: bool = False

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
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of the configured lr in ``epoch``: x gamma at each of ``milestones`` (epochs,
        as the certified-training papers give them), else step decay every ``step_epochs`` after
        lr_decay_start_epoch."""
        gamma = float(self.lr_schedule_cfg.get("gamma", 1.0))
        milestones = self.lr_schedule_cfg.get("milestones")
        if milestones:
            return gamma ** sum(epoch >= int(m) for m in milestones)
        every = int(self.lr_schedule_cfg.get("step_epochs", 0) or 0)
        return step_decay(epoch, self.lr_decay_start_epoch, every, gamma)

    def log_train_step(self, shown: Mapping[str, Any], quiet: Mapping[str, Any] = {}) -> None:
        """Per-step training values (``shown`` also in the progress bar), handed to Lightning only
        on the steps its loggers write (trainer.log_every_n_steps): the self.log machinery costs a
        fixed time per call, a large share of a small net's step (make bench measures it)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        self.log_dict(dict(shown), prog_bar=True, on_step=True, on_epoch=False)
        if quiet:
            self.log_dict(dict(quiet), on_step=True, on_epoch=False)

    def update_metrics(self, split: str, values: Mapping[str, torch.Tensor]) -> None:
        """values: name -> per-input 0/1 tensor (weights every input equally across batches/ranks)."""
        for name, v in values.items():
            metric = self.metrics[f"{split}_{name}"]
            metric.update(v.float())
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in (
                "nat_acc", "cert_acc"), metric_attribute=f"metrics.{split}_{name}")

    def on_validation_epoch_start(self) -> None:
        self.check_finite()

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def check_finite(self) -> None:
        """A diverged run stops with one clear line instead of certifying (and exporting) NaN weights."""
        state = self.net.state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ConfigError(f"the weights became NaN/inf by epoch {self.current_epoch} ({len(bad)} tensors, "
                             f"e.g. {bad[0]}): training diverged; lower optimizer.lr or set grad_clip")

    def _eval_context(self):
        return full_precision() if self.precise_eval else contextlib.nullcontext()

    def validation_step(self, batch, batch_idx):
        with self._eval_context():
            values = self.evaluate(*batch)
        self.update_metrics("val", values)

    def test_step(self, batch, batch_idx):
        with self._eval_context():
            values = self.evaluate(*batch)
        self.update_metrics("test", values)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
