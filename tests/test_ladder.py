"""Cheap-to-tight certification and the float64 re-check (bounds/ladder.py, ace.certify_batch).

The re-check tests simulate float32 rounding that makes a lower bound too high (the measured
failure under autocast, at a smaller scale): without the re-check the ladder certifies an input
whose float64 margin is negative, with it the certificate is withdrawn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ace_lightning.ace import ACEModel, CertifySettings, certify_batch, composed_certified
from ace_lightning.bounds import ladder, lirpa, margin_lower_bounds, output_bounds
from ace_lightning.bounds.ladder import NO_METHOD, gate_interval, margin_ladder, refine_gate
from bound_checks import conv_net

EPS = 0.03


def _net(seed: int = 0) -> nn.Module:
    return conv_net(channels=1, side=6, classes=4, bn=True, seed=seed).eval()


def _x(n: int = 64, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=gen)


def _labels(net, x):
    with torch.no_grad():
        return net(x).argmax(-1)


def test_each_input_stops_at_the_first_method_that_certifies():
    net, x = _net(), _x()
    y = _labels(net, x)
    methods = ["IBP", "CROWN-IBP", "CROWN"]
    cert = margin_ladder(net, x, y, EPS, methods, refute=None)
    per = torch.stack([margin_lower_bounds(net, x, y, EPS, m).min(1).values > 0 for m in methods])
    first = torch.where(per.any(0), per.float().argmax(0), torch.full_like(y, NO_METHOD))
    assert torch.equal(cert.ok, per.any(0))
    assert torch.equal(cert.method, first)
    assert (cert.method > 0).any(), "the tiny net should need a tighter method for some input"
    assert cert.ok.any() and not cert.ok.all()


def test_tight_methods_skip_misclassified_and_refuted_inputs(monkeypatch):
    net, x = _net(), _x()
    y = (_labels(net, x) + torch.arange(64) % 2) % 4  # half of them misclassified at x
    seen: list[int] = []
    real = ladder.margin_lower_bounds

    def counting(net_, xs, ys, eps, method, **kw):
        if method != "IBP":
            seen.append(xs.shape[0])
        return real(net_, xs, ys, eps, method, **kw)

    monkeypatch.setattr(ladder, "margin_lower_bounds", counting)
    asked: list[torch.Tensor] = []

    def refute_all(idx):
        asked.append(idx)
        return torch.ones(idx.numel(), dtype=torch.bool)

    cert = margin_ladder(net, x, y, EPS, ["IBP", "CROWN"], refute=refute_all)
    assert seen == []  # every remaining input refuted: CROWN never ran
    correct = _labels(net, x) == y
    assert set(asked[0].tolist()) == set((~cert.ok & correct).nonzero().flatten().tolist())
    margin_ladder(net, x, y, EPS, ["IBP", "CROWN"], refute=None)
    assert seen and seen[0] >= int((~cert.ok & correct).sum())  # padded to a power of two
    assert seen[0] == 1 << (int((~cert.ok & correct).sum()) - 1).bit_length()


def test_time_budget_is_per_input_and_learns_each_methods_cost():
    net, x = _net(4), _x()
    y = _labels(net, x)
    ladder._COSTS.clear()
    methods = ["IBP", "CROWN-IBP", "CROWN"]
    first = margin_ladder(net, x, y, EPS, methods, time_budget_s=1e-12)
    # unknown costs: each tighter method is measured on one input, then nobody can afford it
    assert int((first.method > 0).sum()) <= 2
    again = margin_ladder(net, x, y, EPS, methods, time_budget_s=1e-12)
    assert (again.method <= 0).all()  # the costs are known now: only IBP fits the budget
    roomy = margin_ladder(net, x, y, EPS, methods, time_budget_s=60.0)
    assert torch.equal(roomy.ok, margin_ladder(net, x, y, EPS, methods).ok)


def _biased(monkeypatch, bias: float):
    """Every float32 bound comes out ``bias`` too high (lower) / too low (upper): an unsound
    float32 computation, as under autocast. float64 bounds stay exact."""
    real = lirpa._compute_bounds

    def unsound(bounded, bx, C, method, beta, lower, upper):
        logits, lb, ub = real(bounded, bx, C, method, beta, lower, upper)
        if lb is not None and lb.dtype == torch.float32:
            lb = lb + bias
            ub = None if ub is None else ub - bias
        return logits, lb, ub

    monkeypatch.setattr(lirpa, "_compute_bounds", unsound)


def _on_the_edge(net, x, y, index: int, method: str = "IBP") -> nn.Module:
    """Shift the true class's bias so that input ``index`` has a float64 certified margin of -1e-7."""
    m = margin_lower_bounds(net, x[index:index + 1], y[index:index + 1], EPS, method, dtype="float64").min()
    with torch.no_grad():
        net[-1].bias[y[index]] += float(-m - 1e-7)
    m = margin_lower_bounds(net, x[index:index + 1], y[index:index + 1], EPS, method, dtype="float64").min()
    assert -1e-6 < float(m) < 0
    return net


