"""Selection-network stage (docs/METHOD.md sections 2a and 6): the gate g, the cert-net's
architecture with one output logit, initialised from the trained cert-net except the last layer,
learns to fire (g >= T) exactly where the cert-net is certified correct.

Loss: binary cross-entropy with logits on the *worst-case* gate logit over the eps-ball (the lower
bound for label-1 inputs, the upper bound for label-0 ones), bounded with the cert-net's method
family (IBP or CROWN-IBP, beta 1 -> 0 over the ramp like the cert stage):
    L = kappa * BCE(g(x), l) + (1 - kappa) * BCE(worst(x), l),
kappa 1 -> kappa_end (0.5 like the reference code; 0: worst-case only) and eps 0 -> eps_factor x
eps over the ramp, counted in steps (resume-exact). ``worst_case_negatives: false`` trains label-0
inputs on g(x) instead of ub_g: certified accuracy never needs ub_g < T (the core is rarely
certified), natural accuracy only needs g(x) < T: the worst case on label-0 inputs asks the gate for
more than the composition uses. The positive class is weighted by the sliding schedule
c(e) = s(e)(c0 - 1) + 1, s(e) = 1 - clip((e - 0.1N)/(0.7N), 0, sigma), c0 = (1 - p)/p (p: the
fraction of label 1), e the (fractional) epoch of N; ``pos_weight: balanced`` keeps c0 (with p far from 1/2 the unweighted end of
the slide moves the operating point at T towards one class).
Core and cert-net are frozen (neither is in this module). ``train_last_k`` trains only the last k
Linear layers of the gate; ``init_from_cert: false`` starts the gate (of any architecture,
``gate_net``) from scratch instead of from the cert-net.

Validation/test at the target eps and threshold T (``stage.threshold``, default 0):
- gate_acc: [g(x) >= T] == label, on labelled inputs;
- certified_selection_rate: lb_g >= T on label-1 inputs (those the composition can certify via
  the cert-net: the quantity that turns into certified accuracy);
- false_selection_rate: g(x) >= T on label-0 inputs (they lose the core's accuracy);
- certified_rejection_rate: ub_g < T on label-0 inputs; selection_rate: g(x) >= T on all;
- dead_units: fraction of the gate's ReLUs never active on a batch; collapsed_rate: inputs whose
  last hidden layer is all zero, so g(x) is the head's bias whatever the input (a gate whose output
  collapses to one constant on many inputs has lost those units);
- selection_score = certified_selection_rate - false_selection_rate: the best checkpoint's key
  metric (both rates matter equally: one is certified accuracy gained, the other natural accuracy
  lost to the weaker cert-net).

The runner (stages/gate_run.py: the cert-net, a cascade's earlier gates, the labels) refuses bad
input in one line before training. An empty label class is not an error: with no
certified training input the gate is made to select nothing (head weights 0, bias -1e4; exported
and marked ``gate_status: selects_nothing`` in the manifest), with no uncertified one to select
everything; a warning says so and no optimisation step is taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ace_lightning.bounds import output_bounds
from ace_lightning.errors import ConfigError
from ace_lightning.nets import final_linear_name
from ace_lightning.stages.certified import CertifiedStageModule
from ace_lightning.stages.configs import CLASSIC, CertifiedTrainingConfig
from ace_lightning.stages.gate_labels import check_negatives, label_methods
from ace_lightning.stages.losses import build_loss

POS_WEIGHT_MODES = ("sliding", "balanced", "none")
GATE_CONSTANT = 1.0e4  # |g| of a gate that selects nothing / everything (far from any threshold)
COLLAPSE_WARNING = 0.1  # warn when more test inputs than this reach the head with all units off


# -- pieces with one job each (unit-tested) ---------------------------------------------------------

def balanced_pos_weight(p: float) -> float:
    """c0 = (1 - p) / p: weights both classes equally in the BCE (p: fraction of label 1)."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"the label-1 fraction must be in (0, 1) for class balancing, got {p}")
    return (1.0 - p) / p


