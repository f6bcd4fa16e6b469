"""Bounds are computed in full precision whatever the caller's context (docs/METHOD.md section 12):
under bfloat16 autocast every method returns exactly the plain float32 bounds (without the guard
181 of 640 IBP lower bounds of this net came out higher than the float32 ones: false
certificates); the reduced-precision kernel settings are switched off during a call and restored
after it, also when it raises; ``dtype`` selects float32 or float64; box bounds over an arbitrary
box agree with the ball's when the box is the ball."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ace_lightning.bounds import (
    box_bounds,
    box_margin_lower_bounds,
    entropy_gate_bounds,
    full_precision,
    input_box,
    margin_lower_bounds,
    output_bounds,
    robust_ce_loss,
)
from ace_lightning.bounds.entropy import entropy_selection_loss
from ace_lightning.bounds.precision import _fp32_knobs
from ace_lightning.bounds.problem import METHODS
from bound_checks import assert_contained, conv_net, points_in_ball, values_at

EPS = 0.01


def _mlp(seed: int = 0) -> nn.Sequential:
    """The net the unsound bounds were measured on (784-200-200-10)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                         nn.Linear(200, 10)).eval()


def _data(n: int = 32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_under_bf16_autocast_equals_float32(method):
    net, (x, y) = _mlp(), _data(8 if method == "alpha-CROWN" else 32)  # alpha-CROWN entropy bounds: slow
    lb, ub = output_bounds(net, x, EPS, method)
    m = margin_lower_bounds(net, x, y, EPS, method)
    g = entropy_gate_bounds(net, x, EPS, method)
    with _bf16():
        lb2, ub2 = output_bounds(net, x, EPS, method)
        m2 = margin_lower_bounds(net, x, y, EPS, method)
        g2 = entropy_gate_bounds(net, x, EPS, method)
    assert lb2.dtype == torch.float32 and m2.dtype == torch.float32
    assert torch.equal(lb2, lb) and torch.equal(ub2, ub)
    assert torch.equal(m2, m)
    for a, b in zip(g, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP"])
def test_training_losses_under_autocast_equal_float32_with_the_same_gradient(method):
    net, (x, y) = _mlp(), _data(16)
    net.train()
    ref = robust_ce_loss(net, x, y, EPS, method)
    ref_grad = torch.autograd.grad(ref, list(net.parameters()))
    with _bf16():
        loss = robust_ce_loss(net, x, y, EPS, method)
        ent = entropy_selection_loss(net, x, y, EPS, method)
    grad = torch.autograd.grad(loss, list(net.parameters()))
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)
    for a, b in zip(grad, ref_grad):
        assert torch.equal(a, b)
    assert torch.equal(ent, entropy_selection_loss(net, x, y, EPS, method))


def _knob_state() -> list[str]:
    return [k.fp32_precision for k in _fp32_knobs()]


def test_reduced_precision_kernels_are_off_during_a_call_and_restored_after():
    knobs = _fp32_knobs()
    assert knobs, "this torch has the fp32_precision settings (>= 2.9)"
    net, (x, _) = _mlp(), _data(4)
    seen: list = []
    hook = net[1].register_forward_hook(
        lambda *_: seen.append((_knob_state(), torch.is_autocast_enabled("cpu"))))
    before = _knob_state()
    legacy = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bf16 in oneDNN on the CPU
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        chosen = _knob_state()
        assert "ieee" not in chosen[:1] and chosen != ["ieee"] * len(chosen)
        with _bf16():
            output_bounds(net, x, EPS, "CROWN")
            assert torch.is_autocast_enabled("cpu")  # the caller's context is back
        assert seen and all(state == ["ieee"] * len(knobs) and not autocast for state, autocast in seen)
        assert _knob_state() == chosen
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        hook.remove()
        torch.set_float32_matmul_precision("highest")
        for k, v in zip(knobs, before):
            k.fp32_precision = v
    assert torch.backends.cuda.matmul.allow_tf32 == legacy  # the legacy reading still works


def test_settings_are_restored_when_the_bound_call_raises(monkeypatch):
    from ace_lightning.bounds import lirpa

    net, (x, _) = _mlp(), _data(4)

    def boom(*_):
        raise RuntimeError("boom inside the bound pass")

    knobs = _fp32_knobs()
    before = _knob_state()
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    chosen = _knob_state()
    hook = net[3].register_forward_hook(boom)  # raises while the BoundedModule is built
    try:
        with _bf16(), pytest.raises(ValueError, match="boom"):
            output_bounds(net, x, EPS, "IBP")
        assert _knob_state() == chosen and torch.is_autocast_enabled("cpu") is False
        hook.remove()
        monkeypatch.setattr(lirpa, "_compute_bounds", boom)  # raises in the bound computation
        with _bf16(), pytest.raises(RuntimeError, match="boom"):
            output_bounds(net, x, EPS, "CROWN")
        assert _knob_state() == chosen
        with pytest.raises(RuntimeError, match="boom"), full_precision():
            assert _knob_state() == ["ieee"] * len(knobs)
            raise RuntimeError("boom in a with block")
        assert _knob_state() == chosen
    finally:
        hook.remove()
        for k, v in zip(knobs, before):
            k.fp32_precision = v


def test_dtype_option_float64_is_tighter_in_rounding_only_and_sound():
    net = conv_net(channels=1, side=6, classes=4, bn=True).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 6, 6, generator=gen)
    y = torch.arange(6) % 4
    for method in METHODS:
        lb32, ub32 = output_bounds(net, x, 0.05, method)
        lb64, ub64 = output_bounds(net, x, 0.05, method, dtype="float64")
        assert lb64.dtype == ub64.dtype == torch.float64 and lb32.dtype == torch.float32
        torch.testing.assert_close(lb64.float(), lb32, atol=1e-4, rtol=1e-4)
        m64 = margin_lower_bounds(net, x, y, 0.05, method, dtype=torch.float64)
        assert m64.dtype == torch.float64
    # the float64 bounds contain the net evaluated in float64 at points of the ball
    net64 = conv_net(channels=1, side=6, classes=4, bn=True).eval().double()
    lb64, ub64 = output_bounds(net, x, 0.05, "CROWN", dtype="float64")
    pts = points_in_ball(net64, x.double(), 0.05, pgd=False)
    assert_contained(lb64, ub64, values_at(net64, pts), 1e-12, "float64 CROWN")
    with pytest.raises(ValueError, match="float32, float64"):
        output_bounds(net, x, 0.05, dtype="float16")
    with pytest.raises(ValueError, match="torch.float32 or torch.float64"):
        output_bounds(net, x, 0.05, dtype=torch.bfloat16)


