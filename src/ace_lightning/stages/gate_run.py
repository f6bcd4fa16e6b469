"""The gate stage's runner (registry: stage=gate): the cert-net of the run folder (the last of
``stage.cascade``), the gates of a cascade's earlier pairs, the labels (stages/gate_labels.py) ->
the trained gate of stages/gate.py, its weights and a manifest saying what the composition needs.

Why apart from gate.py: this is run-folder plumbing (which stages it reads, cascades, label files);
gate.py is the training itself. Bad input: a missing cert stage is a one-line StageInputError
naming it; a cert-net whose weights do not fit the gate's architecture a one-line ValueError;
labels made for another eps (an explicit ``stage.labels_file``) a one-line StageInputError.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ace_lightning.config import to_dict
from ace_lightning.errors import ConfigError, StageInputError
from ace_lightning.nets import build_net, init_gate_from_cert
from ace_lightning.rundir import check_same_data, load_weights, require_stage, stage_weights
from ace_lightning.stages.certified import CLASSIC
from ace_lightning.stages.gate import GateStage
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
from ace_lightning.stages.runner import run_training_stage

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


def run_gate(cfg: Mapping[str, Any], callbacks: tuple = (),
             pre_check: Optional[Callable[[nn.Module, Any], None]] = None) -> dict:
    """Train the gate of the last pair in ``stage.cascade`` (default: one pair, the 'cert' stage)."""
    st = to_dict(cfg["stage"])
    eps = float(cfg["eps"])
    GateStage.check_config({**st, "method": st.get("method") or "IBP"}, eps)
    negatives = check_negatives(st.get("negatives"))  # before any label is computed
    run_dir = Path(cfg["run_dir"]).resolve()
    cascade = [str(c) for c in (st.get("cascade") or ["cert"])]
    position = len(cascade) - 1
    stage = gate_stage_name(position)
    stage_dir = run_dir / stage
    cert_stage = cascade[-1]
    cert_manifest = require_stage(run_dir, cert_stage, stage)
    cert_path, cert_sha = stage_weights(run_dir, cert_stage, cert_manifest, stage)
    cert_stage_cfg = (cert_manifest.get("config") or {}).get("stage") or {}
    cert_method = cert_stage_cfg.get("method") or "IBP"
    # null knobs follow the cert-net's training: its method, its SABR lambda / alpha
    knobs = {k: st.get(k) if st.get(k) is not None else cert_stage_cfg.get(k) for k in ("sabr_lambda", "alpha")}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    method = check_method_knobs(st.get("method") or cert_method, knobs.get("sabr_lambda", 0.4),
                                knobs.get("alpha", 0.5), st.get("attack"))
    GateStage.check_config({**st, **knobs, "method": method}, eps)
    label_method = label_methods(st.get("label_method") or (method if method in CLASSIC else LADDER_LABELS))
    if "net" not in cert_manifest:
        raise StageInputError(f"stage '{stage}': the manifest of '{cert_stage}' does not say which net it trained")
    gate_net_cfg = {**dict(st.get("gate_net") or cert_manifest["net"]), "kind": "gate"}

    # earlier pairs of a cascade: their gates must exist (trained in order)
    thresholds = st.get("cascade_thresholds")
    if thresholds is not None and len(thresholds) != position:
        raise ConfigError(f"stage.cascade_thresholds needs one threshold per earlier pair ({position}), "
                          f"got {len(thresholds)}")
    earlier: list[EarlierGate] = []
    for i in range(position):
        name = gate_stage_name(i)
        gm = require_stage(run_dir, name, stage)
        g_path, g_sha = stage_weights(run_dir, name, gm, stage)
        sel = gm.get("selection") or {}
        t_i = float(thresholds[i]) if thresholds is not None else float(sel.get("threshold", 0.0))
        earlier.append(EarlierGate(name, sel.get("method") or "IBP", t_i, g_sha, gm["net"], g_path))
    labels_file = st.get("labels_file")
    if labels_file:  # fail before any data is loaded
        path = Path(labels_file).expanduser().resolve()
        check_labels_file(path, read_labels(path), eps=eps, method=label_method, cert_sha256=cert_sha,
                          after=cascade_key(earlier))

    inputs: dict[str, Any] = {"cert": {"stage": cert_stage, "path": str(cert_path), "sha256": cert_sha}}
    for g in earlier:
        inputs[g.name] = {"stage": g.name, "path": str(g.path), "sha256": g.sha256}
    progress = bool(to_dict(cfg["trainer"]).get("enable_progress_bar", True))
    labelled: dict[str, GateLabelsDataModule] = {}

    def with_labels(dm: Any) -> GateLabelsDataModule:
        """The gate's data: the run's images with labels certified once (GateLabelsDataModule)."""
        info = dm.info
        check_same_data(info, cert_manifest, cert_stage, stage)
        cert_net = load_weights(build_net(cert_manifest["net"], info), cert_path,
                                f"stage '{stage}': cert-net of stage '{cert_stage}'")
        for g in earlier:
            g.net = load_weights(build_net(g.net_cfg, info), g.path, f"stage '{stage}': gate of stage '{g.name}'")
        labelled["dm"] = GateLabelsDataModule(dm, stage_dir, cert_net, cert_sha, eps, label_method, earlier,
                                              negatives, _label_device(cfg), progress, labels_file)
        labelled["dm"].cert_stage = cert_stage
        return labelled["dm"]

    def make(net: nn.Module, dm: GateLabelsDataModule) -> GateStage:
        if st.get("init_from_cert", True):
            init_gate_from_cert(net, dm.cert_net)  # ConfigError naming the first mismatching layer
        return GateStage(
            net, st["optimizer"], st["lr_schedule"], eps=eps, method=method, epochs=st["epochs"],
            threshold=st["threshold"], eps_factor=st["eps_factor"], warmup_epochs=st["warmup_epochs"],
            ramp_epochs=st["ramp_epochs"], ramp_shape=st["ramp_shape"], kappa_end=st["kappa_end"],
            pos_weight=st["pos_weight"], pos_weight_sigma=st["pos_weight_sigma"],
            worst_case_negatives=st.get("worst_case_negatives", True), train_last_k=st["train_last_k"], l1=st["l1"],
            val_crown_ibp=st["val_crown_ibp"], attack=st.get("attack"), **knobs)

    def manifest_extra(module: GateStage) -> dict:
        """What the composition needs from this stage: the selector, its labels, its status."""
        return {"selection": {"type": "network", "threshold": float(st["threshold"]),
                              "method": method if method in CLASSIC else "IBP", "training_method": method,
                              "cert_stage": cert_stage, "position": position, "cascade": cascade,
                              "earlier_thresholds": [g.threshold for g in earlier]},
                "labels": labelled["dm"].info_dict, "gate_status": getattr(module, "gate_status", "trained")}

    plain = dict(to_dict(cfg))
    plain["gate_net"] = gate_net_cfg
    return run_training_stage(plain, stage, make, "gate_net", GateStage.key_metric, f"{stage}.pt",
                              inputs=inputs, pre_check=pre_check, callbacks=callbacks,
                              datamodule=with_labels, manifest_extra=manifest_extra)
