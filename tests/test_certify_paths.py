"""Every certification path faces an attack (issue 21): refinement at a threshold, the float64
re-check, budget-limited inputs, core-route certificates (ub_g < T), entropy selection on a
10-class conv net with very confident logits, and a cascade of two pairs.

Each path certifies float32 records with certify_batch (what the certify stage and predict run),
then the audit's attacks (ace_lightning.audit_attacks.attack_check: every certified input, the recorded
bounds themselves and the composed model as deployed) must find no violation. Each test also
breaks its path's bound on purpose (the bound shrunk toward the value at x: too tight, so no
longer a bound over the ball, yet consistent at x) and asserts that the same attack sees it:
a test that cannot fail would prove nothing."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

from ace_lightning import ace as ace_module
from ace_lightning.ace import ACEModel, CertifySettings, certify_batch, composed_certified
from ace_lightning.audit_attacks import attack_check
from ace_lightning.audit_claims import AuditSettings, read_claims
from ace_lightning.bounds import METHODS, ladder, margin_lower_bounds, output_bounds, robust_ce_loss
from ace_lightning.nets import init_gate_from_cert
from ace_lightning.records import Records

SHAPE, K = (1, 8, 8), 10
EPS_TRAIN, EPS = 0.08, 0.13   # certified at a larger eps than trained for: a mix of certified and not
POS = [(r, c) for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)][:K]
INFO = {"name": "synthetic", "input_shape": list(SHAPE), "num_classes": K, "mean": [0.5], "std": [0.3]}
AUDIT = AuditSettings(steps=25, restarts=2, step_size=0.25, progress=False)
SHRINK = 0.9  # a broken bound: 90% of the way from the sound bound to the value at x


def _data(n: int, seed: int):
    """Ten classes: a bright 2x2 patch at one of ten places on an 8x8 image, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=gen)
    x = 0.4 * torch.rand(n, *SHAPE, generator=gen)
    for c, (r, q) in enumerate(POS):
        x[y == c, 0, r:r + 2, q:q + 2] += 0.5
    return x.clamp(0, 1), y


def _spec(selection: str = "gate", pairs: int = 1) -> dict:
    branch = {"selection": selection, "threshold": 0.0, "cert_net": {"name": "small", "kind": "cert"}}
    if selection == "gate":
        branch["gate_net"] = {"name": "small", "kind": "gate"}
    return {"data": INFO, "eps": EPS, "core_net": {"name": "small", "kind": "cert"}, "branches": [branch] * pairs}


