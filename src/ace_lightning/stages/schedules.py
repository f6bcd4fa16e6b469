"""Certified-training schedules, counted in optimiser steps so that resuming from a checkpoint
(which restores ``global_step``) continues them exactly where they were.

eps: 0 for ``warmup`` steps, then a ramp to ``eps_train`` over ``ramp`` steps (linear, or smoothed:
slow start, docs/METHOD.md section 6), then constant. kappa (natural-loss weight) follows the same
ramp from 1 to ``kappa_end``; CROWN-IBP's beta goes 1 -> 0 (auto_LiRPA's convention:
beta = (eps_train - eps) / eps_train).
"""
from __future__ import annotations

from dataclasses import dataclass
from ace_lightning.errors import ConfigError


def ramp_progress(step: int, warmup: int, ramp: int, shape: str = "linear") -> float:
    """0 before the ramp, 1 after it; in between linear or smoothstep."""
    if step < warmup:
        return 0.0
    if ramp <= 0 or step >= warmup + ramp:
        return 1.0
    t = (step - warmup) / ramp
    if shape == "linear":
        return t
    if shape == "smooth":
        return t * t * (3.0 - 2.0 * t)
    raise ConfigError(f"unknown ramp shape {shape!r}; use 'linear' or 'smooth'")


@dataclass(frozen=True)
class CertSchedule:
    eps_train: float
    warmup_steps: int
    ramp_steps: int
    kappa_end: float = 0.5
    shape: str = "linear"

    def __post_init__(self) -> None:
        if not 0.0 <= self.kappa_end <= 1.0:
            raise ConfigError(f"kappa_end must be in [0, 1], got {self.kappa_end}")
        if not 0.0 <= self.eps_train <= 1.0:
            raise ConfigError(f"eps_train must be in [0, 1] (pixel space), got {self.eps_train}")
        if self.warmup_steps < 0 or self.ramp_steps < 0:
            raise ConfigError("warm-up and ramp lengths must be >= 0")
        ramp_progress(0, 0, 1, self.shape)  # validates the shape name

    def progress(self, step: int) -> float:
        return ramp_progress(step, self.warmup_steps, self.ramp_steps, self.shape)

    def eps(self, step: int) -> float:
        return self.eps_train * self.progress(step)

    def kappa(self, step: int) -> float:
        return 1.0 - (1.0 - self.kappa_end) * self.progress(step)

    def beta(self, step: int) -> float:
        return 1.0 - self.progress(step)

    @property
    def end_step(self) -> int:
        return self.warmup_steps + self.ramp_steps


def step_decay(epoch: int, start_epoch: int, every: int, gamma: float) -> float:
    """LR factor: 1 until ``start_epoch`` (the end of the eps ramp for cert-nets: decaying during
    the ramp hurts certified accuracy), then x gamma after every ``every`` further epochs."""
    if every <= 0 or epoch < start_epoch:
        return 1.0
    return gamma ** ((epoch - start_epoch) // every)