def test_recheck_withdraws_a_certificate_float32_rounding_made(monkeypatch):
    net, x = _net(), _x(16)
    y = _labels(net, x)
    net = _on_the_edge(net, x, y, 0)
    _biased(monkeypatch, 1e-3)  # beyond the outward slack (bounds/outward.py: ~1.5e-5 x scale)
    unsafe = margin_ladder(net, x, y, EPS, ["IBP"], recheck_tol=0.0)
    assert bool(unsafe.ok[0]), "the biased float32 bound certifies the edge input (a false certificate)"
    safe = margin_ladder(net, x, y, EPS, ["IBP"], recheck_tol=1e-2)
    assert not bool(safe.ok[0]) and bool(safe.rechecked[0]) and bool(safe.flipped[0])
    # inputs far from the decision are left to float32
    far = unsafe.margin.abs() > 1e-1
    assert not safe.rechecked[far].any()
    assert torch.equal(safe.ok[far], unsafe.ok[far])


def test_recheck_of_the_gate_interval_at_a_threshold(monkeypatch):
    gate = _net(1)
    x = _x(16)

    def bound(xs, method, dtype):
        lb, ub, g = output_bounds(gate, xs, EPS, method, return_logits=True, dtype=dtype)
        return g[:, 0], lb[:, 0], ub[:, 0]

    exact = gate_interval(bound, x, ["IBP"], dtype=torch.float64)
    T = float(exact.lb[3].detach()) + 1e-7  # input 3 is NOT certifiably routed at T
    _biased(monkeypatch, 1e-3)
    f32 = gate_interval(bound, x, ["IBP"])
    assert float(f32.lb[3]) >= T  # float32 (biased) claims it is
    fixed = refine_gate(bound, x, f32, [T], ["IBP"], [], recheck_tol=1e-2)
    assert float(fixed.lb[3]) < T and bool(fixed.rechecked[3]) and bool(fixed.flipped[3])
    assert not fixed.rechecked[(f32.lb - T).abs() > 1e-1].any()


def test_refine_tightens_only_straddling_intervals_and_never_loosens():
    gate = _net(2)
    x = _x(64)

    def bound(xs, method, dtype):
        lb, ub, g = output_bounds(gate, xs, EPS, method, return_logits=True, dtype=dtype)
        return g[:, 0], lb[:, 0], ub[:, 0]

    base = gate_interval(bound, x, ["IBP"])
    T = float(base.ub.quantile(0.7))  # the intervals of 30% reach above T
    refined = refine_gate(bound, x, base, [T], ["IBP"], ["CROWN"])
    straddle = (base.lb < T) & (base.ub >= T)
    assert straddle.any() and (~straddle).any()
    assert (refined.lb >= base.lb).all() and (refined.ub <= base.ub).all()
    assert torch.equal(refined.lb[~straddle], base.lb[~straddle])
    assert (refined.method[straddle] == 1).all() and (refined.method[~straddle] == 0).all()
    crown_lb = bound(x, "CROWN", torch.float32)[1]
    torch.testing.assert_close(refined.lb[straddle], torch.maximum(base.lb, crown_lb)[straddle])


def _tiny_ace() -> ACEModel:
    info = {"name": "synthetic", "input_shape": [1, 6, 6], "num_classes": 4, "mean": [0.5], "std": [0.3]}
    spec = {"data": info, "eps": EPS, "core_net": {"name": "fc", "kind": "cert", "hidden": 16},
            "branches": [{"selection": "gate", "threshold": 0.0, "cert_net": {"name": "fc", "kind": "cert", "hidden": 12},
                          "gate_net": {"name": "fc", "kind": "gate", "hidden": 12}}]}
    torch.manual_seed(0)
    return ACEModel.from_spec(spec).eval()


