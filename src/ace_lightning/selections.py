"""The selections, one registry: how pair i's selector g_i is computed at x and bounded over the ball
(every one fires at g_i(x) >= T_i, docs/METHOD.md sections 2-5), which stage's net it reads and
where the certify stage writes its results. The composed model (ace.py), the run folder
(rundir.spec_from_run) and the certify stage look a selection up here instead of switching on it.

- gate: a selection network of its own (the gate stage's), g = its one logit;
- entropy: g = -H(softmax(f_cert)) on the cert-net of the entropy stage (or the cert stage's as is);
- margin: g = the cert-net's top-1 minus top-2 logit gap, minus the predicted class's kappa.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ace_lightning.bounds import output_bounds
from ace_lightning.bounds.entropy import entropy, entropy_gate_bounds
from ace_lightning.bounds.gap import gap, gap_bounds
from ace_lightning.bounds.outward import param_dtype, widen
from ace_lightning.registries import Registry

SELECTIONS: Registry = Registry("selection")
Interval = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (g at x, lb_g, ub_g) over the ball


@SELECTIONS.register("gate")
class GateSelection:
    """A gate network g(x) (one logit), trained by the gate stage."""

    network = True  # a selector network of its own (ACEModel.gates), next to the cert-net
    per_class = False  # per-class thresholds kappa (margin selection's)

    @staticmethod
    def value(model: Any, i: int, x: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
        return model.gates[str(i)](x).squeeze(-1).to(torch.float64)

    @staticmethod
    def bounds(model: Any, i: int, x: torch.Tensor, eps: float, method: str, dtype: Any) -> Interval:
        gate = model.gates[str(i)]
        lb, ub, g = output_bounds(gate, x, eps, method, return_logits=True, dtype=dtype)
        lb, ub = widen(lb.squeeze(-1), ub.squeeze(-1), 1.0 + lb.abs().squeeze(-1) + ub.abs().squeeze(-1),
                       lb.dtype, param_dtype(gate))  # outward: the bound pass and the deployed forward round
        return g.squeeze(-1), lb, ub

    @staticmethod
    def stage(entropy_stage: str) -> str:
        """The stage whose net selects (with a network: the gate; else the cert-net's stage)."""
        return "gate"

    @staticmethod
    def folder(entropy_stage: str) -> str:
        """The certify stage's folder for this selection (one pair)."""
        return "certify"


@SELECTIONS.register("entropy")
class EntropySelection:
    """g = -H(softmax(f_cert(x))): the cert-net selects itself (co-trained by the entropy stage)."""

    network = False
    per_class = False

    @staticmethod
    def value(model: Any, i: int, x: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
        return -entropy(logits)

    @staticmethod
    def bounds(model: Any, i: int, x: torch.Tensor, eps: float, method: str, dtype: Any) -> Interval:
        return entropy_gate_bounds(model.certs[i], x, eps, method, dtype=dtype)

    @staticmethod
    def stage(entropy_stage: str) -> str:
        return entropy_stage

    @staticmethod
    def folder(entropy_stage: str) -> str:
        return "certify_entropy" if entropy_stage == "entropy" else f"certify_entropy_{entropy_stage}"


@SELECTIONS.register("margin")
class MarginSelection:
    """g = the cert-net's logit gap minus the predicted class's kappa (the cert stage's net as is)."""

    network = False
    per_class = True

    @staticmethod
    def value(model: Any, i: int, x: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
        return gap(logits) - model.class_thresholds[i].to(logits.device)[logits.argmax(-1)]

    @staticmethod
    def bounds(model: Any, i: int, x: torch.Tensor, eps: float, method: str, dtype: Any) -> Interval:
        return gap_bounds(model.certs[i], x, eps, method, dtype=dtype)  # the class thresholds enter the rule

    @staticmethod
    def stage(entropy_stage: str) -> str:
        return "cert"

    @staticmethod
    def folder(entropy_stage: str) -> str:
        return "certify_margin"
