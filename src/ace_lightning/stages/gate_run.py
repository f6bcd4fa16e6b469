"""The gate stage's Stage (registry: stage=gate): the cert-net of the run folder (the last of
``stage.cascade``), the gates of a cascade's earlier pairs, the labels (stages/gate_labels.py) ->
the trained gate of stages/gate.py, its weights and a manifest saying what the composition needs.

Why apart from gate.py: this is run-folder plumbing (which stages it reads, cascades, label files);
gate.py is the training itself. Bad input: a missing cert stage is a one-line StageInputError
naming it; a cert-net whose weights do not fit the gate's architecture a one-line ValueError;
labels made for another eps (an explicit ``stage.labels_file``) a one-line StageInputError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ace_lightning.config import to_dict
from ace_lightning.errors import StageInputError
from ace_lightning.nets import build_net, check_net_config, init_gate_from_cert
from ace_lightning.rundir import check_same_data, load_weights, require_stage, stage_weights
from ace_lightning.stages.configs import CLASSIC
from ace_lightning.stages.gate import GateConfig, GateStage
from ace_lightning.stages.gate_labels import (
    EarlierGate,
    GateLabelsDataModule,
    cascade_key,
    check_negatives,
    label_methods,
    label_problems,
    read_labels,
)
from ace_lightning.stages.losses import check_method_knobs
from ace_lightning.stages.runner import Stage, StageInputs

# gate labels for a net trained with SABR or an expressive loss (loose IBP bounds by design):
# certified cheap to tight, as the certify stage does
LADDER_LABELS = "IBP+CROWN-IBP+CROWN"


def gate_stage_name(position: int) -> str:
    """Stage folder (and weights file stem) of the gate of cascade pair ``position``."""
    return "gate" if position == 0 else f"gate_{position}"


def _label_device(cfg: Mapping[str, Any]) -> torch.device:
    acc = str(to_dict(cfg["trainer"]).get("accelerator", "auto")).lower()
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_labels_file(path: Path, payload: Mapping[str, Any], **expected: Any) -> None:
    """An explicitly configured label file that does not fit this run is an error, not a recompute."""
    problems = label_problems(payload, **expected)
    if problems:
        raise StageInputError(f"gate labels {path}: {problems[0]}; point stage.labels_file at labels made "
                              f"for this run or set it to null to recompute")


@dataclass
class GateInputs(StageInputs):
    """What the gate of cascade pair ``position`` reads from the run folder."""

    config: Optional[GateConfig] = None  # method, sabr_lambda, alpha resolved from the cert-net's
    cert_stage: str = "cert"
    cert_manifest: dict = field(default_factory=dict)
    cert_sha: str = ""
    position: int = 0
    cascade: list = field(default_factory=list)
    earlier: list = field(default_factory=list)  # EarlierGate of each earlier pair
    labelled: Optional[GateLabelsDataModule] = None  # set once the labels are made


def read_gate_inputs(cfg: Mapping[str, Any], config: GateConfig) -> GateInputs:
    """The cert-net of the last pair in ``stage.cascade`` (default: one pair, the 'cert' stage), the
    gates of the earlier pairs, an explicit labels file: all checked before any data is loaded."""
    eps = float(cfg["eps"])
    run_dir = Path(cfg["run_dir"]).resolve()
    cascade = [str(c) for c in (config.cascade or ["cert"])]
    position = len(cascade) - 1
    stage = gate_stage_name(position)
    cert_stage = cascade[-1]
    cert_manifest = require_stage(run_dir, cert_stage, stage)
    cert_path, cert_sha = stage_weights(run_dir, cert_stage, cert_manifest, stage)
    cert_stage_cfg = (cert_manifest.get("config") or {}).get("stage") or {}
    # null knobs follow the cert-net's training: its method, its SABR lambda / alpha
    knobs = {k: getattr(config, k) if getattr(config, k) is not None else cert_stage_cfg.get(k)
             for k in ("sabr_lambda", "alpha")}
    method = check_method_knobs(config.method or cert_stage_cfg.get("method") or "IBP",
                                knobs["sabr_lambda"] if knobs["sabr_lambda"] is not None else 0.4,
                                knobs["alpha"] if knobs["alpha"] is not None else 0.5, config.attack)
    resolved = replace(config, method=method, **{k: v for k, v in knobs.items() if v is not None})
    resolved.validate(eps)
    label_method = label_methods(config.label_method or (method if method in CLASSIC else LADDER_LABELS))
    if "net" not in cert_manifest:
        raise StageInputError(f"stage '{stage}': the manifest of '{cert_stage}' does not say which net it trained")
    earlier: list[EarlierGate] = []  # earlier pairs of a cascade: their gates must exist (trained in order)
    thresholds = config.cascade_thresholds
    for i in range(position):
        name = gate_stage_name(i)
        gm = require_stage(run_dir, name, stage)
        g_path, g_sha = stage_weights(run_dir, name, gm, stage)
        sel = gm.get("selection") or {}
        t_i = float(thresholds[i]) if thresholds is not None else float(sel.get("threshold", 0.0))
        earlier.append(EarlierGate(name, sel.get("method") or "IBP", t_i, g_sha, gm["net"], g_path))
    if config.labels_file:  # fail before any data is loaded
        path = Path(config.labels_file).expanduser().resolve()
        check_labels_file(path, read_labels(path), eps=eps, method=label_method, cert_sha256=cert_sha,
                          after=cascade_key(earlier))
    inputs = GateInputs(folder=stage, eps=eps, net={**dict(config.gate_net or cert_manifest["net"]), "kind": "gate"},
                        config=resolved, cert_stage=cert_stage, cert_manifest=cert_manifest, cert_sha=cert_sha,
                        position=position, cascade=cascade, earlier=earlier)
    inputs.inputs["cert"] = {"stage": cert_stage, "path": str(cert_path), "sha256": cert_sha}
    for g in earlier:
        inputs.inputs[g.name] = {"stage": g.name, "path": str(g.path), "sha256": g.sha256}
    progress = bool(to_dict(cfg["trainer"]).get("enable_progress_bar", True))
    negatives = check_negatives(config.negatives)

    def with_labels(dm: Any) -> GateLabelsDataModule:
        """The gate's data: the run's images with labels certified once (GateLabelsDataModule)."""
        info = dm.info
        check_same_data(info, cert_manifest, cert_stage, stage)
        cert_net = load_weights(build_net(cert_manifest["net"], info), cert_path,
                                f"stage '{stage}': cert-net of stage '{cert_stage}'")
        for g in earlier:
            g.net = load_weights(build_net(g.net_cfg, info), g.path, f"stage '{stage}': gate of stage '{g.name}'")
        inputs.labelled = GateLabelsDataModule(dm, run_dir / stage, cert_net, cert_sha, eps, label_method, earlier,
                                               negatives, _label_device(cfg), progress, config.labels_file)
        inputs.labelled.cert_stage = cert_stage
        return inputs.labelled

    inputs.datamodule = with_labels
    return inputs


def make_gate(net: nn.Module, dm: GateLabelsDataModule, config: GateConfig, inputs: GateInputs) -> GateStage:
    if config.init_from_cert:
        init_gate_from_cert(net, dm.cert_net)  # ConfigError naming the first mismatching layer
    return GateStage(net, inputs.config or config, inputs.eps)


def gate_manifest(module: GateStage, config: GateConfig, inputs: GateInputs) -> dict:
    """What the composition needs from this stage: the selector, its labels, its status."""
    method = module.method
    return {"selection": {"type": "network", "threshold": float(config.threshold),
                          "method": method if method in CLASSIC else "IBP", "training_method": method,
                          "cert_stage": inputs.cert_stage, "position": inputs.position, "cascade": inputs.cascade,
                          "earlier_thresholds": [g.threshold for g in inputs.earlier]},
            "labels": inputs.labelled.info_dict if inputs.labelled is not None else None,
            "gate_status": getattr(module, "gate_status", "trained")}


def check_gate_job(cfg: Mapping[str, Any], config: GateConfig) -> None:
    """A gate of its own architecture (``gate_net``) is a net."""
    if config.gate_net:
        check_net_config({**dict(config.gate_net), "kind": "gate"}, "stage.gate_net")


STAGE = Stage("gate", GateConfig, net_key="gate_net", weights="{folder}.pt", key_metric="val/selection_score",
              make_module=make_gate, read_inputs=read_gate_inputs, check=check_gate_job,
              manifest_extra=gate_manifest, certified=True)