def _near_tie_core() -> nn.Module:
    """Logits 0 and 1 differ by 2^-10 relative: float32 prefers class 1, bfloat16 sees a tie."""
    core = nn.Sequential(nn.Flatten(), nn.Linear(36, 4, bias=False))
    with torch.no_grad():
        r = torch.rand(36, generator=torch.Generator().manual_seed(0)) + 0.5
        core[1].weight.copy_(torch.stack([r, r * (1 + 2 ** -10), -r, -r]))
    return core.eval()


def test_certify_batch_under_bf16_autocast_equals_float32():
    model, x = _tiny_ace(), _x(48)
    model.core = _near_tie_core()
    y = torch.arange(48) % 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.core(x).argmax(-1)
    assert (model.core(x).argmax(-1) != mixed).sum() > 10  # what an unguarded certifier would record
    settings = CertifySettings(methods=("IBP", "CROWN-IBP", "CROWN"))
    ref = certify_batch(model, x, y, EPS, settings, thresholds=[[0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = certify_batch(model, x, y, EPS, settings, thresholds=[[0.0]])
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    f64 = certify_batch(model, x, y, EPS, CertifySettings(methods=("IBP", "CROWN-IBP", "CROWN"), dtype="float64"),
                        thresholds=[[0.0]])
    assert f64["lb_g"].dtype == torch.float64 and bool(f64["float64"].all())
    assert torch.equal(f64["cert_ok"], ref["cert_ok"])
    torch.testing.assert_close(f64["lb_g"].float(), ref["lb_g"], atol=1e-5, rtol=1e-5)


def test_predict_certifies_like_the_records():
    """predict(eps=) uses certify_batch with y = the predicted label: where the prediction is the
    true label it must say exactly what the records say at the model's threshold."""
    model, x = _tiny_ace(), _x(64)
    settings = CertifySettings(methods=("IBP", "CROWN"), refine_methods=("CROWN",))
    seen = []
    for T in (-0.2, 0.0, 0.2):
        model.set_thresholds([T])
        labels = model(x).argmax(-1)
        y = torch.where(torch.arange(64) % 3 == 0, (labels + 1) % 4, labels)  # some mistakes
        rec = certify_batch(model, x, y, EPS, settings, thresholds=[[T]])
        want = composed_certified(rec["cert_ok"][:, None], rec["core_ok"], rec["lb_g"][:, None],
                                  rec["ub_g"][:, None], torch.tensor([T]))
        got = model.predict(x, eps=EPS, settings=settings)["certified"]
        right = labels == y
        assert torch.equal(got[right], want[right])
        assert not want[~right].any()
        seen.append(want[right])
    seen = torch.cat(seen)
    assert seen.any() and not seen.all(), "a test that can fail: some certified, some not"


@pytest.mark.parametrize("bad, match", [
    ({"methods": ["PGD"]}, "unknown bound method"),
    ({"methods": []}, "at least one bound method"),
    ({"time_budget_s": 0}, "time_budget_s must be a positive"),
    ({"time_budget_s": -1.0}, "time_budget_s must be a positive"),
    ({"recheck_tol": -1e-3}, "recheck_tol must be >= 0"),
    ({"dtype": "float16"}, "dtype must be one of float32, float64"),
    ({"refute_steps": -1}, "refute_steps must be >= 0"),
])
def test_certify_settings_refuse_bad_input_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        CertifySettings.from_config(bad)
    assert "\n" not in str(err.value)


def test_certify_settings_from_config_keeps_defaults_for_null():
    s = CertifySettings.from_config({"methods": None, "gate_methods": ["ibp"], "time_budget_s": None,
                                     "batch_size": 7})
    assert s.methods == CertifySettings().methods and s.gate_methods == ("IBP",) and s.time_budget_s is None
    assert CertifySettings.from_config(s.as_dict()) == s
    assert np.isclose(CertifySettings.from_config({"recheck_tol": 0}).recheck_tol, 0.0)


@pytest.mark.parametrize("override, match", [("stage.time_budget_s=0", "time_budget_s must be a positive"),
                                             # debug=tiny sets the methods: its own dialect overrides them
                                             ("++stage_overrides.certify.methods=[IBP,PGD]", "unknown bound method 'PGD'"),
                                             ("stage.dtype=bfloat16", "dtype must be one of")])
def test_certify_stage_refuses_bad_settings_before_reading_anything(tmp_path, override, match):
    from ace_lightning.registry import run_stage
    from stage_utils import compose_cfg

    with pytest.raises(ValueError, match=match) as err:
        run_stage(compose_cfg(tmp_path, ["stage=certify", override]))  # no run folder needed to fail
    assert "\n" not in str(err.value)
