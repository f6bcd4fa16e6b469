"""What the audit checks (audit.py): the records' claims at the exported thresholds, the audit's
settings, and the helpers its checks share (audit_bounds.py: reference bounds and MILP;
audit_attacks.py: attacks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ace_lightning import rule
from ace_lightning.ace import ACEModel
from ace_lightning.console import progress
from ace_lightning.errors import ConfigError

LISTED = 100  # entries per list in audit.json (counts are always complete)


@dataclass(frozen=True)
class AuditSettings:
    """The audit's knobs (conf/certify.yaml, ``audit:``; validated in one place)."""

    split: str = "test"
    steps: int = 40
    restarts: int = 3
    step_size: float = 0.25
    decay_at: tuple = (0.5, 0.75)
    composed: bool = True
    batch_size: int = 1024
    seed: int = 0
    tol: float = 1e-4
    reference: bool = True
    reference_tol: float = 1e-9
    reference_batch_size: int = 256
    reference_max_entries: int = 50_000_000
    autoattack: str = "auto"
    autoattack_attacks: tuple = ("apgd-ce", "apgd-t")
    milp_sample: int = 10
    milp_time_limit_s: float = 30.0
    milp_max_unstable: int = 400
    stage: Optional[str] = None
    data_dir: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"audit: {what}")
        need(self.split in ("val", "test"), f"split must be val or test, got {self.split!r}")
        need(int(self.steps) >= 1 and int(self.restarts) >= 1,
             f"steps and restarts must be >= 1, got {self.steps} and {self.restarts}")
        need(float(self.step_size) > 0, f"step_size must be > 0 (relative to eps), got {self.step_size}")
        need(all(0 < float(f) < 1 for f in self.decay_at), f"decay_at: fractions in (0, 1), got {list(self.decay_at)}")
        need(int(self.batch_size) >= 1 and int(self.reference_batch_size) >= 1, "batch sizes must be >= 1")
        need(float(self.tol) >= 0 and float(self.reference_tol) >= 0, "tol and reference_tol must be >= 0")
        need(int(self.reference_max_entries) >= 1, "reference_max_entries must be >= 1")
        need(self.autoattack in ("auto", "off"), f"autoattack must be auto or off, got {self.autoattack!r}")
        need(int(self.milp_sample) >= 0, f"milp_sample must be >= 0 (0: no MILP), got {self.milp_sample}")
        need(float(self.milp_time_limit_s) > 0 and int(self.milp_max_unstable) >= 0,
             "milp_time_limit_s must be > 0 and milp_max_unstable >= 0")

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]]) -> "AuditSettings":
        kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(cfg or {}).items()
              if k in cls.__dataclass_fields__ and v is not None}
        unknown = sorted(set(dict(cfg or {})) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"audit: unknown knob(s) {', '.join(unknown)}; known: {', '.join(cls.__dataclass_fields__)}")
        if isinstance(kw.get("autoattack"), bool):
            kw["autoattack"] = "auto" if kw["autoattack"] else "off"
        return cls(**kw)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class Claims:
    """What the records claim at the exported thresholds, as arrays over the split's inputs:
    g/lb/ub/cert_ok/cert_margin [n, N], core_ok [N], certified [N] and, per certified input, which
    branches may answer somewhere on the ball (reachable [N, n + 1])."""

    index: np.ndarray
    thresholds: np.ndarray
    g: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    cert_ok: np.ndarray
    cert_correct: np.ndarray
    cert_margin: np.ndarray
    cert_method: list
    gate_method: list
    core_ok: np.ndarray
    kappa: Optional[np.ndarray] = None  # margin selection's class thresholds [n, K] (NaN rows: other pairs)
    cls: Optional[np.ndarray] = None    # the cert-net's class at x [n, N] (what kappa is picked by)
    certified: np.ndarray = field(init=False)
    reachable: np.ndarray = field(init=False)
    t_lb: np.ndarray = field(init=False)  # per pair and input: "surely fires" iff lb >= t_lb
    t_ub: np.ndarray = field(init=False)  # ... "may fire" iff ub >= t_ub

    def __post_init__(self) -> None:
        self.certified = self.rule(self.g, self.lb, self.ub, self.cert_ok, self.core_ok)
        self.reachable = rule.reachable_at(self.g, self.lb, self.ub, self.thresholds, self.kappa, self.cls)
        _, self.t_lb, self.t_ub = rule.per_input_thresholds(self.thresholds, len(self.index), self.kappa, self.cls,
                                                             self.lb)

    def rule(self, g, lb, ub, cert_ok, core_ok) -> np.ndarray:
        """The certification rule (4.3) at the exported thresholds on other bounds."""
        return rule.certified_at(g, lb, ub, self.thresholds, cert_ok, core_ok, self.kappa, self.cls)

    def reachable_with(self, g, lb, ub) -> np.ndarray:
        return rule.reachable_at(g, lb, ub, self.thresholds, self.kappa, self.cls)

    @property
    def n_pairs(self) -> int:
        return self.g.shape[0]

    def fires(self, k: int) -> np.ndarray:
        """Certified inputs whose certificate uses "gate k fires on the whole ball" (lb_g >= T)."""
        return self.certified & self.reachable[:, k] & rule.decided(self.g[k], self.lb[k], self.ub[k]) \
            & (self.lb[k] >= self.t_lb[k])

    def silent(self, k: int) -> np.ndarray:
        """... uses "gate k stays below T on the whole ball" (ub_g < T)."""
        return self.certified & self.reachable[:, k] & rule.decided(self.g[k], self.lb[k], self.ub[k]) \
            & (self.ub[k] < self.t_ub[k])


def read_claims(records, thresholds: np.ndarray, kappa: Optional[np.ndarray] = None) -> Claims:
    """The claims of records.Records at ``thresholds`` (records without cert_margin claim a margin
    above 0 for every certified input: the least a certificate says)."""
    col = records.pair_column
    pairs = list(records.pairs)
    text = lambda name: [np.asarray(records[col(name, i)]).astype(str) if col(name, i) in records  # noqa: E731
                         else np.full(len(records), "none") for i in pairs]
    margin = np.stack([np.asarray(records[col("cert_margin", i)], dtype=np.float64) if col("cert_margin", i) in records
                       else np.zeros(len(records)) for i in pairs])
    cls = None
    if kappa is not None:
        cls = np.stack([np.asarray(records[col("cert_pred", i)]).astype(np.int64) for i in pairs])
    return Claims(np.asarray(records["index"]).astype(np.int64), thresholds, records.g, records.lb_g, records.ub_g,
                  records.cert_ok, records.cert_correct, margin, text("cert_method"), text("gate_method"),
                  records.core_ok, kappa, cls)


def class_thresholds(model: ACEModel) -> Optional[np.ndarray]:
    """Margin selection's per-class thresholds kappa [n, K] of the exported model, None without."""
    kappa = getattr(model, "class_thresholds", None)
    if kappa is None or bool(torch.isnan(kappa).all()):
        return None
    return kappa.double().numpy()


def slack(bound: np.ndarray, tol: float) -> np.ndarray:
    return tol * (1.0 + np.abs(bound))


def listed(entries: list) -> list:
    return entries[:LISTED]


def batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def announced(items: Sequence, show: bool, desc: str) -> Sequence:
    """console.progress for work that exists (an empty loop is not announced)."""
    return progress(items, show, desc=desc) if len(items) else items
