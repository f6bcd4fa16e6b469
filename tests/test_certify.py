"""The composed model and its certification: the routing rule, conditional execution, one-artefact
save/load, and the soundness test that must keep passing: on trained tiny models no input certified
by the composition is broken by the gate-aware attack, and certified <= adversarial <= natural at
every threshold."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from ace_lightning.ace import ACEModel, CertifySettings, certify_batch, composed_certified
from ace_lightning.attacks.composed import attack_composed
from ace_lightning.bounds import margin_lower_bounds, output_bounds, robust_ce_loss
from ace_lightning.nets import init_gate_from_cert
from ace_lightning.records import Records
from ace_lightning.sweep import evaluate, exact_thresholds

SHAPE, K = (1, 6, 6), 3
EPS = 0.15
INFO = {"name": "synthetic", "input_shape": list(SHAPE), "num_classes": K, "mean": [0.5], "std": [0.3]}


def _data(n: int, seed: int):
    """Three classes: a bright patch in one of three places, plus noise. Learnable and robust-ish."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=gen)
    x = 0.5 * torch.rand(n, *SHAPE, generator=gen)
    for c in range(K):
        x[y == c, 0, 2 * c:2 * c + 2, 1:5] += 0.35
    return x.clamp(0, 1), y


def _spec(selection: str = "gate") -> dict:
    branch = {"selection": selection, "threshold": 0.0, "cert_net": {"name": "fc", "kind": "cert", "hidden": 16}}
    if selection == "gate":
        branch["gate_net"] = {"name": "fc", "kind": "gate", "hidden": 16}
    return {"data": INFO, "eps": EPS, "core_net": {"name": "fc", "kind": "cert", "hidden": 32},
            "branches": [branch]}


@pytest.fixture(scope="module")
def trained() -> ACEModel:
    return train_tiny_ace()


def train_tiny_ace() -> ACEModel:
    """Core trained naturally, cert-net with IBP, gate trained to predict cert_ok with IBP bounds."""
    torch.manual_seed(0)
    model = ACEModel.from_spec(_spec())
    x, y = _data(512, 1)
    opt = torch.optim.Adam(model.core.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model.core(x), y).backward()
        opt.step()
    opt = torch.optim.Adam(model.certs[0].parameters(), lr=3e-3)
    for step in range(150):
        opt.zero_grad()
        eps = EPS * min(1.0, step / 100)
        loss = robust_ce_loss(model.certs[0], x, y, eps, "IBP") if eps > 0 else \
            nn.functional.cross_entropy(model.certs[0](x), y)
        loss.backward()
        opt.step()
    gate = init_gate_from_cert(model.gates["0"], model.certs[0])
    with torch.no_grad():
        label = (margin_lower_bounds(model.certs[0].eval(), x, y, EPS, "IBP").min(1).values > 0).float()
    opt = torch.optim.Adam(gate.parameters(), lr=3e-3)
    for _ in range(60):  # worst-case BCE: lower bound for label 1, upper bound for label 0
        opt.zero_grad()
        lb, ub = output_bounds(gate, x, EPS, "IBP")
        worst = torch.where(label.bool(), lb.squeeze(-1), ub.squeeze(-1))
        nn.functional.binary_cross_entropy_with_logits(worst, label).backward()
        opt.step()
    return model.eval()


def test_composed_rule_matches_brute_force_over_gate_outcomes():
    """Certified iff every branch reachable for some gate outcome consistent with the bounds is
    certified: enumerate the outcomes of each gate (fire / not) allowed by [lb_g, ub_g]."""
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 3):
        B = 400
        lb = torch.randn(B, n, generator=gen)
        ub = lb + torch.rand(B, n, generator=gen) * 1.5
        T = torch.randn(n, generator=gen) * 0.5
        cert_ok = torch.rand(B, n, generator=gen) > 0.4
        core_ok = torch.rand(B, generator=gen) > 0.7
        got = composed_certified(cert_ok, core_ok, lb, ub, T)
        for b in range(B):
            options = [[o for o in (True, False) if (o and ub[b, k] >= T[k]) or (not o and lb[b, k] < T[k])]
                       for k in range(n)]
            answering = set()
            for outcome in itertools.product(*options):
                answering.add(next((k for k, fire in enumerate(outcome) if fire), n))
            want = all(bool(cert_ok[b, k]) if k < n else bool(core_ok[b]) for k in answering)
            assert bool(got[b]) == want