def pos_weight_schedule(epoch: float, total_epochs: float, c0: float, sigma: float = 1.0) -> float:
    """c(e) = s(e)(c0 - 1) + 1 with s(e) = 1 - clip((e - 0.1N)/(0.7N), 0, sigma) (docs/METHOD.md
    section 6): class-balanced until 0.1N, then sliding towards unweighted (reached at 0.8N when
    sigma = 1; sigma < 1 stops the slide part-way)."""
    n = float(total_epochs)
    if n <= 0:
        return float(c0)
    s = 1.0 - min(max((float(epoch) - 0.1 * n) / (0.7 * n), 0.0), float(sigma))
    return s * (float(c0) - 1.0) + 1.0


def freeze_all_but_last_linear(net: nn.Module, k: Optional[int]) -> list[str]:
    """requires_grad only on the last k nn.Linear layers (k None: everything trains). Returns the
    names of the trainable parameters."""
    if k is None:
        for p in net.parameters():
            p.requires_grad_(True)
        return [n for n, _ in net.named_parameters()]
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not 1 <= int(k) <= len(linears):
        raise ConfigError(f"train_last_k must be between 1 and {len(linears)} (the gate's Linear layers), got {k}")
    for p in net.parameters():
        p.requires_grad_(False)
    names = []
    for prefix, m in linears[-int(k):]:
        for n, p in m.named_parameters():
            p.requires_grad_(True)
            names.append(f"{prefix}.{n}")
    return names


def set_constant_output(net: nn.Module, value: float) -> None:
    """g(x) = value for every x (head weights 0, bias = value): a gate that selects nothing (value
    << T) or everything (value >> T), with exact bounds [value, value]."""
    head = net.get_submodule(final_linear_name(net))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(float(value))


