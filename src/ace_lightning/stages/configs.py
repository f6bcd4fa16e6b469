"""The typed config of a training stage: one dataclass per conf/stage/<name>.yaml, whose fields are
that yaml's keys (the yaml holds the defaults and documents every knob; tests/test_stage_configs.py
keeps the two equal). A config is built once from the merged stage dict (``registry.stage_config``)
and validated once, with one-line ConfigErrors, before any data is read; the LightningModule takes
it whole. CertifiedTrainingConfig: what the cert, gate and entropy stages share (the eps/kappa
ramp, the training method, the validation policy)."""
from __future__ import annotations

import math
import numbers
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Mapping, Optional, TypeVar

from ace_lightning.config import check_knobs, job_eps, stage_schema, to_dict
from ace_lightning.errors import ConfigError
from ace_lightning.stages.base import check_optimizer, check_val_crown_ibp
from ace_lightning.stages.losses import check_method_knobs
from ace_lightning.stages.schedules import ramp_progress

CLASSIC = ("IBP", "CROWN-IBP")  # bounds over the whole ball; loss fusion and co-training apply

C = TypeVar("C", bound="StageConfig")


def _number(key: str, value: Any, whole: bool) -> Any:
    """A number as given (so error messages quote it as written), a numeric string converted."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"stage.{key} must be {kind}, got {value!r}")
    if whole and not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ConfigError(f"stage.{key} must be a whole number, got {value!r}")
        value = int(value)
    return value


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's type (``Optional[...]``: null allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is Any:
        return value
    if value is None:
        raise ConfigError(f"stage.{key} must be set, got null")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"stage.{key} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        return _number(key, value, whole=hint is int)
    if hint is str:
        return str(value)
    if hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"stage.{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"stage.{key} must be a list, got {value!r}")
        return list(value)
    raise TypeError(f"stage.{key}: no conversion for {hint}")  # pragma: no cover - a new field's type


@dataclass(kw_only=True)
class StageConfig:
    """What every training stage's yaml has: its name, the trainer's epochs and gradient clipping,
    the optimizer, the LR schedule, the L1 weight and mid-epoch checkpoints."""

    stage: ClassVar[str]  # conf/stage/<stage>.yaml

    name: str
    epochs: int
    optimizer: dict
    lr_schedule: Optional[dict]
    l1: float
    grad_clip: Optional[float]
    checkpoint_every_n_steps: Optional[int]

    @classmethod
    def from_dict(cls: type[C], st: Mapping[str, Any], eps: float) -> C:
        """The config of a stage dict (knobs it lacks: the yaml's defaults), validated at the run's
        ``eps``. An unknown knob, a value of the wrong type or out of range: one-line ConfigError."""
        st = dict(to_dict(st) or {})
        check_knobs(cls.stage, st)
        values = {**stage_schema(cls.stage), **st}
        hints = typing.get_type_hints(cls)
        config = cls(**{f.name: _typed(f.name, values[f.name], hints[f.name]) for f in fields(cls)
                        if f.name in values})
        config.validate(float(eps))
        return config

    @classmethod
    def from_job(cls: type[C], cfg: Mapping[str, Any]) -> C:
        """The config of a job's stage node (``cfg.stage``) at the job's eps."""
        return cls.from_dict(to_dict(cfg["stage"]), job_eps(cfg))

    def validate(self, eps: float) -> None:
        """One-line ConfigErrors for values no stage could train with (each stage adds its own)."""
        check_optimizer(self.optimizer)

    def hparams(self, **extra: Any) -> dict[str, Any]:
        """The knobs for the loggers' hparams (not ``name``: Lightning merges these with the data
        module's, whose ``name`` is the dataset's)."""
        return {**{k: v for k, v in asdict(self).items() if k != "name"}, **extra}

    def mixed(self) -> bool:
        """Whether the trainer may run this stage in 16-mixed precision on CUDA."""
        return False

    def selects_last(self) -> bool:
        """Whether the last weights are exported rather than the best checkpoint's."""
        return False


@dataclass(kw_only=True)
class CertifiedTrainingConfig(StageConfig):
    """The knobs of certified training (cert, gate, entropy): L = kappa * natural loss + (1 - kappa)
    * worst-case loss with eps 0 -> eps_factor x eps and kappa 1 -> kappa_end after a natural
    warm-up, the bound method (``method``; the gate's null: the cert-net's), and which bounds
    validation certifies with (``val_crown_ibp``)."""

    method: Optional[str]
    eps_factor: float
    warmup_epochs: float
    ramp_epochs: float
    ramp_shape: str
    kappa_end: float
    val_crown_ibp: Any  # true | false | "after_ramp"
    steps_per_epoch: Optional[int] = None  # config.EXTRA_KNOBS: not in the yamls (their hash)

    def method_knobs(self) -> dict[str, Any]:
        """The training method's own knobs (SABR's lambda, the expressive losses' alpha, the attack)."""
        return {"sabr_lambda": 0.4, "alpha": 0.5, "attack": None}

    def check_method(self) -> str:
        """The canonical training method, its knobs checked."""
        knobs = self.method_knobs()
        return check_method_knobs(self.method or "IBP", knobs["sabr_lambda"], knobs["alpha"], knobs["attack"])

    def check_schedule(self, eps: float) -> None:
        """eps, kappa and the ramp (one-line errors before any data is loaded)."""
        if not 0.0 <= float(self.kappa_end) <= 1.0:
            raise ConfigError(f"kappa_end must be in [0, 1], got {float(self.kappa_end)}")
        if not 0.0 < float(eps) <= 1.0:
            raise ConfigError(f"eps must be in (0, 1] (pixel space, e.g. 2/255 = 0.00784), got {eps}")
        if float(self.eps_factor) <= 0:
            raise ConfigError(f"eps_factor must be positive, got {self.eps_factor}")
        warmup, ramp = float(self.warmup_epochs), float(self.ramp_epochs)
        if warmup < 0 or ramp < 0:
            raise ConfigError("warmup_epochs and ramp_epochs must be >= 0")
        if warmup + ramp > float(self.epochs):
            raise ConfigError(f"eps schedule ends after training ends: warm-up {warmup:g} + ramp {ramp:g} "
                              f"epochs > {self.epochs} epochs (lower the ramp or raise stage.epochs)")
        ramp_progress(0, 0, 1, self.ramp_shape)

    def check_stage_knobs(self, method: str) -> None:
        """The stage's own knobs (``method``: the canonical training method)."""

    def validate(self, eps: float) -> None:
        """The method and its knobs, the ramp, the stage's own knobs, the validation policy and the
        optimizer, in this order; ``method`` becomes the canonical name (null stays null)."""
        method = self.check_method()
        self.check_schedule(eps)
        self.check_stage_knobs(method)
        check_val_crown_ibp(self.val_crown_ibp)
        super().validate(eps)
        if self.method is not None:
            self.method = method


@dataclass(kw_only=True)
class ClassifierTrainingConfig(CertifiedTrainingConfig):
    """Certified training of a classifier (cert, entropy): loss fusion and the PGD validation."""

    loss_fusion: bool
    val_pgd_steps: int

    def check_method(self) -> str:
        method = super().check_method()
        if self.loss_fusion and method not in CLASSIC:
            raise ConfigError(f"loss_fusion bounds the CE over the whole ball: IBP or CROWN-IBP only, not {method}")
        return method
