"""Stage name -> function(cfg) -> manifest. Adding a stage = one entry here + conf/stage/<name>.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ace_lightning.bounds import output_bounds
from ace_lightning.stages.runner import check_certified_precision, run_training_stage, to_dict


def run_core(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.core import CoreStage

    st = to_dict(cfg["stage"])

    def make(net, dm):
        return CoreStage(net, st["optimizer"], st["lr_schedule"], mode=st["mode"],
                         train_eps=st["train_eps"], pgd_steps=st["pgd_steps"],
                         pgd_step_size=st["pgd_step_size"], eval_eps=float(cfg["eps"]),
                         eval_pgd_steps=st["eval_pgd_steps"], l1=st["l1"])

    return run_training_stage(cfg, "core", make, "core_net", CoreStage.key_metric, "core.pt",
                              mixed_precision=bool(st.get("mixed_precision", False)), callbacks=callbacks)


def check_boundable(net: torch.nn.Module, dm) -> None:
    """Fail before training when the bound layer cannot handle the cert-net (one-line ValueError)."""
    shape = tuple(dm.info.input_shape)
    x = torch.full((2, *shape), 0.5)
    was = net.training
    net.eval()
    output_bounds(net, x, 0.01, "IBP")
    net.train(was)


def run_cert(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.cert import METHOD_OPTIONS, SELECT_OPTIONS, CertStage
    from ace_lightning.stages.common import sha256_file

    st = to_dict(cfg["stage"])
    # validate before any data is loaded
    CertStage.check_config(st, float(cfg["eps"]))
    check_certified_precision(cfg, "cert")
    pretrained = st.get("pretrained_path")
    inputs = {}
    if pretrained:
        path = Path(str(pretrained)).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"stage.pretrained_path: weight file not found: {path}")
        pretrained = str(path)
        inputs["pretrained"] = {"path": pretrained, "sha256": sha256_file(path)}

    def make(net, dm):
        options = {k: st[k] for k in SELECT_OPTIONS + METHOD_OPTIONS if k in st}
        if pretrained:
            options["shi_init"] = False  # the imported weights are the net
        return CertStage(net, st["optimizer"], st["lr_schedule"], eps=float(cfg["eps"]),
                         method=st["method"], eps_factor=st["eps_factor"],
                         warmup_epochs=st["warmup_epochs"], ramp_epochs=st["ramp_epochs"],
                         ramp_shape=st["ramp_shape"], kappa_end=st["kappa_end"],
                         loss_fusion=st["loss_fusion"], l1=st["l1"], epochs=st["epochs"],
                         val_pgd_steps=st["val_pgd_steps"], val_crown_ibp=st["val_crown_ibp"], **options)

    # selection co-training trades a little certified accuracy for selectability: the best val
    # cert_acc would pick a checkpoint from before it, so the last weights are exported instead
    key = None if float(st.get("select_weight", 0.0) or 0.0) > 0 else CertStage.key_metric
    return run_training_stage(cfg, "cert", make, "cert_net", key, "cert.pt", inputs=inputs,
                              pre_check=check_boundable, callbacks=callbacks, pretrained=pretrained)


def run_certify_stage(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.certify import run_certify

    return run_certify(cfg)


def run_gate(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.gate import run_gate as run

    check_certified_precision(cfg, "gate")
    return run(cfg, callbacks=callbacks, pre_check=check_boundable)


def run_entropy(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    from ace_lightning.stages.entropy import run_entropy as run

    check_certified_precision(cfg, "entropy")
    return run(cfg, callbacks=callbacks, pre_check=check_boundable)


STAGES: dict[str, Callable[..., dict]] = {"core": run_core, "cert": run_cert, "certify": run_certify_stage,
                                          "gate": run_gate, "entropy": run_entropy}


def apply_stage_overrides(cfg: Any) -> Any:
    """Pipelines sweep ``stage=core,cert,...`` in one multirun, so an experiment cannot set
    ``stage.epochs`` for all of them at once: it sets ``stage_overrides.<name>`` instead, merged
    here into the stage config of the job being run."""
    from omegaconf import DictConfig, OmegaConf, open_dict

    if not isinstance(cfg, DictConfig):
        return cfg
    name = cfg.stage.name
    over = (cfg.get("stage_overrides") or {}).get(name)
    if over:
        with open_dict(cfg):
            cfg.stage = OmegaConf.merge(cfg.stage, over)
    return cfg


def run_stage(cfg: Mapping[str, Any], callbacks: tuple = ()) -> dict:
    """Run the configured stage; ``callbacks`` are extra Lightning callbacks (tests, user hooks)."""
    cfg = apply_stage_overrides(cfg)
    name = to_dict(cfg["stage"])["name"]
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}'; known: {', '.join(STAGES)}")
    return STAGES[name](cfg, callbacks=tuple(callbacks))
