"""The composed ACE model (ace-method.md sections 2-4): f_ACE(x) = f_cert(x) if g(x) >= T else
f_core(x), generalised to cascades of (cert-net, selector) pairs tried in order.

Conditional execution: each branch only runs on the inputs still unanswered, and the core only on
the inputs every gate rejected (the reference code ran everything on every input).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ace_lightning.bounds import margin_lower_bounds, output_bounds
from ace_lightning.bounds.entropy import entropy, entropy_gate_bounds

FORMAT = "ace-lightning/ace-model/1"
SELECTIONS = ("gate", "entropy")


def composed_certified(cert_ok: torch.Tensor, core_ok: torch.Tensor, lb_g: torch.Tensor,
                       ub_g: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The certification rule of ace-method.md section 4.3 for a cascade of n pairs.

    cert_ok, lb_g, ub_g: [B, n]; core_ok: [B]; thresholds: [n]. Branch k *may* answer for some
    x' in the ball iff every earlier gate may stay below its threshold and ub_g_k >= T_k; once a
    gate surely fires (lb_g_k >= T_k) nothing after it is reachable. Certified iff every branch
    that may answer is certified. One pair: lb_g >= T -> cert_ok; ub_g < T -> core_ok; else both.
    """
    batch, n = lb_g.shape
    certified = torch.ones(batch, dtype=torch.bool, device=lb_g.device)
    reachable = torch.ones(batch, dtype=torch.bool, device=lb_g.device)
    for k in range(n):
        may_fire = reachable & (ub_g[:, k] >= thresholds[k])
        certified &= ~may_fire | cert_ok[:, k].bool()
        reachable &= lb_g[:, k] < thresholds[k]
    certified &= ~reachable | core_ok.bool()
    return certified


