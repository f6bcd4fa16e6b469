"""Certified-training methods of the cert and gate stages (stages/losses.py): SABR's small box,
the expressive losses' ordering (Exp <= MTL, CC <= MTL <= IBP by convexity and soundness), Shi et
al.'s initialisation and regularisers, the stages end to end on tiny data, an external cert-net
imported without training, and one-line errors for bad knobs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ace_lightning.bounds import input_box, margin_ce, margin_lower_bounds, margin_spec
from ace_lightning.registry import run_stage
from ace_lightning.stages.losses import (CertifiedLoss, ExpressiveLoss, SABRLoss, TrainingAttack, build_loss,
                                         ibp_init, shi_regularizer)
from bound_checks import conv_net
from stage_utils import CERT_TINY, compose_cfg

EPS = 0.05


def _problem(seed: int = 0):
    net = conv_net(channels=1, side=6, classes=4, bn=False, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(16, 1, 6, 6, generator=gen)
    x[:4] = x[:4].round()  # some pixels on the [0, 1] edges
    y = torch.randint(0, 4, (16,), generator=gen)
    return net, x, y, margin_spec(y, 4)


def test_sabr_small_box_lies_in_the_ball_and_the_pixel_box():
    loss = SABRLoss(0.3, TrainingAttack(steps=2, step_size=0.5))
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(200, 1, 4, 4, generator=gen)
    x[::3] = x[::3].round()
    lo, hi = input_box(x, EPS)
    x_adv = lo + (hi - lo) * torch.rand(x.shape, generator=gen)
    x_adv[::5] = hi[::5]  # on the ball's corner
    lower, upper = loss.small_box(x, x_adv, EPS)
    assert (lower >= lo).all() and (upper <= hi).all() and (lower <= upper).all()
    assert (upper - lower <= 2 * 0.3 * EPS + 1e-7).all()
    # where the ball is not clipped by [0, 1], the box has its full width and contains the PGD point
    inner = (hi - lo) >= 2 * EPS - 1e-7
    assert torch.allclose((upper - lower)[inner], torch.full_like(upper[inner], 2 * 0.3 * EPS), atol=1e-6)
    assert ((x_adv >= lower - 1e-7) & (x_adv <= upper + 1e-7))[inner].float().mean() > 0.5


def test_sabr_with_lambda_one_is_ibp_and_smaller_boxes_give_smaller_losses():
    net, x, y, C = _problem()
    ibp = CertifiedLoss("IBP")(net, x, C, EPS, margin_ce)
    whole = SABRLoss(1.0, TrainingAttack(steps=2, step_size=0.5))(net, x, C, EPS, margin_ce)
    torch.testing.assert_close(whole.loss, ibp.loss)
    torch.manual_seed(0)
    small = SABRLoss(0.2, TrainingAttack(steps=4, step_size=0.5))(net, x, C, EPS, margin_ce)
    assert (small.per_input <= ibp.per_input + 1e-6).all()  # IBP is monotone in the box
    assert small.loss < ibp.loss
    assert small.ball_lb is None and small.logits is None


def _seeded(method: str, alpha: float, net, x, C):
    torch.manual_seed(7)  # the same random start, so the same x_adv, for every method
    loss = ExpressiveLoss(method, alpha, TrainingAttack(steps=3, step_size=0.5))
    return loss(net, x, C, EPS, margin_ce)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.8])
def test_expressive_losses_are_ordered_and_equal_ibp_at_alpha_one(alpha):
    net, x, y, C = _problem(1)
    ibp = CertifiedLoss("IBP")(net, x, C, EPS, margin_ce).per_input
    mtl = _seeded("MTL-IBP", alpha, net, x, C).per_input
    cc = _seeded("CC-IBP", alpha, net, x, C).per_input
    exp = _seeded("Exp-IBP", alpha, net, x, C).per_input
    assert (cc <= mtl + 1e-6).all()  # CE of margins is convex (Jensen)
    assert (exp <= mtl + 1e-6).all()  # weighted geometric <= arithmetic mean
    assert (mtl <= ibp + 1e-6).all()  # sound bounds: the adversarial loss is at most the IBP one
    assert (mtl < ibp - 1e-4).any()
    for method in ("MTL-IBP", "CC-IBP", "Exp-IBP"):
        torch.testing.assert_close(_seeded(method, 1.0, net, x, C).per_input, ibp)


def test_mtl_ibp_is_the_documented_mixture():
    net, x, y, C = _problem(2)
    torch.manual_seed(7)
    attack = TrainingAttack(steps=3, step_size=0.5)
    x_adv = attack(net, x, C, EPS, margin_ce)
    ibp = margin_ce(margin_lower_bounds(net, x, y, EPS, "IBP"))
    adv = nn.functional.cross_entropy(net(x_adv), y, reduction="none")
    got = _seeded("MTL-IBP", 0.25, net, x, C).per_input
    torch.testing.assert_close(got, 0.25 * ibp + 0.75 * adv)


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "SABR", "MTL-IBP", "CC-IBP", "Exp-IBP"])
def test_every_method_reaches_every_parameter_and_reports_relu_bounds(method):
    net, x, y, C = _problem(3)
    net.train()
    loss = build_loss(method, sabr_lambda=0.4, alpha=0.5)
    out = loss(net, x, C, EPS, margin_ce, beta=0.5 if method == "CROWN-IBP" else None, relu_bounds=True)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert len(out.relu_bounds) == 3 and all(l.shape == u.shape for l, u in out.relu_bounds)
    assert all((u >= l).all() for l, u in out.relu_bounds)


def test_training_attack_defaults_follow_the_papers():
    sabr, mtl = build_loss("SABR").attack, build_loss("MTL-IBP").attack
    assert (sabr.steps, sabr.step_size, tuple(sabr.decay_at)) == (8, 0.5, (0.5, 0.8, 0.9))
    assert (mtl.steps, mtl.step_size) == (1, 10.0)
    custom = build_loss("CC-IBP", attack={"steps": 4, "eps_factor": 2.1, "step_size": None}).attack
    assert (custom.steps, custom.eps_factor, custom.step_size) == (4, 2.1, 10.0)


def test_ibp_init_scales_all_but_the_last_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 200), nn.ReLU(),
                        nn.Linear(200, 10))
    last = net[5].weight.detach().clone()
    assert ibp_init(net) == ["1", "3"]
    for layer, fan_in in ((net[1], 400), (net[3], 300)):
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.05)
    assert torch.equal(net[5].weight, last)


def test_shi_regularizer_values_and_gradient():
    gen = torch.Generator().manual_seed(0)
    half = torch.full((8, 1, 4, 4), 0.01)
    centre = torch.randn(8, 32, generator=gen, requires_grad=True)
    width = torch.full((8, 32), 0.001)
    tight, relu = shi_regularizer([(centre - width, centre + width)], half, nn.Identity(), tol=0.5)
    assert tight.item() == 0.0  # t0 / mean half-width = 10 >= tol: tight enough
    assert 0.0 <= relu.item() <= 2.0
    wide = torch.full((8, 32), 1.0)
    tight2, _ = shi_regularizer([(centre - wide, centre + wide)], half, nn.Identity(), tol=0.5)
    assert tight2.item() == pytest.approx((0.5 - 0.01 / 1.0) / 0.5)
    all_active = (torch.rand(8, 32, generator=gen) + 1).requires_grad_()
    _, relu_active = shi_regularizer([(all_active - 0.1, all_active + 0.1)], half, nn.Identity())
    assert relu_active.item() == 0.0  # nothing inactive: the undefined ratio is skipped, not NaN
    relu_active.backward()  # and sends no NaN gradient back (a CNN7 smoke run once trained to NaN)
    assert torch.isfinite(all_active.grad).all()
    (tight2 + relu).backward()
    assert centre.grad is not None and torch.isfinite(centre.grad).all()


# -- the stages end to end --------------------------------------------------------------------------------

@pytest.mark.parametrize("method, extra", [
    ("SABR", ["stage.sabr_lambda=0.3", "stage.attack.steps=2"]),
    ("MTL-IBP", ["stage.alpha=0.1"]),
    ("CC-IBP", ["stage.alpha=0.3", "stage.shi_init=true", "stage.shi_regularizer=true", "net@cert_net=fc",
                "cert_net.bn=true"]),
    ("Exp-IBP", ["stage.alpha=0.5", "stage.select_weight=0.5", "stage.select_start_epoch=1.5"]),
])
def test_cert_stage_trains_with_each_method(tmp_path, method, extra):
    manifest = run_stage(compose_cfg(tmp_path, CERT_TINY + [f"stage.method={method}", *extra]))
    m = manifest["metrics"]
    assert manifest["status"] == "complete" and manifest["config"]["stage"]["method"] == method
    assert 0.0 <= m["test/ibp_cert_acc"] <= m["test/cert_acc"] <= m["test/nat_acc"] <= 1.0
    rows = tmp_path / "synthetic" / "eps_0.03" / "cert" / "metrics.csv"
    header = rows.read_text().splitlines()[0]
    if "shi_regularizer=true" in " ".join(extra):
        assert "train/shi_tightness" in header and "train/shi_relu" in header
    if "select_weight" in " ".join(extra):
        assert "train/selection_loss" in header


@pytest.mark.parametrize("override, message", [
    (["stage.method=PGD"], "unknown certified-training method"),
    (["stage.method=SABR", "stage.sabr_lambda=0"], r"sabr_lambda .* must be in \(0, 1\]"),
    (["stage.method=SABR", "stage.sabr_lambda=1.5"], r"sabr_lambda .* must be in \(0, 1\]"),
    (["stage.method=MTL-IBP", "stage.alpha=0"], r"alpha .* must be in \(0, 1\]"),
    (["stage.method=CC-IBP", "stage.alpha=2"], r"alpha .* must be in \(0, 1\]"),
    (["stage.method=SABR", "stage.loss_fusion=true"], "loss_fusion bounds the CE over the whole ball"),
    (["stage.method=SABR", "stage.select_weight=0.5"], "SABR does not compute"),
    (["stage.method=MTL-IBP", "stage.attack.steps=0"], "attack.steps must be >= 1"),
    (["stage.pretrained_path=/nonexistent/cert.pt"], "weight file not found"),
])
def test_bad_method_knobs_fail_in_one_line_before_training(tmp_path, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        run_stage(compose_cfg(tmp_path, CERT_TINY + override))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "synthetic" / "eps_0.03" / "cert" / "checkpoints").exists()


def test_gate_stage_with_an_expressive_loss_and_ladder_labels(tmp_path):
    base = ["data.subset=128", "data.dataset_kwargs.num_classes=3", "data.dataset_kwargs.input_shape=[1,16,16]",
            "eps=0.02", "net@cert_net=small", "run_name=run"]
    run_stage(compose_cfg(tmp_path, base + ["stage=cert", "stage.method=MTL-IBP", "stage.alpha=0.5", "stage.epochs=4",
                                             "stage.warmup_epochs=1", "stage.ramp_epochs=1", "stage.val_pgd_steps=0",
                                             "stage.optimizer.lr=5e-3"]))
    gate = run_stage(compose_cfg(tmp_path, base + ["stage=gate", "stage.epochs=2", "stage.ramp_epochs=1"]))
    assert gate["status"] == "complete" and gate["gate_status"] == "trained"
    assert gate["selection"]["training_method"] == "MTL-IBP" and gate["selection"]["method"] == "IBP"
    assert gate["labels"]["method"] == "IBP+CROWN-IBP+CROWN"
    assert gate["config"]["stage"]["method"] is None  # followed the cert-net's method and alpha


# -- an external cert-net ----------------------------------------------------------------------------------

def test_pretrained_cert_net_is_imported_validated_and_exported(tmp_path):
    trained = run_stage(compose_cfg(tmp_path / "a", CERT_TINY))
    src = tmp_path / "a" / "synthetic" / "eps_0.03" / "cert" / "cert.pt"
    state = torch.load(src, weights_only=True)
    # another library's file: DDP prefix, no Normalize buffers
    foreign = {f"module.{k}": v for k, v in state.items() if not k.endswith(("mean", "std"))}
    torch.save(foreign, tmp_path / "foreign.pt")
    manifest = run_stage(compose_cfg(tmp_path / "b", CERT_TINY + [f"stage.pretrained_path={tmp_path / 'foreign.pt'}"]))
    out = tmp_path / "b" / "synthetic" / "eps_0.03" / "cert"
    assert manifest["pretrained"]["matched_by"] == "names" and manifest["epochs_trained"] == 0
    loaded = torch.load(out / "cert.pt", weights_only=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    for key in ("test/nat_acc", "test/cert_acc", "val/nat_acc", "val/cert_acc"):
        assert key in manifest["metrics"]
    for key in ("test/nat_acc", "test/ibp_cert_acc", "test/cert_acc"):  # the exported (best) weights, tested again
        assert manifest["metrics"][key] == pytest.approx(trained["metrics"][key]), key
    assert not (out / "checkpoints" / "last.ckpt").exists()
    assert json.loads((out / "manifest.json").read_text())["inputs"]["pretrained"]["sha256"]
    # keys renamed (another layer naming), same layers in the same order
    renamed = {f"layer{i}.{k.split('.')[-1]}": v for i, (k, v) in enumerate(foreign.items())}
    torch.save(renamed, tmp_path / "renamed.pt")
    again = run_stage(compose_cfg(tmp_path / "c", CERT_TINY + [f"stage.pretrained_path={tmp_path / 'renamed.pt'}"]))
    assert again["pretrained"]["matched_by"] == "order"
    # the wrong architecture: one line naming the keys
    torch.save({k: v for k, v in list(foreign.items())[:-1]}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"does not fit cert net 'small': missing: 8.bias") as err:
        run_stage(compose_cfg(tmp_path / "d", CERT_TINY + [f"stage.pretrained_path={tmp_path / 'short.pt'}"]))
    assert "\n" not in str(err.value)


# -- recipes -------------------------------------------------------------------------------------------------

def test_every_experiment_composes_and_the_cifar_recipes_carry_the_papers_settings():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ace_lightning.config import CONF_DIR
    from ace_lightning.stages.cert import CertConfig

    names = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfgs = {n: OmegaConf.to_container(compose(config_name="train", overrides=[f"experiment={n}", "stage=cert"]),
                                          resolve=True) for n in names}
    for name, cfg in cfgs.items():  # every cert-stage recipe passes the stage's own checks
        st = {**cfg["stage"], **(cfg.get("stage_overrides") or {}).get("cert", {})}
        CertConfig.from_dict(st, cfg["eps"])
    sabr = cfgs["cifar10_acenet_sabr_2_255"]
    cert = sabr["stage_overrides"]["cert"]
    assert (cert["method"], cert["sabr_lambda"], cert["epochs"], cert["lr_schedule"]["milestones"]) == \
        ("SABR", 0.1, 160, [120, 140])
    assert sabr["cert_net"]["name"] == "cnn7" and sabr["core_net"]["name"] == "efficientnet_b0"
    assert sabr["stage_overrides"]["gate"]["method"] is None  # the gate follows the cert-net's method
    mtl8 = cfgs["cifar10_acenet_mtlibp_8_255"]["stage_overrides"]["cert"]
    assert (mtl8["alpha"], mtl8["epochs"], mtl8["lr_schedule"]["milestones"]) == (0.5, 260, [180, 220])
    assert cfgs["cifar10_cnn7_mtlibp_2_255"]["stage_overrides"]["cert"]["attack"]["eps_factor"] == 2.1
    assert cfgs["cifar10_acenet_mtlibp_2_255"]["eps"] == pytest.approx(2 / 255)


def test_lr_milestones_decay_at_the_papers_epochs():
    from ace_lightning.stages.base import StageModule

    stage = StageModule(nn.Linear(2, 2), {"lr": 1e-3}, {"milestones": [3, 5], "gamma": 0.2, "step_epochs": 1})
    assert [stage.lr_factor(e) for e in range(7)] == pytest.approx([1, 1, 1, 0.2, 0.2, 0.04, 0.04])


def test_a_diverged_stage_stops_with_one_line_before_exporting():
    from ace_lightning.stages.base import StageModule

    module = StageModule(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), {"name": "adam", "lr": 1e-3}, {})
    module.check_finite()  # finite: nothing to say
    with torch.no_grad():
        module.net[1].running_var[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf.*1.running_var"):
        module.check_finite()