def _ibp_train(net: nn.Module, x, y, steps: int = 200, lr: float = 1e-2) -> nn.Module:
    """Natural warm-up, then IBP with eps ramped to 1.05 x EPS_TRAIN (docs/METHOD.md 6.3)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        eps = 1.05 * EPS_TRAIN * min(1.0, max(0.0, step - 0.3 * steps) / (0.4 * steps))
        opt.zero_grad()
        loss = robust_ce_loss(net, x, y, eps, "IBP") if eps > 0 else nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    return net.eval()


def _gate_train(gate: nn.Module, cert: nn.Module, x, y, steps: int = 60) -> nn.Module:
    """Worst-case BCE on the cert-net's IBP certificates (docs/METHOD.md 6.5)."""
    gate = init_gate_from_cert(gate, cert)
    with torch.no_grad():
        label = (margin_lower_bounds(cert, x, y, EPS, "IBP").min(1).values > 0).float()
    opt = torch.optim.Adam(gate.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        lb, ub = output_bounds(gate, x, EPS, "IBP")
        worst = torch.where(label.bool(), lb.squeeze(-1), ub.squeeze(-1))
        nn.functional.binary_cross_entropy_with_logits(worst, label).backward()
        opt.step()
    return gate.eval()


@pytest.fixture(scope="module")
def nets() -> dict:
    """An IBP-trained core (certifiable, for core-route certificates), two IBP cert-nets and their
    gates, and the test inputs."""
    torch.manual_seed(0)
    two = ACEModel.from_spec(_spec(pairs=2))
    x, y = _data(512, 1)
    _ibp_train(two.core, x, y)
    for i in range(2):
        torch.manual_seed(10 + i)
        _ibp_train(two.certs[i], x, y, steps=200 - 60 * i)  # the second pair: a weaker cert-net
        _gate_train(two.gates[str(i)], two.certs[i], x, y)
    xt, yt = _data(128, 2)
    return {"two": two.eval(), "x": xt, "y": yt}


def _one_pair(nets: dict, selection: str = "gate", scale: float = 1.0) -> ACEModel:
    two = nets["two"]
    cert = two.certs[0]
    if scale != 1.0:
        import copy

        cert = copy.deepcopy(cert)
        with torch.no_grad():
            cert[-1].weight.mul_(scale)
            cert[-1].bias.mul_(scale)
    gates = [two.gates["0"]] if selection == "gate" else [None]
    return ACEModel(two.core, [cert], gates, [0.0], _spec(selection)).eval()


def _records(model: ACEModel, rec: dict) -> Records:
    n = rec["label"].shape[0]
    cols = {k: v.detach().cpu().numpy() for k, v in rec.items()}
    return Records(cols | {"index": np.arange(n), "split": np.array(["test"] * n)})


def _violations(model: ACEModel, nets: dict, rec: dict, thresholds) -> tuple[int, int]:
    """(certified inputs at ``thresholds``, violations the audit's attacks find)."""
    model.set_thresholds(list(thresholds))
    claims = read_claims(_records(model, rec), np.asarray(thresholds, dtype=np.float64))
    report = attack_check(model, nets["x"], nets["y"], claims, EPS, AUDIT)
    return int(claims.certified.sum()), int(report["violations"])


def _verdict(model: ACEModel, nets: dict, rec: dict, thresholds, broken: bool, records_hold: bool = True) -> None:
    """A path's verdict: with its bound broken on purpose the audit's attacks find a violation;
    intact, some inputs are certified, none is broken, and (``records_hold``) the float32 records
    contain the deployed model's values at sampled points."""
    certified, violations = _violations(model, nets, rec, thresholds)
    if broken:
        assert violations > 0
    else:
        assert certified > 0 and violations == 0
        if records_hold:
            _assert_float32_records_hold(model, nets, rec)


def _assert_float32_records_hold(model: ACEModel, nets: dict, rec: dict) -> None:
    """The float32 records themselves (not a float64 copy) contain the deployed model's values at
    sampled points of every ball: g(x') in [lb_g, ub_g], the cert-net's margin >= cert_margin."""
    x, y = nets["x"], nets["y"]
    gen = torch.Generator().manual_seed(3)
    n = model.num_branches
    sfx = [""] if n == 1 else [f"_{i + 1}" for i in range(n)]
    with torch.no_grad():
        for _ in range(16):
            z = (x + EPS * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)
            z = torch.max(torch.min(z, x + EPS), x - EPS)
            for i, s in enumerate(sfx):
                assert rec[f"lb_g{s}"].dtype == torch.float32
                g = model.gate_value(i, z)
                assert (g >= rec[f"lb_g{s}"].double()).all() and (g <= rec[f"ub_g{s}"].double()).all()
                logits = model.certs[i](z)
                m = ace_module.margin_at(logits, y).double()
                assert (m >= rec[f"cert_margin{s}"].double()).all()


def _no_containment_check(monkeypatch) -> None:
    """The broken runs skip certify_batch's own check that g(x) lies in its bounds, so that the
    attack, not that check, has to find the broken bound."""
    monkeypatch.setattr(ace_module, "check_contains", lambda *a, **k: None)


def _shrunk_selector(monkeypatch, model: ACEModel, pair: int, method: str | None) -> None:
    """Pair ``pair``'s selector interval (from ``method``, or every method) shrunk toward g(x)."""
    real = ACEModel.selector_bounds

    def broken(self, i, x, eps, method_=None, dtype=None):
        g, lb, ub = real(self, i, x, eps, method_, dtype=dtype)
        if self is model and i == pair and (method is None or method_ == method):
            lb, ub = lb + SHRINK * (g.to(lb.dtype) - lb), ub - SHRINK * (ub - g.to(ub.dtype))
        return g, lb, ub

    monkeypatch.setattr(ACEModel, "selector_bounds", broken)


# -- refinement at a threshold ------------------------------------------------------------------

REFINE = CertifySettings(methods=("IBP",), gate_methods=("IBP",), refine_methods=("CROWN",), recheck_tol=0.0,
                         time_budget_s=None, refute_steps=0)


@pytest.mark.parametrize("broken", [False, True])
def test_refinement_at_a_threshold(nets, monkeypatch, broken):
    model = _one_pair(nets)
    x, y = nets["x"], nets["y"]
    base = certify_batch(model, x, y, EPS, REFINE)
    T = float(np.quantile(base["lb_g"].numpy(), 0.4))
    if broken:
        _no_containment_check(monkeypatch)
        _shrunk_selector(monkeypatch, model, 0, "CROWN")
    rec = certify_batch(model, x, y, EPS, REFINE, thresholds=[[T]])
    refined = rec["gate_method"] == METHODS.index("CROWN")
    assert refined.any(), "some intervals straddle T and are refined"
    gained = composed_certified(rec["cert_ok"][:, None], rec["core_ok"], rec["lb_g"][:, None], rec["ub_g"][:, None],
                                [T], g=rec["g"][:, None]) & ~composed_certified(
        base["cert_ok"][:, None], base["core_ok"], base["lb_g"][:, None], base["ub_g"][:, None], [T], g=base["g"][:, None])
    assert gained.any(), "refinement certifies inputs IBP alone does not: the path is exercised"
    _verdict(model, nets, rec, [T], broken)


# -- the float64 re-check -----------------------------------------------------------------------

@pytest.mark.parametrize("broken", [False, True])
def test_float64_recheck(nets, monkeypatch, broken):
    """recheck_tol so wide that float64 decides nearly every input (margins and gate bounds)."""
    model = _one_pair(nets)
    x, y = nets["x"], nets["y"]
    settings = CertifySettings(methods=("IBP", "CROWN-IBP"), gate_methods=("IBP",), refine_methods=(),
                               recheck_tol=50.0, time_budget_s=None, refute_steps=0)
    probe = certify_batch(model, x, y, EPS, settings)
    T = float(np.quantile(probe["lb_g"].numpy(), 0.4))
    if broken:  # the float64 results shrunk toward the value at x
        _no_containment_check(monkeypatch)
        real_ladder, real_interval = ladder.margin_ladder, ladder.gate_interval

        def margins64(net, xs, ys, eps, methods, *, dtype=None, **kw):
            cert = real_ladder(net, xs, ys, eps, methods, dtype=dtype, **kw)
            if dtype == torch.float64:
                at_x = ace_module.margin_at(cert.logits, ys)
                cert.margin = cert.margin + SHRINK * (at_x.to(cert.margin.dtype) - cert.margin)
                cert.ok = cert.margin > 0
            return cert

        def interval64(bound, xs, methods, *, dtype=torch.float32):
            out = real_interval(bound, xs, methods, dtype=dtype)
            if dtype == torch.float64:
                out.lb = out.lb + SHRINK * (out.g.to(out.lb.dtype) - out.lb)
                out.ub = out.ub - SHRINK * (out.ub - out.g.to(out.ub.dtype))
            return out

        monkeypatch.setattr(ladder, "margin_ladder", margins64)
        monkeypatch.setattr(ladder, "gate_interval", interval64)
        monkeypatch.setattr(ace_module, "gate_interval", interval64)
    rec = certify_batch(model, x, y, EPS, settings, thresholds=[[T]])
    assert rec["rechecked"].float().mean() > 0.5, "float64 decided most inputs"
    _verdict(model, nets, rec, [T], broken)


# -- budget-limited inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("broken", [False, True])
def test_budget_limited_inputs(nets, monkeypatch, broken):
    """A budget that affords the tight methods to part of the inputs only: the certificates of
    both parts hold. Broken: the budget's bookkeeping gives results to the wrong inputs."""
    model = _one_pair(nets)
    x, y = nets["x"], nets["y"]
    settings = CertifySettings(methods=("IBP", "CROWN-IBP", "CROWN"), gate_methods=("IBP",), refine_methods=(),
                               recheck_tol=0.0, time_budget_s=1e-9, refute_steps=0)
    ladder._COSTS.clear()
    real_afford = ladder.Budget.affordable
    monkeypatch.setattr(ladder.Budget, "affordable", lambda self, idx, key: idx[::2])  # half can afford it
    if broken:
        _no_containment_check(monkeypatch)
        real_timed = ladder._timed

        def misfiled(fn, idx, budget, key):
            run, result = real_timed(fn, idx, budget, key)
            if result is not None and run.numel() > 1:
                result = torch.maximum(result, result.roll(1))  # an input gets a neighbour's certificate
            return run, result

        monkeypatch.setattr(ladder, "_timed", misfiled)
    rec = certify_batch(model, x, y, EPS, settings)
    monkeypatch.setattr(ladder.Budget, "affordable", real_afford)
    assert (rec["cert_method"] > 0).any(), "the tight methods certified some of the affordable inputs"
    T = float(np.quantile(rec["lb_g"].numpy(), 0.3))
    _verdict(model, nets, rec, [T], broken, records_hold=False)


# -- core-route certificates --------------------------------------------------------------------

@pytest.mark.parametrize("broken", [False, True])
def test_core_route_certificates(nets, monkeypatch, broken):
    """ub_g < T: the core answers on the whole ball, certified by core_method (the core here is
    IBP-trained, so IBP certifies it)."""
    model = _one_pair(nets)
    x, y = nets["x"], nets["y"]
    settings = CertifySettings(methods=("IBP",), gate_methods=("IBP", "CROWN-IBP"), refine_methods=(),
                               recheck_tol=0.0, time_budget_s=None, refute_steps=0, core_method="CROWN")
    if broken:
        _no_containment_check(monkeypatch)
        real = ace_module.margin_lower_bounds

        def shrunk(net, xs, ys, eps, method, **kw):
            lb = real(net, xs, ys, eps, method, **kw)
            if net is model.core:
                with torch.no_grad():
                    z = net(xs.to(lb.dtype) if lb.dtype != xs.dtype else xs).to(lb.dtype)
                at_x = z.gather(-1, ys.view(-1, 1)) - z
                at_x = torch.cat([at_x[i][torch.arange(K) != ys[i]].unsqueeze(0) for i in range(len(ys))])
                lb = lb + SHRINK * (at_x - lb)
            return lb

        monkeypatch.setattr(ace_module, "margin_lower_bounds", shrunk)
    rec = certify_batch(model, x, y, EPS, settings)
    T = float(np.quantile(rec["ub_g"].numpy(), 0.6))
    core_route = (rec["ub_g"].double() < T) & rec["core_ok"]
    assert core_route.any(), "some inputs are certified through the core"
    _verdict(model, nets, rec, [T], broken, records_hold=False)


# -- entropy selection on a very confident net ----------------------------------------------------

def test_entropy_of_a_very_confident_net_is_never_an_empty_interval(nets):
    """The audit's case: the cert-net with its last layer scaled by 50, so that H underflows in
    float32 (and in float64 for most inputs). ub_H stays > 0 (lb_g < 0 = -0.0), g(x) lies in every
    interval, and at T = -0.0 nothing is certified by predict or by the records."""
    model = _one_pair(nets, "entropy", scale=50.0)
    x, y = nets["x"], nets["y"]
    with torch.no_grad():
        logits = model.certs[0](x)
    m = ace_module.margin_at(logits, logits.argmax(-1))
    assert (m > 745).float().mean() > 0.3, "margins beyond float64's exp range: the underflow case"
    rec = certify_batch(model, x, y, EPS, CertifySettings(methods=("IBP",), gate_methods=("IBP", "CROWN-IBP"),
                                                         refine_methods=(), recheck_tol=0.0, time_budget_s=None))
    lb, ub, g = rec["lb_g"].double(), rec["ub_g"].double(), rec["g"]
    assert (lb < 0).all() and (lb <= g).all() and (g <= ub).all() and (lb <= ub).all()
    assert (rec["cert_ok"]).any()
    assert not composed_certified(rec["cert_ok"][:, None], rec["core_ok"], rec["lb_g"][:, None],
                                  rec["ub_g"][:, None], [-0.0], g=rec["g"][:, None]).any()
    model.set_thresholds([-0.0])
    for tol in (0.0, 1e-3):
        settings = CertifySettings(methods=("IBP",), gate_methods=("IBP", "CROWN-IBP"), refine_methods=(),
                                   recheck_tol=tol, time_budget_s=None)
        assert not model.predict(x, eps=EPS, settings=settings)["certified"].any()


@pytest.mark.parametrize("broken", [False, True])
def test_entropy_selection_on_a_very_confident_net(nets, monkeypatch, broken):
    """At every breakpoint the sweep can pick (the records' lb_g values and -0.0), the attack
    finds no certified input it can break. Broken: the float64 slack and floor removed, as before
    the fix, so that ub_H underflows to 0 in float32 records."""
    entropy_module = importlib.import_module("ace_lightning.bounds.entropy")  # the package exports a function of that name

    model = _one_pair(nets, "entropy", scale=50.0)
    x, y = nets["x"], nets["y"]
    settings = CertifySettings(methods=("IBP",), gate_methods=("IBP", "CROWN-IBP"), refine_methods=(),
                               recheck_tol=0.0, time_budget_s=None)
    if broken:
        _no_containment_check(monkeypatch)
        monkeypatch.setattr(entropy_module, "_h_slack", lambda mag, scale, k: torch.zeros_like(mag))
        monkeypatch.setattr(entropy_module, "_to_dtype_outward", lambda lo, hi, dtype: (lo.to(dtype), hi.to(dtype)))
        import ace_lightning.bounds.outward as outward

        monkeypatch.setattr(outward, "widen", lambda lb, ub, *a: (lb, ub))
    rec = certify_batch(model, x, y, EPS, settings)
    lbs = np.unique(rec["lb_g"].numpy())
    picks = sorted({-0.0, float(lbs[-1]), float(np.quantile(lbs, 0.5)), float(np.quantile(lbs, 0.9))})
    total = 0
    for T in picks:
        certified, violations = _violations(model, nets, rec, [T])
        total += violations
        if not broken:
            assert violations == 0, T
    if broken:
        assert total > 0
    else:
        _assert_float32_records_hold(model, nets, rec)


# -- a cascade of two pairs -----------------------------------------------------------------------

@pytest.mark.parametrize("broken", [False, True])
def test_cascade_of_two_pairs(nets, monkeypatch, broken):
    model = nets["two"]
    x, y = nets["x"], nets["y"]
    settings = CertifySettings(methods=("IBP", "CROWN-IBP"), gate_methods=("IBP", "CROWN-IBP"), refine_methods=(),
                               recheck_tol=0.0, time_budget_s=None, refute_steps=0)
    if broken:
        _no_containment_check(monkeypatch)
        _shrunk_selector(monkeypatch, model, 1, None)
    rec = certify_batch(model, x, y, EPS, settings)
    T = (float(np.quantile(rec["lb_g_1"].numpy(), 0.6)), float(np.quantile(rec["lb_g_2"].numpy(), 0.4)))
    stack = lambda name: torch.stack([rec[f"{name}_1"], rec[f"{name}_2"]], dim=1)  # noqa: E731
    certified = composed_certified(stack("cert_ok"), rec["core_ok"], stack("lb_g"), stack("ub_g"), list(T),
                                   g=stack("g"))
    via_second = certified & (rec["ub_g_1"].double() < T[0]) & (rec["lb_g_2"].double() >= T[1])
    assert via_second.any(), "some inputs are certified through the second pair"
    _verdict(model, nets, rec, T, broken)


# -- refinement covers every reported threshold ---------------------------------------------------

def test_refinement_covers_every_reported_operating_point(nets):
    """The certify stage's refinement loop: after it, every operating point chosen on val (the
    reported ones and the exported one) is a threshold the records were refined and re-checked
    at, no interval got looser, and no input straddles such a T without the refine method."""
    from torch.utils.data import DataLoader, TensorDataset

    from ace_lightning.certify_pass import IndexedSubset, refine_at_operating_points
    from ace_lightning.records import record_columns
    from ace_lightning.operating import val_operating_thresholds

    import copy

    model = _one_pair(nets)
    model.certs[0] = copy.deepcopy(model.certs[0])
    with torch.no_grad():  # classes 0 and 1 swapped: a cert-net less accurate than the core, so the
        for p in (model.certs[0][-1].weight, model.certs[0][-1].bias):  # val choice lands on finite T
            p[[0, 1]] = p[[1, 0]].clone()
    x, y = nets["x"], nets["y"]
    settings = CertifySettings(methods=("IBP",), gate_methods=("IBP",), refine_methods=("CROWN",), recheck_tol=1e-3,
                               time_budget_s=None, refute_steps=0)
    half = x.shape[0] // 2
    loaders, parts = {}, []
    for split, rows in (("val", slice(0, half)), ("test", slice(half, None))):
        idx = list(range(x[rows].shape[0]))
        loaders[split] = DataLoader(IndexedSubset(TensorDataset(x[rows], y[rows]), idx), batch_size=64)
        rec = certify_batch(model, x[rows], y[rows], EPS, settings)
        rec["index"], rec["split"] = torch.as_tensor(idx), np.array([split] * len(idx))
        parts.append(record_columns(rec, []))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    before = {k: cols[k].copy() for k in ("lb_g", "ub_g")}
    summary = refine_at_operating_points(model, loaders, cols, EPS, settings, None, grid=21)
    assert summary["inputs_redone"] > 0
    chosen = val_operating_thresholds(cols, 21)
    assert chosen and set(chosen) <= set(summary["thresholds"])
    lb, ub = np.asarray(cols["lb_g"], float), np.asarray(cols["ub_g"], float)
    assert (lb >= before["lb_g"]).all() and (ub <= before["ub_g"]).all()
    crown = np.asarray(cols["gate_method"]).astype(str) == "CROWN"
    for T in summary["thresholds"]:
        assert not ((lb < T) & (ub >= T) & ~crown).any(), T


# -- margin selection -------------------------------------------------------------------------------

@pytest.mark.parametrize("broken", [False, True])
def test_margin_selection_with_class_thresholds(nets, monkeypatch, broken):
    """Margin selection with per-class thresholds chosen exactly on the records: no certified
    input is broken by the gate-aware attack (it pushes the gap across its class's threshold as
    well as the label), and no point of a certified ball has a gap below the recorded lb_gap.
    Broken: the gap's lower bound shrunk toward the gap at x."""
    from ace_lightning.attacks.pgd import frozen, pgd_minimize
    from ace_lightning.attacks.composed import attack_composed
    from ace_lightning.bounds.gap import gap
    from ace_lightning.operating import choose_class_thresholds

    two = nets["two"]
    model = ACEModel(two.core, [two.certs[0]], [None], [0.0], _spec("margin"), ["margin"]).eval()
    x, y = nets["x"], nets["y"]
    settings = CertifySettings(methods=("IBP", "CROWN-IBP"), gate_methods=("IBP",), refine_methods=(),
                               recheck_tol=0.0, time_budget_s=None, refute_steps=0)
    if broken:
        _no_containment_check(monkeypatch)
        import ace_lightning.bounds.gap as gap_module
        import ace_lightning.selections as selections

        real = gap_module.gap_bounds

        def shrunk(net, xs, eps, method="IBP", **kw):
            g, lb, ub = real(net, xs, eps, method, **kw)
            return g, torch.where(lb > 0, lb + SHRINK * (g.to(lb.dtype) - lb), lb), ub

        monkeypatch.setattr(selections, "gap_bounds", shrunk)  # the margin selection's bounds
        monkeypatch.setattr(ladder, "margin_ladder", _shrunk_ladder(ladder.margin_ladder))
        monkeypatch.setattr(ace_module, "margin_ladder", _shrunk_ladder(ladder.margin_ladder))
    rec = certify_batch(model, x, y, EPS, settings)
    cols = _records(model, rec).columns | {"selection": np.array(["margin"] * len(y))}
    records = Records(cols)
    chosen = choose_class_thresholds(records, float(np.mean(cols["core_correct"])) - 0.02, 0.0, K)
    assert chosen is not None
    kappa = np.asarray(chosen["class_thresholds"])
    certified = composed_certified(rec["cert_ok"][:, None], rec["core_ok"], rec["lb_g"][:, None], rec["ub_g"][:, None],
                                   [0.0], g=rec["g"][:, None], kappa=kappa[None], cls=rec["cert_pred"][:, None])
    assert certified.any() and (~certified).any()
    model.set_class_thresholds(0, kappa.tolist())
    rows = certified.nonzero().flatten()
    ok, _ = attack_composed(model, x[rows], y[rows], EPS, [0.0], steps=25, restarts=2, step_size=0.25,
                            loss="margin", generator=torch.Generator().manual_seed(0))
    lb = rec["lb_g"][rows].double()
    with frozen(model):
        lowest, _ = pgd_minimize(lambda z, idx: gap(model.certs[0](z)), x[rows], EPS, steps=25, step_size=0.25,
                                 restarts=2, generator=torch.Generator().manual_seed(1))
    violations = int((~ok).sum()) + int((lowest < lb).sum())
    if broken:
        assert violations > 0
    else:
        assert violations == 0


def _shrunk_ladder(real):
    """The cert ladder with its certified margins shrunk toward the margin at x (a broken bound)."""
    def ladder_(net, xs, ys, eps, methods, **kw):
        cert = real(net, xs, ys, eps, methods, **kw)
        at_x = ace_module.margin_at(cert.logits, ys)
        cert.margin = torch.where(cert.margin > 0, cert.margin + SHRINK * (at_x.to(cert.margin.dtype) - cert.margin),
                                  cert.margin)
        return cert
    return ladder_