class ACEModel(nn.Module):
    """Core + n (cert-net, selector) pairs + thresholds. A selector is a gate network (one logit)
    or entropy selection (g = -H(softmax(f_cert)))."""

    def __init__(self, core: nn.Module, certs: Sequence[nn.Module], gates: Sequence[Optional[nn.Module]],
                 thresholds: Sequence[float], spec: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        if not (len(certs) == len(gates) == len(thresholds)) or not certs:
            raise ValueError("ACEModel needs one selector (gate or None = entropy) and one threshold "
                             f"per cert-net: got {len(certs)} cert-nets, {len(gates)} selectors, "
                             f"{len(thresholds)} thresholds")
        self.core = core
        self.certs = nn.ModuleList(certs)
        self.gates = nn.ModuleDict({str(i): g for i, g in enumerate(gates) if g is not None})
        self.selection = ["gate" if g is not None else "entropy" for g in gates]
        self.register_buffer("thresholds", torch.as_tensor(list(thresholds), dtype=torch.float32))
        self.spec = dict(spec or {})

    @property
    def num_branches(self) -> int:
        return len(self.certs)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        if len(thresholds) != self.num_branches:
            raise ValueError(f"need {self.num_branches} threshold(s), got {len(thresholds)}")
        self.thresholds.copy_(torch.as_tensor(list(thresholds), dtype=torch.float32))

    def gate_value(self, i: int, x: torch.Tensor, cert_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """g_i(x), [B]."""
        if self.selection[i] == "gate":
            return self.gates[str(i)](x).squeeze(-1)
        logits = cert_logits if cert_logits is not None else self.certs[i](x)
        return -entropy(logits)

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
            cert_logits = self.certs[i](xi) if self.selection[i] == "entropy" else None
            fire = self.gate_value(i, xi, cert_logits) >= self.thresholds[i]
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
        core = self.core(x)
        out = core.clone()
        undecided = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for i in range(self.num_branches):
            logits = self.certs[i](x)
            fire = undecided & (self.gate_value(i, x, logits) >= self.thresholds[i])
            out[fire] = logits[fire]
            undecided &= ~fire
        return out

    def selector_bounds(self, i: int, x: torch.Tensor, eps: float, method: str = "IBP"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g, lb_g, ub_g) of selector i over the ball."""
        if self.selection[i] == "gate":
            gate = self.gates[str(i)]
            lb, ub, g = output_bounds(gate, x, eps, method, return_logits=True)
            return g.squeeze(-1), lb.squeeze(-1), ub.squeeze(-1)
        return entropy_gate_bounds(self.certs[i], x, eps, method)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, eps: Optional[float] = None, method: str = "IBP") -> dict:
        """labels, the branch that answered (n = core) and, given eps, whether the answer is
        certified: the predicted label provably stays the same on the whole ball (the composed rule
        with y = the predicted label; the core counts as uncertified)."""
        was = self.training
        self.eval()
        logits, branch = self.route(x)
        labels = logits.argmax(-1)
        result = {"labels": labels, "branch": branch}
        if eps is not None:
            n = self.num_branches
            lb_g = torch.empty(x.shape[0], n, device=x.device)
            ub_g = torch.empty_like(lb_g)
            cert_ok = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)
            for i in range(n):
                _, lb_g[:, i], ub_g[:, i] = self.selector_bounds(i, x, eps, method)
                cert_ok[:, i] = margin_lower_bounds(self.certs[i], x, labels, eps, method).min(1).values > 0
            core_ok = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            result["certified"] = composed_certified(cert_ok, core_ok, lb_g, ub_g, self.thresholds)
        self.train(was)
        return result

    # -- one artefact, weights-only loading --------------------------------------------------------
    def save(self, path: Path) -> Path:
        """Writes {format, spec (JSON), state_dict} atomically; load with ``ACEModel.load``."""
        from ace_lightning.stages.common import atomic_torch_save

        if not self.spec:
            raise ValueError("ACEModel.save needs the spec it was built from (use ACEModel.from_spec)")
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
            if branch["selection"] == "gate":
                gates.append(build_net({**branch["gate_net"], "kind": "gate"}, info))
            elif branch["selection"] == "entropy":
                gates.append(None)
            else:
                raise ValueError(f"unknown selection {branch['selection']!r}; known: {', '.join(SELECTIONS)}")
        return cls(core, certs, gates, [float(b["threshold"]) for b in spec["branches"]], spec)

    @classmethod
    def load(cls, path: Path, map_location: str = "cpu") -> "ACEModel":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ACE model file {path} not found")
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path} is not an ACE model file (format {FORMAT})")
        model = cls.from_spec(json.loads(blob["spec"]))
        model.load_state_dict(blob["state_dict"])
        return model


def spec_from_run(run_dir: Path, selection: str = "gate", entropy_stage: str = "entropy") -> tuple[dict, dict]:
    """(spec, weight paths) of the composed model from the stage manifests of a run folder:
    core/, cert/ and gate/ (selection network) or, for entropy selection, the cert-net of
    ``entropy_stage`` (entropy/: co-trained by the entropy stage; cert/: the cert stage's net as is)."""
    from ace_lightning.stages.common import require_stage

    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; known: {', '.join(SELECTIONS)}")
    run_dir = Path(run_dir)
    core = require_stage(run_dir, "core", "certify")
    cert = require_stage(run_dir, "cert", "certify")
    selector = require_stage(run_dir, "gate" if selection == "gate" else entropy_stage, "certify")
    for name, manifest in (("core", core), ("cert", cert)):
        if "net" not in manifest:
            raise ValueError(f"{run_dir / name / 'manifest.json'} does not say which net it trained (no 'net')")
    paths = {"core": run_dir / "core" / core["outputs"]["weights"]["path"]}
    branch: dict[str, Any] = {"selection": selection, "threshold": 0.0, "cert_net": cert["net"]}
    if selection == "gate":
        paths["cert_0"] = run_dir / "cert" / cert["outputs"]["weights"]["path"]
        paths["gate_0"] = run_dir / "gate" / selector["outputs"]["weights"]["path"]
        branch["gate_net"] = {**selector["net"], "kind": "gate"}
    else:
        paths["cert_0"] = run_dir / entropy_stage / selector["outputs"]["weights"]["path"]
        branch["cert_net"] = selector.get("net", cert["net"])
    data = dict(cert["data"])
    if core["data"]["name"] != data["name"]:
        raise ValueError(f"run folder mixes datasets: core on {core['data']['name']}, cert on {data['name']}")
    spec = {"data": {k: data[k] for k in ("name", "input_shape", "num_classes", "mean", "std")},
            "eps": cert.get("eps"), "core_net": core["net"], "branches": [branch]}
    return spec, paths


def model_from_run(run_dir: Path, selection: str = "gate", entropy_stage: str = "entropy") -> ACEModel:
    """The composed model with trained weights (weights-only loading) and threshold 0."""
    return load_model(*spec_from_run(run_dir, selection, entropy_stage))


def load_model(spec: Mapping[str, Any], paths: Mapping[str, Path]) -> ACEModel:
    """The composed model of ``spec`` with the weights at ``paths`` (from spec_from_run), threshold 0."""
    from ace_lightning.stages.common import load_weights

    model = ACEModel.from_spec(spec)
    load_weights(model.core, paths["core"], "core")
    load_weights(model.certs[0], paths["cert_0"], "cert-net")
    if "gate_0" in paths:
        load_weights(model.gates["0"], paths["gate_0"], "gate")
    return model.eval()