def test_conditional_execution_gives_the_same_outputs(trained):
    x, _ = _data(64, 9)
    for T in (-5.0, -0.5, 0.0, 0.5, 5.0):
        trained.set_thresholds([T])
        logits, branch = trained.route(x)
        torch.testing.assert_close(logits, trained.forward_all(x))
    calls = []
    hook = trained.core.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    trained.set_thresholds([0.0])
    _, branch = trained.route(x)
    hook.remove()
    assert calls == ([int((branch == 1).sum())] if (branch == 1).any() else [])  # core only on the rejected


def test_save_and_load_one_artefact_weights_only(trained, tmp_path):
    trained.spec = _spec()
    trained.set_thresholds([0.25])
    path = trained.save(tmp_path / "ace.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["format"].startswith("ace-lightning")
    loaded = ACEModel.load(path)
    x, _ = _data(16, 4)
    torch.testing.assert_close(loaded(x), trained(x))
    assert float(loaded.thresholds[0]) == 0.25
    with pytest.raises(ValueError, match="not an ACE model file"):
        torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
        ACEModel.load(tmp_path / "other.pt")


def test_predict_returns_labels_branch_and_certificate(trained):
    x, y = _data(32, 5)
    out = trained.predict(x, eps=EPS)
    assert out["labels"].shape == out["branch"].shape == out["certified"].shape == (32,)
    assert set(out["branch"].tolist()) <= {0, 1}
    # an input the core may answer is only certified through core_ok, which predict never claims
    assert not (out["certified"] & (out["branch"] == 1)).any()
    torch.testing.assert_close(out["labels"], trained(x).argmax(-1))


@pytest.mark.parametrize("selection", ["gate", "entropy"])
def test_no_certified_input_is_broken_by_the_attack(trained, selection):
    """The soundness test: records from one certification pass; at many thresholds (every decile
    of g), the composition-aware attack with restarts never breaks a certified input, and
    certified <= adversarial <= natural."""
    model = trained
    if selection == "entropy":
        model = ACEModel(trained.core, [trained.certs[0]], [None], [0.0], _spec("entropy")).eval()
    x, y = _data(96, 11)
    eps = EPS
    rec = certify_batch(model, x, y, eps, CertifySettings(methods=("IBP", "CROWN-IBP"), refine_methods=()))
    assert rec["cert_ok"].any(), "the tiny cert-net should certify something"
    records = Records({k: v.numpy() for k, v in rec.items()} | {"index": np.arange(96), "split": np.array(["test"] * 96)})
    g = rec["g"].numpy()
    thresholds = sorted(set(np.quantile(g, np.linspace(0, 1, 6)).tolist()))
    for T in thresholds:
        certified = composed_certified(rec["cert_ok"][:, None], rec["core_ok"], rec["lb_g"][:, None],
                                       rec["ub_g"][:, None], torch.tensor([T]))
        adv_ok, x_adv = attack_composed(model, x, y, eps, [T], steps=15, restarts=3)
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        broken = certified & ~adv_ok
        assert not broken.any(), f"T={T}: certified inputs {broken.nonzero().flatten().tolist()} broken"
        ev = evaluate(records, T)
        nat = float(((model.forward_all(x).argmax(-1)) == y).float().mean())
        assert ev["nat_acc"] == pytest.approx(nat)
        assert ev["cert_acc"] == pytest.approx(float(certified.float().mean()))
        assert ev["cert_acc"] <= float(adv_ok.float().mean()) <= ev["nat_acc"]
    assert len(exact_thresholds(records)) > 3


def test_attack_breaks_something_it_should(trained):
    """The attack is not a no-op: with a large eps it breaks most inputs."""
    x, y = _data(48, 12)
    ok, _ = attack_composed(trained, x, y, 0.4, [0.0], steps=10)
    assert ok.float().mean() < 0.5


def _stage_attack_inputs(model, n: int = 96, seed: int = 11):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data(n, seed)
    rec = certify_batch(model, x, y, EPS, CertifySettings(methods=("IBP", "CROWN-IBP"), refine_methods=()))
    cols = {k: v.numpy() for k, v in rec.items()} | {"index": np.arange(n), "split": np.array(["test"] * n)}
    loader = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=32, shuffle=False)
    return x, y, rec, cols, loader


