"""The composed ACE model (docs/METHOD.md sections 2-4): f_ACE(x) = f_cert(x) if g(x) >= T else
f_core(x), generalised to cascades of (cert-net, selector) pairs tried in order.

Conditional execution: each branch only runs on the inputs still unanswered, and the core only on
the inputs every gate rejected (the reference code ran everything on every input).
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ace_lightning import rule
from ace_lightning.bounds import DTYPES, METHODS, margin_lower_bounds, normalize_method
from ace_lightning.bounds.gap import gap
from ace_lightning.bounds.ladder import NO_METHOD, gate_interval, margin_ladder, refine_gate
from ace_lightning.bounds.methods import alpha_crown_options
from ace_lightning.bounds.precision import net_in_dtype, precise
from ace_lightning.errors import ConfigError, InputNotFoundError, SoundnessError, StageInputError
from ace_lightning.records import method_codes, pair_suffix, pair_suffixes
from ace_lightning.routing import composed_output, first_firing, selects
from ace_lightning.selections import SELECTIONS

FORMAT = "ace-lightning/ace-model/1"


@dataclass(frozen=True)
class CertifySettings:
    """How the composed model is certified (conf/stage/certify.yaml; validated in one place).

    methods: the cert-net's bound methods from cheap to tight; each input stops at the first that
    certifies it. gate_methods: the selector's interval on every input (intersection of them).
    refine_methods: tighter methods for inputs whose gate interval straddles a threshold of
    interest. refute_steps: PGD steps that spare the tight methods inputs with a counterexample
    (0: none). time_budget_s: seconds per input for the tighter methods (None: no limit; with one,
    records can depend on the machine's speed: alpha-CROWN that does not fit is skipped). dtype: float32 or
    float64 for the whole pass; recheck_tol: inputs within it of a decision are re-checked in
    float64, which decides (it may withdraw or add a certificate; 0: off). core_method: also try to certify the core (rarely possible).
    alpha_crown_iterations, alpha_crown_lr: alpha-CROWN's slope optimisation."""

    methods: tuple[str, ...] = ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN")
    gate_methods: tuple[str, ...] = ("IBP", "CROWN-IBP")
    refine_methods: tuple[str, ...] = ("CROWN", "alpha-CROWN")
    refute_steps: int = 10
    time_budget_s: Optional[float] = 2.0
    dtype: str = "float32"
    recheck_tol: float = 1.0e-3  # far above float32's error on a bound (README, "Precision", has the measured one)
    core_method: Optional[str] = None
    alpha_crown_iterations: int = 20
    alpha_crown_lr: float = 0.5

    def __post_init__(self) -> None:
        def canon(methods, what, allow_empty=False):
            if isinstance(methods, str):
                methods = [methods]
            out = tuple(normalize_method(m) for m in (methods or ()))
            if not out and not allow_empty:
                raise ConfigError(f"certify: {what} needs at least one bound method ({', '.join(METHODS)})")
            return out

        object.__setattr__(self, "methods", canon(self.methods, "methods"))
        object.__setattr__(self, "gate_methods", canon(self.gate_methods, "gate_methods"))
        object.__setattr__(self, "refine_methods", canon(self.refine_methods, "refine_methods", True))
        if self.core_method:
            object.__setattr__(self, "core_method", normalize_method(self.core_method))
        if self.dtype not in DTYPES:
            raise ConfigError(f"certify: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        budget = self.time_budget_s
        if budget is not None and not (float(budget) > 0 and math.isfinite(float(budget))):
            raise ConfigError(f"certify: time_budget_s must be a positive number of seconds per input "
                             f"(or null: no limit), got {budget}")
        if not float(self.recheck_tol) >= 0:
            raise ConfigError(f"certify: recheck_tol must be >= 0 (0: no float64 re-check), got {self.recheck_tol}")
        if int(self.alpha_crown_iterations) < 1 or not float(self.alpha_crown_lr) > 0:
            raise ConfigError(f"certify: alpha_crown_iterations must be >= 1 and alpha_crown_lr > 0, got "
                              f"{self.alpha_crown_iterations} and {self.alpha_crown_lr}")
        if int(self.refute_steps) < 0:
            raise ConfigError(f"certify: refute_steps must be >= 0, got {self.refute_steps}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "CertifySettings":
        """From a certify stage config (unknown keys ignored: the stage has others)."""
        nullable = ("time_budget_s", "core_method")  # null is a value; elsewhere it means the default
        kw = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(cfg).items()
              if k in cls.__dataclass_fields__ and (v is not None or k in nullable)}
        return cls(**kw)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def composed_certified(cert_ok: Any, core_ok: Any, lb_g: Any, ub_g: Any, thresholds: Any,
                       g: Any = None, kappa: Any = None, cls: Any = None) -> torch.Tensor:
    """The certification rule of docs/METHOD.md section 4.3 (ace_lightning.rule) for a cascade of
    n pairs: certified iff every branch that may answer somewhere on the ball is certified.

    cert_ok, lb_g, ub_g, g: [B, n]; core_ok: [B]; thresholds: [n] (tensors, arrays or lists).
    An interval that is not finite, inverted, or (given g, the selector at x) does not contain
    g is undecided: its selector may fire and may not; a NaN anywhere is never certified. One
    pair with a decided interval: lb_g >= T -> cert_ok; ub_g < T -> core_ok; else both.
    ``kappa`` [n, K] (NaN rows: not margin selection) and ``cls`` [B, n] (the cert-nets' classes at
    x): margin selection's class thresholds (rule.per_input_thresholds)."""
    def arr(v, dtype):
        v = v.detach().cpu().numpy() if torch.is_tensor(v) else v
        return np.asarray(v, dtype=dtype)
    lb, ub = arr(lb_g, np.float64), arr(ub_g, np.float64)
    lb, ub = np.atleast_2d(lb.T if lb.ndim == 2 else lb), np.atleast_2d(ub.T if ub.ndim == 2 else ub)
    value = lb if g is None else np.atleast_2d(arr(g, np.float64).T)
    ok = arr(cert_ok, bool)
    ok = np.atleast_2d(ok.T if ok.ndim == 2 else ok)
    if kappa is not None:
        kappa = np.atleast_2d(arr(kappa, np.float64))
        cls = np.atleast_2d(arr(cls, np.int64).T)
    out = rule.certified_at(value, lb, ub, arr(thresholds, np.float64).ravel(), ok, arr(core_ok, bool).ravel(),
                            kappa, cls)
    device = lb_g.device if torch.is_tensor(lb_g) else None
    return torch.as_tensor(out, device=device)


class ACEModel(nn.Module):
    """Core + n (cert-net, selector) pairs + thresholds. A selector is a gate network (one logit),
    entropy selection (g = -H(softmax(f_cert))) or margin selection (g = the cert-net's top-1
    minus top-2 logit gap, fired per predicted class c at gap >= kappa_c + T)."""

    def __init__(self, core: nn.Module, certs: Sequence[nn.Module], gates: Sequence[Optional[nn.Module]],
                 thresholds: Sequence[float], spec: Optional[Mapping[str, Any]] = None,
                 selections: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if not (len(certs) == len(gates) == len(thresholds)) or not certs:
            raise ConfigError("ACEModel needs one selector (gate or None = entropy) and one threshold "
                             f"per cert-net: got {len(certs)} cert-nets, {len(gates)} selectors, "
                             f"{len(thresholds)} thresholds")
        self.core = core
        self.certs = nn.ModuleList(certs)
        self.gates = nn.ModuleDict({str(i): g for i, g in enumerate(gates) if g is not None})
        names = list(selections) if selections is not None else ["gate" if g is not None else "entropy" for g in gates]
        for i, (sel, g) in enumerate(zip(names, gates)):
            if sel not in SELECTIONS or SELECTIONS.get(sel).network != (g is not None):
                raise ConfigError(f"pair {i + 1}: selection {sel!r} with {'a' if g is not None else 'no'} gate "
                                 f"network (known: {', '.join(SELECTIONS)}; only 'gate' has a network)")
        self.selection = [SELECTIONS.canonical(sel) for sel in names]
        # float64: the exported T is exactly the swept one (records are compared in float64)
        self.register_buffer("thresholds", torch.as_tensor(list(thresholds), dtype=torch.float64))
        # margin selection's class thresholds kappa [n, K] (0: one T for every class; NaN: not margin)
        kappa = torch.full((len(certs), _num_classes(certs[0], spec)), math.nan, dtype=torch.float64)
        for i, sel in enumerate(self.selection):
            if SELECTIONS.get(sel).per_class:
                kappa[i] = 0.0
        self.register_buffer("class_thresholds", kappa)
        self.spec = dict(spec or {})

    @property
    def num_branches(self) -> int:
        return len(self.certs)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        if len(thresholds) != self.num_branches:
            raise ConfigError(f"need {self.num_branches} threshold(s), got {len(thresholds)}")
        self.thresholds.copy_(torch.as_tensor(list(thresholds), dtype=torch.float64))

    def selector(self, i: int) -> Any:
        """Pair i's selection (selections.SELECTIONS): whether it has a network, per-class thresholds."""
        return SELECTIONS.get(self.selection[i])

    def set_class_thresholds(self, i: int, kappa: Sequence[float]) -> None:
        """Margin selection's per-class thresholds of pair i (fires at gap >= kappa_c + T_i)."""
        if not self.selector(i).per_class:
            raise ConfigError(f"pair {i + 1} uses {self.selection[i]} selection: class thresholds are for margin")
        if len(kappa) != self.class_thresholds.shape[1]:
            raise ConfigError(f"need {self.class_thresholds.shape[1]} class thresholds, got {len(kappa)}")
        self.class_thresholds[i] = torch.as_tensor(list(kappa), dtype=torch.float64)

    def gate_value(self, i: int, x: torch.Tensor, cert_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """g_i(x), [B], in float64 (the thresholds' dtype: a float32 threshold would round the
        swept T; the entropy is computed in float64 anyway). Margin selection: the gap minus the
        predicted class's kappa, so that every selector fires at g >= T_i."""
        selection = self.selector(i)
        if not selection.network and cert_logits is None:
            cert_logits = self.certs[i](x)
        return selection.value(self, i, x, cert_logits)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, K], branch [B]) with conditional execution; branch n means the core."""
        n = self.num_branches
        branch = torch.full((x.shape[0],), n, dtype=torch.long, device=x.device)
        out: Optional[torch.Tensor] = None
        remaining = torch.arange(x.shape[0], device=x.device)
        for i in range(n):
            if remaining.numel() == 0:
                break
            xi = x[remaining]
            cert_logits = None if self.selector(i).network else self.certs[i](xi)
            fire = selects(self.gate_value(i, xi, cert_logits), self.thresholds[i])
            if fire.any():
                answered = cert_logits[fire] if cert_logits is not None else self.certs[i](xi[fire])
                out = self._scatter(out, remaining[fire], answered, x.shape[0])
                branch[remaining[fire]] = i
            remaining = remaining[~fire]
        if remaining.numel():
            out = self._scatter(out, remaining, self.core(x[remaining]), x.shape[0])
        assert out is not None
        return out, branch

    @staticmethod
    def _scatter(out: Optional[torch.Tensor], idx: torch.Tensor, values: torch.Tensor, batch: int) -> torch.Tensor:
        if out is None:
            out = values.new_zeros((batch, values.shape[-1]))
        out[idx] = values
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x)[0]

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Reference semantics without conditional execution (every net on every input)."""
        outputs = [cert(x) for cert in self.certs]
        gates = torch.stack([self.gate_value(i, x, outputs[i]) for i in range(self.num_branches)], dim=1)
        return composed_output(outputs + [self.core(x)], first_firing(gates, self.thresholds))

    def selector_bounds(self, i: int, x: torch.Tensor, eps: float, method: str = "IBP", dtype=None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g, lb_g, ub_g) of selector i over the ball (full precision, float32 or ``dtype``)."""
        return self.selector(i).bounds(self, i, x, eps, method, dtype)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, eps: Optional[float] = None,
                settings: Optional[CertifySettings] = None) -> dict:
        """labels, the branch that answered (n = core) and, given eps, whether the answer is
        certified: the predicted label provably stays the same on the whole ball (the composed rule
        with y = the predicted label; the core counts as uncertified unless settings.core_method
        certifies it). Certification as in the certify stage: cheap to tight, the gate refined at
        this model's thresholds, float64 near a decision; ``settings`` default to those the model
        was certified with (its spec), else CertifySettings()."""
        from ace_lightning.nets.layers import eval_mode  # not at import: the nets package loads timm

        with eval_mode(self):
            logits, branch = self.route(x)
            labels = logits.argmax(-1)
            result = {"labels": labels, "branch": branch}
            if eps is not None:
                if settings is None:
                    settings = CertifySettings.from_config(self.spec.get("certify") or {})
                rec = certify_batch(self, x, labels, eps, settings, thresholds=[self.thresholds.tolist()])
                sfx = pair_suffixes(self.num_branches)
                stack = lambda name: torch.stack([rec[f"{name}{s}"] for s in sfx], dim=1)  # noqa: E731
                result["certified"] = composed_certified(stack("cert_ok"), rec["core_ok"], stack("lb_g"),
                                                         stack("ub_g"), self.thresholds, g=stack("g"),
                                                         kappa=self.class_thresholds, cls=stack("cert_pred"))
        return result

    # -- one artefact, weights-only loading --------------------------------------------------------
    def save(self, path: Path) -> Path:
        """Writes {format, spec (JSON), state_dict} atomically; load with ``ACEModel.load``."""
        from ace_lightning.atomic import atomic_torch_save

        if not self.spec:
            raise ConfigError("ACEModel.save needs the spec it was built from (use ACEModel.from_spec)")
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        atomic_torch_save({"format": FORMAT, "spec": json.dumps(self.spec), "state_dict": state}, Path(path))
        return Path(path)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "ACEModel":
        """Build the (untrained) architecture from a spec: data info, net configs, selection, T."""
        from types import SimpleNamespace

        from ace_lightning.nets import build_net

        d = spec["data"]
        info = SimpleNamespace(name=d["name"], input_shape=tuple(d["input_shape"]),
                               num_classes=int(d["num_classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]))
        core = build_net(spec["core_net"], info)
        certs, gates = [], []
        for branch in spec["branches"]:
            certs.append(build_net(branch["cert_net"], info))
            network = SELECTIONS.get(branch["selection"]).network
            gates.append(build_net({**branch["gate_net"], "kind": "gate"}, info) if network else None)
        model = cls(core, certs, gates, [float(b["threshold"]) for b in spec["branches"]], spec,
                    [b["selection"] for b in spec["branches"]])
        for i, b in enumerate(spec["branches"]):
            if b.get("class_thresholds") is not None:
                model.set_class_thresholds(i, b["class_thresholds"])
        return model

    @classmethod
    def load(cls, path: Path, map_location: str = "cpu") -> "ACEModel":
        path = Path(path)
        if not path.is_file():
            raise InputNotFoundError(f"ACE model file {path} not found")
        try:
            blob = torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            raise StageInputError(f"cannot load {path}: file is truncated or not a checkpoint") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ConfigError(f"{path} is not an ACE model file (format {FORMAT})")
        model = cls.from_spec(json.loads(blob["spec"]))
        state = dict(blob["state_dict"])
        state.setdefault("class_thresholds", model.class_thresholds)  # files from before margin selection
        model.load_state_dict(state)
        return model.eval()  # certificates hold for eval mode (BatchNorm with its running statistics)


def _num_classes(cert: nn.Module, spec: Optional[Mapping[str, Any]]) -> int:
    """K, from the spec's data or the cert-net's last linear layer."""
    if spec and spec.get("data", {}).get("num_classes"):
        return int(spec["data"]["num_classes"])
    last = [m for m in cert.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else 1


def margin_at(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min_j (z_y - z_j) at the point itself, [B]."""
    z_y = logits.gather(-1, y.view(-1, 1))
    others = logits.scatter(-1, y.view(-1, 1), -math.inf)
    return z_y.squeeze(-1) - others.amax(-1)


def check_contains(value: torch.Tensor, lb: torch.Tensor, ub: Optional[torch.Tensor], what: str) -> None:
    """A bound must hold at the point it was computed around: lb <= value (<= ub), for every
    input whose bound is a number (NaN and infinite bounds are the rule's to refuse). The bounds
    are widened outward for rounding (bounds/outward.py), so a violation is a bug in a bound, never
    rounding: it stops certification (SoundnessError) rather than being clipped."""
    lb = lb.to(torch.float64)
    value = value.to(torch.float64)
    bad = torch.isfinite(lb) & (value < lb)
    if ub is not None:
        ub = ub.to(torch.float64)
        bad |= torch.isfinite(ub) & (value > ub)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        hi = "" if ub is None else f", {float(ub[k])!r}"
        raise SoundnessError(f"SOUNDNESS BUG: {int(bad.sum())} input(s) violate {what}: e.g. value "
                             f"{float(value[k])!r} outside [{float(lb[k])!r}{hi}]")


@precise
def certify_batch(model: ACEModel, x: torch.Tensor, y: torch.Tensor, eps: float,
                  settings: Optional[CertifySettings] = None,
                  thresholds: Optional[Sequence[Sequence[float]]] = None) -> dict[str, torch.Tensor]:
    """Per-input fields of the records (docs/METHOD.md section 4.5; columns suffixed _i for
    cascades of n > 1 pairs): label, core_pred/core_correct/core_ok, and per pair cert_pred,
    cert_correct, cert_ok, cert_margin (best certified margin found), cert_method and gate_method
    (indices into bounds.METHODS, -1: none), g, lb_g, ub_g; rechecked (decided in float64),
    recheck_flipped (float64 changed a decision) and float64 (the pass's dtype). ``thresholds``: threshold vectors (one T per pair) at which the
    gate intervals are refined and re-checked; None: thresholds are not known yet (the certify
    stage refines later, certify_pass.refine_records). Full precision throughout (autocast off), so the
    records do not depend on the caller's mixed-precision context."""
    settings = settings or CertifySettings()
    with alpha_crown_options(settings.alpha_crown_iterations, settings.alpha_crown_lr):
        return _certify_batch(model, x, y, eps, settings, thresholds)


def _certify_batch(model: ACEModel, x: torch.Tensor, y: torch.Tensor, eps: float, settings: CertifySettings,
                   thresholds: Optional[Sequence[Sequence[float]]]) -> dict[str, torch.Tensor]:
    from ace_lightning.attacks.pgd import counterexample_found

    dtype = DTYPES[settings.dtype]
    x_native, x = x, x.to(dtype)
    n = model.num_branches
    out: dict[str, torch.Tensor] = {"label": y}
    with torch.no_grad():
        core_logits = net_in_dtype(model.core, dtype)(x)
    out["core_pred"] = core_logits.argmax(-1)
    out["core_correct"] = out["core_pred"] == y
    if settings.core_method:
        out["core_ok"] = margin_lower_bounds(model.core, x, y, eps, settings.core_method,
                                             dtype=dtype).min(1).values > 0
    else:
        out["core_ok"] = torch.zeros_like(y, dtype=torch.bool)
    rechecked = torch.zeros_like(y, dtype=torch.bool)
    flipped = torch.zeros_like(rechecked)
    code_of = method_codes()
    codes = lambda names: torch.tensor([code_of[m] for m in names], device=x.device)  # noqa: E731
    for i in range(n):
        sfx = pair_suffix(i + 1, n)
        net = model.certs[i]

        def refute(idx, net=net):
            return counterexample_found(net_in_dtype(net, dtype), x[idx], y[idx], eps, settings.refute_steps)

        with torch.no_grad():
            cert = margin_ladder(net, x, y, eps, settings.methods, dtype=dtype, refute=refute,
                                 time_budget_s=settings.time_budget_s, recheck_tol=settings.recheck_tol)
        bound = lambda xs, method, dt, i=i: model.selector_bounds(i, xs, eps, method, dtype=dt)  # noqa: E731
        margin_sel = model.selector(i).per_class
        with torch.no_grad():  # what the deployed model computes at x: it routes by this g
            deployed = net(x_native)
            g_x = gap(deployed) if margin_sel else model.gate_value(i, x_native, deployed)
            gate_methods, refine_methods = settings.gate_methods, settings.refine_methods
            if margin_sel:  # the gap needs a margin pass of K - 1 rows: the first method on every input,
                # the others only where a threshold needs them (the ladder's margin covers the rest)
                gate_methods, refine_methods = gate_methods[:1], gate_methods[1:] + refine_methods
            gate = gate_interval(bound, x, gate_methods, dtype=dtype)
            eligible = None
            if margin_sel:  # the ladder's certified margin bounds the same gap where y is the class at x,
                # and refining helps only a certified class (the ladder tried every method on the others)
                same = (deployed.argmax(-1) == y) & (cert.margin > 0)
                gate.lb = torch.where(same, torch.maximum(gate.lb, cert.margin.to(gate.lb.dtype)), gate.lb)
                eligible = gate.lb > 0
            if thresholds:
                gate = refine_gate(bound, x, gate, [t[i] for t in thresholds], gate_methods,
                                   refine_methods, dtype=dtype, recheck_tol=settings.recheck_tol,
                                   time_budget_s=settings.time_budget_s, cost_key=("selector", id(model), i),
                                   eligible=eligible, lb_exact=None if eligible is None else gate.lb == 0)
        check_contains(g_x, gate.lb, gate.ub, f"selector {i + 1} ({model.selection[i]}), g(x) in [lb_g, ub_g]")
        check_contains(margin_at(deployed, y), cert.margin, None,
                       f"cert-net {i + 1}: margin at x >= certified margin")
        out[f"cert_pred{sfx}"] = deployed.argmax(-1)
        out[f"cert_correct{sfx}"] = out[f"cert_pred{sfx}"] == y
        out[f"cert_ok{sfx}"] = cert.ok & out[f"cert_correct{sfx}"]
        out[f"cert_margin{sfx}"] = cert.margin
        out[f"cert_method{sfx}"] = torch.where(cert.method >= 0, codes(settings.methods)[cert.method.clamp(min=0)],
                                               NO_METHOD)
        gate_codes = codes(settings.gate_methods + settings.refine_methods)
        out[f"gate_method{sfx}"] = gate_codes[gate.method]
        out[f"g{sfx}"], out[f"lb_g{sfx}"], out[f"ub_g{sfx}"] = g_x, gate.lb, gate.ub
        rechecked |= cert.rechecked | gate.rechecked
        flipped |= cert.flipped | gate.flipped
    out["rechecked"], out["recheck_flipped"] = rechecked, flipped
    out["float64"] = torch.full_like(rechecked, dtype == torch.float64)
    return out