def relu_activity(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(net(x), fraction of ReLU units never active on the batch, per input: last hidden ReLU
    layer all zero, i.e. the output is the head's bias)."""
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
             for m in net.modules() if isinstance(m, nn.ReLU)]
    try:
        out = net(x)
    finally:
        for h in hooks:
            h.remove()
    if not acts:
        return out, 0.0, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    ever = torch.cat([(a > 0).flatten(1).any(dim=0) for a in acts])
    collapsed = ~(acts[-1].flatten(1) > 0).any(dim=1)
    return out, 1.0 - ever.float().mean().item(), collapsed


# -- the LightningModule ------------------------------------------------------------------------------

@dataclass(kw_only=True)
class GateConfig(CertifiedTrainingConfig):
    """conf/stage/gate.yaml (every knob documented there). ``method``, ``sabr_lambda`` and ``alpha``
    null: the cert-net's (resolved from its manifest by the runner, stages/gate_run.py)."""

    stage = "gate"

    cascade: Optional[list]
    cascade_thresholds: Optional[list]
    gate_net: Optional[dict]
    init_from_cert: bool
    sabr_lambda: Optional[float]
    alpha: Optional[float]
    attack: Optional[dict]
    label_method: Any  # a bound method, a list of them (cheap to tight) or null
    labels_file: Optional[str]
    negatives: Optional[str]
    threshold: float
    pos_weight: str
    pos_weight_sigma: float
    worst_case_negatives: bool
    train_last_k: Optional[int]

    def method_knobs(self) -> dict[str, Any]:
        return {"sabr_lambda": self.sabr_lambda or 0.4, "alpha": self.alpha or 0.5, "attack": self.attack}

    def check_stage_knobs(self, method: str) -> None:
        if self.pos_weight not in POS_WEIGHT_MODES:
            raise ConfigError(f"pos_weight must be one of {', '.join(POS_WEIGHT_MODES)}, got {self.pos_weight!r}")
        if not 0.0 <= float(self.pos_weight_sigma) <= 1.0:
            raise ConfigError(f"pos_weight_sigma must be in [0, 1], got {self.pos_weight_sigma}")
        if self.train_last_k is not None and int(self.train_last_k) < 1:
            raise ConfigError(f"train_last_k must be null (train everything) or >= 1, got {self.train_last_k}")
        if not math.isfinite(float(self.threshold)):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
        check_negatives(self.negatives)
        if self.label_method:
            label_methods(self.label_method)
        if self.cascade_thresholds is not None and len(self.cascade_thresholds) != len(self.cascade or ["cert"]) - 1:
            raise ConfigError(f"stage.cascade_thresholds needs one threshold per earlier pair "
                              f"({len(self.cascade or ['cert']) - 1}), got {len(self.cascade_thresholds)}")


class GateStage(CertifiedStageModule):
    metric_names = ("gate_acc", "certified_selection_rate", "false_selection_rate", "selection_rate",
                    "certified_rejection_rate", "dead_units", "collapsed_rate")

    def __init__(self, net: nn.Module, config: GateConfig, eps: float) -> None:
        method = config.method or "IBP"
        super().__init__(net, config, eps, method)
        self.epochs = int(config.epochs)
        # the bound the metrics use: the method's own for IBP / CROWN-IBP, IBP for the others
        self.bound_method = method if method in CLASSIC else "IBP"
        knobs = config.method_knobs()
        self.loss_fn = build_loss(method, sabr_lambda=knobs["sabr_lambda"], alpha=knobs["alpha"],
                                  attack=dict(knobs["attack"] or {}))
        self.label_fraction, self.threshold = 0.5, float(config.threshold)
        self.pos_weight_mode, self.pos_weight_sigma = config.pos_weight, float(config.pos_weight_sigma)
        self.worst_case_negatives = bool(config.worst_case_negatives)
        self.train_last_k = config.train_last_k
        self.constant_output: Optional[float] = None
        self.label_balance: dict = {}
        self._set_constant(None)

    def _set_constant(self, constant_output: Optional[float]) -> None:
        """A gate whose training set has one class only outputs a constant: no step is taken."""
        self.constant_output = None if constant_output is None else float(constant_output)
        if self.constant_output is not None:
            set_constant_output(self.net, self.constant_output)
            freeze_all_but_last_linear(self.net, 1)
            self.optimizer_cfg["lr"] = 0.0  # the zero steps below stay zero whatever weight decay says
        else:
            freeze_all_but_last_linear(self.net, self.train_last_k)
        # BatchNorm layers with frozen parameters keep their running statistics too (eval mode)
        self._frozen_norms = [m for m in self.net.modules()
                              if isinstance(m, nn.modules.batchnorm._BatchNorm)
                              and not any(p.requires_grad for p in m.parameters())]

    def use_labels(self, balance: Mapping[str, Any], cert_stage: str = "cert") -> str:
        """Adopt the label balance of the gate's data (GateLabelsDataModule): the positive
        fraction the class weighting needs, a constant output when the training set has one
        class; returns the gate status for the manifest."""
        train = balance["train"]
        self.label_balance = {s: b.as_dict() for s, b in balance.items()}
        if train.positives == 0:
            why = ("every training input is taken by an earlier cascade pair" if train.labelled == 0 else
                   f"the cert-net of stage '{cert_stage}' certifies none of the {train.labelled} training inputs "
                   f"at eps={self.eps:g}")
            rank_zero_warn(f"gate: {why}; the gate will select nothing (g = -{GATE_CONSTANT:g})")
            self.label_fraction = 0.5
            self._set_constant(-GATE_CONSTANT)
            return "selects_nothing"
        if train.negatives == 0:
            rank_zero_warn(f"gate: the cert-net of stage '{cert_stage}' certifies all {train.labelled} training "
                          f"inputs at eps={self.eps:g}; the gate will select everything (g = +{GATE_CONSTANT:g})")
            self.label_fraction = 0.5
            self._set_constant(GATE_CONSTANT)
            return "selects_everything"
        self.label_fraction = train.fraction
        return "trained"

    def setup(self, stage: str) -> None:
        """Labels arrive with the datamodule (computed once, before this runs on any rank)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        balance = getattr(dm, "balance", None)
        if balance is not None and not self.label_balance:
            self.gate_status = self.use_labels(balance, getattr(dm, "cert_stage", "cert"))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for m in self._frozen_norms:
                m.eval()
        return self

    # -- schedules ---------------------------------------------------------------------------------
    def pos_weight_at(self, step: int) -> float:
        if self.pos_weight_mode == "none" or not 0.0 < self.label_fraction < 1.0:
            return 1.0
        c0 = balanced_pos_weight(self.label_fraction)
        if self.pos_weight_mode == "balanced":
            return c0
        return pos_weight_schedule(step / self.per_epoch, self.epochs, c0, self.pos_weight_sigma)

    # -- training ----------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """The label balance goes to every logger once (metrics.csv, wandb)."""
        values = {f"labels/{split}_{k}": float(v) for split, b in self.label_balance.items()
                  for k, v in b.items() if v is not None}
        if values and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)

    def gate_loss(self, x: torch.Tensor, label: torch.Tensor, eps: float, kappa: float,
                  beta: Optional[float], pos_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, robust term, g(x)) for labels in {0, 1}: kappa * BCE(g(x)) + (1 - kappa) *
        BCE(worst case), the worst case being lb_g for label 1 and ub_g (or g(x) when not
        ``worst_case_negatives``) for label 0, over the ball of radius eps."""
        target = label.to(x.dtype)
        pw = torch.tensor(pos_weight, dtype=x.dtype, device=x.device)
        bce = nn.functional.binary_cross_entropy_with_logits
        if eps <= 0:
            g = self.net(x).view(-1)
            return bce(g, target, pos_weight=pw), torch.zeros((), device=x.device), g
        if self.method not in CLASSIC:
            return self.method_gate_loss(x, label, eps, kappa, pos_weight)
        lb, ub, g = output_bounds(self.net, x, eps, self.method, beta=beta, return_logits=True)
        g = g.view(-1)
        neg = ub.view(-1) if self.worst_case_negatives else g
        robust = bce(torch.where(label == 1, lb.view(-1), neg), target, pos_weight=pw)
        return kappa * bce(g, target, pos_weight=pw) + (1.0 - kappa) * robust, robust, g

    def method_gate_loss(self, x: torch.Tensor, label: torch.Tensor, eps: float, kappa: float,
                         pos_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate loss of SABR / MTL-IBP / CC-IBP / Exp-IBP: the spec is the signed gate logit
        s = +g (label 1) or -g (label 0), the per-input loss of its lower bound the weighted BCE
        w softplus(-s); label-0 inputs without worst_case_negatives stay on g(x)."""
        robust_rows = (label == 1) | torch.tensor(self.worst_case_negatives, device=x.device)
        per = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        idx = robust_rows.nonzero().flatten()
        if idx.numel():
            sign = (2 * label[idx] - 1).to(x.dtype)
            weight = torch.where(label[idx] == 1, torch.full_like(sign, pos_weight), torch.ones_like(sign))
            out = self.loss_fn(self.net, x[idx], sign.view(-1, 1, 1), eps,
                               lambda lb: weight * nn.functional.softplus(-lb[:, 0]))
            per = per.index_put((idx,), out.per_input)
        g = self.net(x).view(-1)  # plain forwards after the bound pass
        pw = torch.tensor(pos_weight, dtype=x.dtype, device=x.device)
        clean = nn.functional.binary_cross_entropy_with_logits(g, label.to(x.dtype), pos_weight=pw, reduction="none")
        robust = torch.where(robust_rows, per, clean).mean()
        return kappa * clean.mean() + (1.0 - kappa) * robust, robust, g

    def training_step(self, batch, batch_idx):
        x, _, label = batch
        if self.constant_output is not None:
            # an empty label class: the gate is a constant, nothing to learn. A zero loss (not None:
            # DDP cannot skip a step) at learning rate 0 leaves the weights unchanged; no forward pass,
            # so BatchNorm statistics stay as they are.
            return 0.0 * sum(p.sum() for p in self.net.parameters())
        keep = label >= 0
        if not bool(keep.all()):  # inputs taken by earlier cascade pairs (normally dropped already)
            x, label = x[keep], label[keep]
        step = self.global_step
        eps_t, kappa, beta = self.schedule_at(step)
        pw = self.pos_weight_at(step)
        loss, robust, g = self.gate_loss(x, label, eps_t, kappa, beta, pw)
        loss = self.with_l1(loss)
        acc = ((g >= self.threshold) == (label == 1)).float().mean()
        self.log_certified_step({"train/loss": loss, "train/robust_loss": robust, "train/acc": acc},
                                eps_t, kappa, beta, **{"train/pos_weight": pw})
        return loss

    # -- evaluation at the target eps --------------------------------------------------------------
    def gate_bounds(self, x: torch.Tensor, g: Optional[torch.Tensor] = None,
                    label: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(lb_g, ub_g) at the target eps: the stage's method, tightened by CROWN-IBP when
        ``val_crown_ibp`` (the max/min of two sound bounds is sound). With ``g`` (the gate at x)
        and ``label`` in validation, CROWN-IBP bounds only the inputs where it can change a metric:
        label 1 selected at x but not certifiably, label 0 rejected at x but not certifiably."""
        lb, ub = output_bounds(self.net, x, self.eps, self.bound_method)
        lb, ub = lb.view(-1), ub.view(-1)
        if self.bound_method != "CROWN-IBP" and self.eval_crown_ibp():
            if g is not None and label is not None:
                t = self.threshold
                rows, n = self.rows_to_tighten(((label == 1) & (g >= t) & (lb < t))
                                               | ((label == 0) & (g < t) & (ub >= t)))
            else:
                rows, n = torch.arange(x.shape[0], device=x.device), x.shape[0]
            if n:
                lb2, ub2 = output_bounds(self.net, x[rows], self.eps, "CROWN-IBP")
                real = rows[:n]
                lb, ub = lb.clone(), ub.clone()
                lb[real] = torch.maximum(lb[real], lb2.view(-1)[:n])
                ub[real] = torch.minimum(ub[real], ub2.view(-1)[:n])
        return lb, ub

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            g, dead, collapsed = relu_activity(self.net, x)
            lb, ub = self.gate_bounds(x, g.view(-1), label)
        g, t = g.view(-1), self.threshold
        pos, neg, labelled = label == 1, label == 0, label >= 0
        selected = g >= t
        out = {"selection_rate": selected[labelled], "gate_acc": (selected == pos)[labelled],
               "certified_selection_rate": (lb >= t)[pos], "false_selection_rate": selected[neg],
               "certified_rejection_rate": (ub < t)[neg], "collapsed_rate": collapsed[labelled],
               "dead_units": torch.tensor([dead], device=x.device)}
        return {k: v for k, v in out.items() if v.numel()}

    def _rate(self, split: str, name: str) -> float:
        metric = self.metrics[f"{split}_{name}"]
        return float(metric.compute()) if metric.update_called else 0.0

    def _log_score(self, split: str) -> None:
        score = self._rate(split, "certified_selection_rate") - self._rate(split, "false_selection_rate")
        self.log(f"{split}/selection_score", score, prog_bar=split == "val")
        collapsed = self._rate(split, "collapsed_rate")
        if split == "test" and self.constant_output is None and collapsed > COLLAPSE_WARNING:
            rank_zero_warn(f"gate: on {100 * collapsed:.0f}% of the test inputs every unit of the last hidden "
                          f"layer is off, so g(x) is the same constant for all of them (dead units); try a "
                          f"lower lr, a longer eps ramp or train_last_k")

    def on_validation_epoch_end(self) -> None:
        self._log_score("val")

    def on_test_epoch_end(self) -> None:
        self._log_score("test")