ATTACK = {"steps": 15, "restarts": 2, "step_size": 0.25, "decay_at": [0.5], "loss": "margin", "push": 1.0,
          "margin": 0.05, "seed": 0}


def test_stage_attack_counts_certified_inputs_robust_and_attacks_the_rest(trained):
    """certify's attack_test_split: every uncertified input is attacked, certified ones count as
    robust (a sample is attacked for the soundness check), so certified <= adversarial, and the
    uncertified inputs get the same verdict as attacking everything."""
    from ace_lightning.certify_attack import attack_test_split

    x, y, rec, cols, loader = _stage_attack_inputs(trained)
    T = float(np.median(cols["g"]))
    points = [{"key": "p", "threshold": T}]
    adv, violations = attack_test_split(trained, loader, Records(cols), EPS, {**ATTACK, "certified_sample": None},
                                        points, progress=False)
    assert violations == 0
    certified = composed_certified(rec["cert_ok"][:, None], rec["core_ok"], rec["lb_g"][:, None],
                                   rec["ub_g"][:, None], torch.tensor([T])).numpy()
    assert (adv["p"] >= certified).all() and adv["p"].mean() <= float((trained.forward_all(x).argmax(-1) == y).float().mean())
    assert (adv["cert_alone"] >= rec["cert_ok"].numpy()).all()
    assert adv["core_alone"].mean() < 1.0  # the core is attacked (nothing certifies it)
    sampled, _ = attack_test_split(trained, loader, Records(cols), EPS, {**ATTACK, "certified_sample": 0},
                                   points, progress=False)
    assert (sampled["p"][certified] == 1).all()  # not attacked: robust by their certificate


def test_stage_attack_finds_an_unsound_certificate(trained):
    """Break the records on purpose (claim certificates for inputs the cert-net gets wrong): the
    stage's soundness check attacks certified inputs and reports them."""
    from ace_lightning.certify_attack import attack_test_split

    x, y, rec, cols, loader = _stage_attack_inputs(trained)
    points = [{"key": "p", "threshold": -1e9}]  # everything routed to the cert-net
    honest, violations = attack_test_split(trained, loader, Records(cols), EPS,
                                           {**ATTACK, "certified_sample": None}, points, progress=False)
    assert violations == 0 and (~honest["cert_alone"]).any(), "some uncertified input must be breakable"
    broken = dict(cols)
    broken["cert_ok"] = np.ones_like(cols["cert_ok"])  # an unsound certifier: every input certified
    _, violations = attack_test_split(trained, loader, Records(broken), EPS, {**ATTACK, "certified_sample": None},
                                      points, progress=False)
    assert violations > 0
    _, unchecked = attack_test_split(trained, loader, Records(broken), EPS, {**ATTACK, "certified_sample": 0},
                                     points, progress=False)
    assert unchecked == 0  # with no certified input attacked nothing can be found: the sample matters


def test_composed_attack_skips_the_core_where_the_gate_surely_fires(trained):
    """reachable: inputs whose gate certifiably fires (lb_g >= T) never run the core."""
    x, y, rec, cols, loader = _stage_attack_inputs(trained)
    T = float(np.quantile(cols["lb_g"], 0.5))
    sure = torch.as_tensor(cols["lb_g"] >= T)
    seen = []
    core = trained.core
    hook = core.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        reachable = torch.stack([torch.as_tensor(cols["ub_g"] >= T), ~sure], dim=1)
        attack_composed(trained, x[sure], y[sure], EPS, [T], steps=5, reachable=reachable[sure])
        assert not seen  # no core forward at all for inputs that can only reach the cert-net
        attack_composed(trained, x, y, EPS, [T], steps=5, reachable=reachable)
        assert seen and max(seen) <= int((~sure).sum())
    finally:
        hook.remove()