def test_a_half_precision_net_is_bounded_in_float32():
    net = _mlp().to(torch.bfloat16)
    ref = _mlp()
    with torch.no_grad():  # the same (bf16-representable) weights in float32
        for p, q in zip(ref.parameters(), net.parameters()):
            p.copy_(q.float())
    x, _ = _data(8)
    lb, ub = output_bounds(net, x, EPS, "CROWN-IBP")
    assert lb.dtype == torch.float32
    rlb, rub = output_bounds(ref, x, EPS, "CROWN-IBP")
    assert torch.equal(lb, rlb) and torch.equal(ub, rub)


@pytest.mark.parametrize("method", METHODS)
def test_box_bounds_of_the_ball_equal_the_ball_bounds(method):
    net = conv_net(channels=1, side=6, classes=4, bn=True).eval()
    x = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    y = torch.arange(5) % 4
    lo, hi = input_box(x, 0.04)
    lb, ub = output_bounds(net, x, 0.04, method)
    blb, bub = box_bounds(net, lo, hi, method, x=x)
    torch.testing.assert_close(blb, lb, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bub, ub, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(box_margin_lower_bounds(net, lo, hi, y, method, x=x),
                               margin_lower_bounds(net, x, y, 0.04, method), atol=1e-6, rtol=1e-6)


def test_box_bounds_contain_the_box_and_check_their_input():
    net = conv_net(channels=1, side=6, classes=4, bn=False).eval().double()
    gen = torch.Generator().manual_seed(4)
    centre = 0.2 + 0.6 * torch.rand(4, 1, 6, 6, generator=gen, dtype=torch.float64)
    radius = 0.05 * torch.rand(4, 1, 6, 6, generator=gen, dtype=torch.float64)  # not a ball
    lo, hi = centre - radius, centre + radius
    for method in METHODS:
        lb, ub = box_bounds(net, lo, hi, method)
        pts = lo + (hi - lo) * torch.rand((128,) + lo.shape, generator=gen, dtype=torch.float64)
        assert_contained(lb, ub, values_at(net, pts), 1e-9, f"box {method}")
    with pytest.raises(ValueError, match="lower corner exceeds"):
        box_bounds(net, hi, lo)
    with pytest.raises(ValueError, match=r"pixel box \[0, 1\]"):
        box_bounds(net, lo - 1, hi)
    with pytest.raises(ValueError, match="x must lie inside the box"):
        box_bounds(net, lo, hi, x=hi + 0.01)
    with pytest.raises(ValueError, match="differ in shape"):
        box_bounds(net, lo, hi[:2])


# -- stages and certification under mixed precision --------------------------------------------------

def test_cert_stage_under_bf16_mixed_reports_full_precision_metrics(tmp_path):
    """Lightning's bf16-mixed (CPU autocast) for the cert stage: training runs, and the test metrics
    in the manifest are those of the exported weights evaluated in float32."""
    from ace_lightning.nets import build_net
    from ace_lightning.registry import run_stage
    from ace_lightning.config import datamodule_from
    from stage_utils import CERT_TINY, compose_cfg

    cfg = compose_cfg(tmp_path, CERT_TINY + ["trainer.precision=bf16-mixed", "stage.val_pgd_steps=0"])
    manifest = run_stage(cfg)
    dm = datamodule_from(cfg)
    dm.setup("test")
    net = build_net(manifest["net"], dm.info)
    net.load_state_dict(torch.load(tmp_path / manifest["config"]["data"]["name"] / "eps_0.03" / "cert" / "cert.pt",
                                   weights_only=True))
    net.eval()
    nat, ibp, n = 0, 0, 0
    for x, y in dm.test_dataloader():
        with torch.no_grad():
            nat += int((net(x).argmax(-1) == y).sum())
        ibp += int((margin_lower_bounds(net, x, y, 0.03, "IBP").min(1).values > 0).sum())
        n += len(y)
    assert manifest["metrics"]["test/nat_acc"] == pytest.approx(nat / n, abs=1e-6)
    assert manifest["metrics"]["test/ibp_cert_acc"] == pytest.approx(ibp / n, abs=1e-6)


@pytest.mark.parametrize("stage", ["cert", "gate", "entropy"])
def test_half_precision_weights_are_refused_for_certified_training(tmp_path, stage):
    from ace_lightning.registry import run_stage
    from stage_utils import compose_cfg

    overrides = [f"stage={stage}", "eps=0.03", "trainer.precision=bf16-true"]
    with pytest.raises(ValueError, match="need float32 weights") as err:
        run_stage(compose_cfg(tmp_path, overrides))
    assert "\n" not in str(err.value)


def test_certify_stage_records_are_identical_under_bf16_mixed(tmp_path):
    """The whole certify stage with trainer.precision=bf16-mixed writes the records of the float32
    run, byte for byte; the manifest says what was re-checked in float64."""
    from ace_lightning.registry import run_stage
    from stage_utils import compose_cfg

    base = ["data.subset=96", "data.dataset_kwargs.num_classes=3", "data.dataset_kwargs.input_shape=[1,12,12]",
            "eps=0.05", "net@cert_net=fc", "net@core_net=fc", "run_name=run"]
    run_stage(compose_cfg(tmp_path, base + ["stage=core", "stage.epochs=1", "stage.eval_pgd_steps=0"]))
    run_stage(compose_cfg(tmp_path, base + ["stage=cert", "stage.epochs=2", "stage.warmup_epochs=0",
                                             "stage.ramp_epochs=1", "stage.val_pgd_steps=0"]))
    run_stage(compose_cfg(tmp_path, base + ["stage=gate", "stage.epochs=1", "stage.ramp_epochs=1"]))
    certify = base + ["stage=certify", "++stage_overrides.certify.attack.steps=2",  # over debug=tiny's
                      "++stage_overrides.certify.methods=[IBP,CROWN-IBP,CROWN]",
                      "++stage_overrides.certify.refine_methods=[CROWN]"]
    first = run_stage(compose_cfg(tmp_path, certify))
    records = (tmp_path / "run" / "certify" / "records.csv").read_bytes()
    again = run_stage(compose_cfg(tmp_path, certify + ["trainer.precision=bf16-mixed", "overwrite=true"]))
    assert (tmp_path / "run" / "certify" / "records.csv").read_bytes() == records
    header = records.decode().splitlines()[0].split(",")
    for column in ("cert_margin", "cert_method", "gate_method", "rechecked", "recheck_flipped", "dtype"):
        assert column in header
    prec = again["precision"]
    assert prec["dtype"] == "float32" and prec["recheck_tol"] == 1e-3
    assert prec["trainer_precision_ignored"] == "bf16-mixed" and first["precision"]["trainer_precision_ignored"] is None
    for split in ("val", "test"):
        assert set(prec[split]) == {"inputs", "rechecked", "rechecked_cert_ok", "decisions_changed_by_float64"}
        assert prec[split]["rechecked"] >= prec[split]["decisions_changed_by_float64"] >= 0
    assert prec["refined_at"]["thresholds"], "the operating points' thresholds were refined"
    # every reported operating point and the exported threshold were refined and re-checked
    import json

    points = json.loads((tmp_path / "run" / "certify" / "operating_points.json").read_text())["operating_points"]
    refined = set(prec["refined_at"]["thresholds"])
    assert {p["threshold"] for p in points if abs(p["threshold"]) != float("inf")} <= refined
    exported = again["chosen_operating_point"]["threshold"]
    assert exported in refined or abs(exported) == float("inf")