def _reference_pruned_verdicts(net, x, y, eps, steps, restarts, step_size, decay_at, noise):
    """The evaluation attack without pruning: every input runs every step of every restart (the
    same starts); broken iff some iterate is misclassified. Pruning must not change a verdict."""
    import math
    from ace_lightning.attacks.pgd import margin_loss

    milestones = sorted(math.ceil(f * steps) for f in decay_at)
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    for restart in range(restarts):
        z = x.clone() if restart == 0 else torch.min(torch.max(x + noise[restart - 1], x - eps), x + eps).clamp(0, 1)
        for step in range(steps + 1):
            z = z.detach().requires_grad_(True)
            logits = net(z)
            broken |= logits.argmax(-1) != y
            if step == steps:
                break
            grad, = torch.autograd.grad(margin_loss(logits, y).sum(), z)
            alpha = step_size * eps * 0.1 ** sum(step >= m for m in milestones)
            z = torch.min(torch.max(z.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return ~broken


def test_pruned_attack_gives_the_verdicts_of_the_unpruned_one_and_its_points(trained):
    """pgd_pruned: an input leaves at its first misclassified iterate and the gradient of the rest
    is recomputed when most broke; the verdicts are those of running everything, the returned
    points are misclassified and in the ball, and the generator use does not depend on verdicts."""
    from ace_lightning.attacks import pgd_pruned

    x, y = _data(256, 21)
    for net, eps in ((trained.core, 0.2), (trained.certs[0], EPS)):  # the core: most break at once
        kw = dict(steps=6, restarts=3, step_size=0.4, decay_at=(0.5,))
        gen = torch.Generator().manual_seed(4)
        ok, x_adv = pgd_pruned(net, x, y, eps, loss="margin", generator=gen, **kw)
        ref_gen = torch.Generator().manual_seed(4)
        noise = [torch.empty(x.shape).uniform_(-eps, eps, generator=ref_gen) for _ in range(2)]
        assert torch.equal(gen.get_state(), ref_gen.get_state())  # starts drawn up front, whatever broke
        expected = _reference_pruned_verdicts(net, x, y, eps, noise=noise, **kw)
        assert torch.equal(ok, expected)
        assert 0 < int((~ok).sum()) < x.shape[0]  # both verdicts occur: a real comparison
        with torch.no_grad():
            assert (net(x_adv[~ok]).argmax(-1) != y[~ok]).all()
        assert torch.equal(x_adv[ok], x[ok])
        assert ((x_adv - x).abs() <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1


def test_composed_attack_checks_the_candidate_points_first(trained):
    """Candidates (the single nets' adversarial points) break an input without a search when the
    composed model gets them wrong; they are projected onto the ball first, so a point outside it
    cannot count."""
    from ace_lightning.attacks import pgd_pruned

    x, y = _data(128, 22)
    eps = 0.25
    T = 0.0
    _, core_points = pgd_pruned(trained.core, x, y, eps, steps=8, restarts=1, step_size=0.4, loss="margin")
    alone, _ = attack_composed(trained, x, y, eps, [T], steps=0)  # steps=0: x itself only
    ok, x_adv = attack_composed(trained, x, y, eps, [T], steps=0, candidates=[core_points])
    assert (ok <= alone).all() and bool((alone & ~ok).any())
    with torch.no_grad():
        assert (trained.forward_all(x_adv[~ok]).argmax(-1) != y[~ok]).all()
    far = x + 10.0 * (core_points - x)  # the same directions, far outside the ball
    ok_far, x_far = attack_composed(trained, x, y, eps, [T], steps=0, candidates=[far])
    assert ((x_far - x).abs() <= eps + 1e-6).all()
    with torch.no_grad():
        assert (trained.forward_all(x_far[~ok_far]).argmax(-1) != y[~ok_far]).all()


def test_stage_attack_numbers_do_not_depend_on_the_global_rng(trained):
    """Each attack draws its random restarts from its own seeded generator and leaves the global
    RNG alone: the same adversarial numbers whatever ran before."""
    from ace_lightning.certify_attack import attack_test_split

    x, y, rec, cols, loader = _stage_attack_inputs(trained)
    points = [{"key": "p", "threshold": float(np.median(cols["g"]))}]
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        adv, _ = attack_test_split(trained, loader, Records(cols), EPS, {**ATTACK, "restarts": 3}, points,
                                   progress=False)
        results.append((adv, torch.rand(1)))
    assert all((results[0][0][k] == results[1][0][k]).all() for k in results[0][0])
    assert results[0][1] != results[1][1]  # the global stream was not reseeded by the attack
