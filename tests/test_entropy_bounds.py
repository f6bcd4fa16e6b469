"""Entropy-selection bounds (docs/METHOD.md section 5): soundness of every route against points of the
ball (uniform, vertices, PGD on each logit, PGD maximising and minimising the entropy itself), the
closed form of the margin route (a maximum, attained, decreasing, inverted by the threshold), the
interval helpers on random boxes, the tightness of the routes on an IBP-trained net (run with -s to
see the table) and the gradient of the co-training loss. float64 so a violation is a bug."""
from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
from torch import nn

from ace_lightning.bounds import (
    entropy,
    entropy_bounds,
    entropy_bounds_from_margins,
    entropy_gate_bounds,
    entropy_lower_bound_interval,
    entropy_selection_loss,
    entropy_upper_bound_interval,
    entropy_upper_bound_margin,
    input_box,
    margin_spec,
    margin_threshold_for_entropy,
    output_bounds,
    robust_ce_loss,
)
from ace_lightning.bounds.entropy import ROUTES, _log_prob_bounds, _max_entropy_prob_box
from ace_lightning.data.synthetic import SyntheticDataset
from bound_checks import conv_net, fc_net, frozen_batch_stats, pgd_points, points_in_ball, values_at

TOL = 1e-9
F64 = torch.float64


def _confident(net: nn.Sequential, scale: float) -> nn.Sequential:
    """Scale the last layer so the random net is confident: entropy bounds are then non-trivial
    (a random net is near-uniform and every bound would be close to log K)."""
    last = [m for m in net if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return net


NETS = {
    "fc": (lambda: _confident(fc_net(in_shape=(1, 3, 3), hidden=(12, 10), classes=4), 8.0), (1, 3, 3)),
    "conv_bn_eval": (lambda: _confident(conv_net(bn=True), 12.0).eval(), (2, 6, 6)),
    "conv_bn_train": (lambda: _confident(conv_net(bn=True, seed=1), 12.0).train(), (2, 6, 6)),
}


def _setup(name: str, batch: int = 4, seed: int = 7):
    make, shape = NETS[name]
    net = make().double()
    torch.manual_seed(seed)
    x = torch.rand((batch,) + shape, dtype=F64) * 0.9 + 0.05
    f = frozen_batch_stats(net, x) if net.training else net  # what is bounded in train mode
    return net, f, x


def _entropy_at_points(f, x: torch.Tensor, eps: float) -> torch.Tensor:
    """H at [N, B] points of the ball: x, uniform, vertices, PGD on each logit both ways, and PGD
    on H itself both ways (two restarts)."""
    pts = points_in_ball(f, x, eps, n_uniform=48, n_vertices=48)
    x_l, x_u = input_box(x, eps)

    def f_h(z):
        return entropy(f(z)).unsqueeze(-1)

    both_ways = torch.tensor([[1.0], [-1.0]], dtype=F64)
    attacked = [pgd_points(f_h, x_l, x_u, both_ways, steps=25, seed=s) for s in (0, 1)]
    pts = torch.cat([pts] + attacked)
    return values_at(lambda z: entropy(f(z)).unsqueeze(-1), pts).squeeze(-1)


@pytest.mark.parametrize("eps", [0.005, 0.02])
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_every_route_contains_the_entropy(name, method, eps):
    net, f, x = _setup(name)
    h = _entropy_at_points(f, x, eps)
    log_k = math.log(4)
    nontrivial = 0
    per_route = {}
    for route in ROUTES:
        lb, ub = entropy_bounds(net, x, eps, method, route)
        assert lb.shape == ub.shape == (x.shape[0],)
        assert (lb >= 0).all() and (ub <= log_k + 1e-12).all()
        below = (lb.unsqueeze(0) - h).max().item()
        above = (h - ub.unsqueeze(0)).max().item()
        assert below <= TOL, f"{name}/{method}/{route}: an entropy lies {below:.3g} below lb_H"
        assert above <= TOL, f"{name}/{method}/{route}: an entropy lies {above:.3g} above ub_H"
        nontrivial += int((ub < log_k - 1e-3).sum() + (lb > 1e-3).sum())
        per_route[route] = (lb, ub)
    assert nontrivial > 0, "every bound trivial: the test would not catch anything"
    # "box" takes the min with the margin bound and shares its lower bound
    assert (per_route["box"][1] <= per_route["margin"][1] + 1e-12).all()
    torch.testing.assert_close(per_route["box"][0], per_route["margin"][0], rtol=0, atol=0)


def test_alpha_crown_and_gate_convention():
    net, f, x = _setup("conv_bn_eval")
    eps = 0.02
    h = _entropy_at_points(f, x, eps)
    g, lb_g, ub_g = entropy_gate_bounds(net, x, eps, "alpha-CROWN", "box")
    torch.testing.assert_close(g, -entropy(net(x)), rtol=0, atol=1e-12)
    assert (lb_g <= g + TOL).all() and (g <= ub_g + TOL).all()
    assert ((-h) >= lb_g - TOL).all() and ((-h) <= ub_g + TOL).all()
    lb_h, ub_h = entropy_bounds(net, x, eps, "alpha-CROWN", "box")
    torch.testing.assert_close(lb_g, -ub_h, rtol=0, atol=0)
    torch.testing.assert_close(ub_g, -lb_h, rtol=0, atol=0)


def test_bounds_from_margins_of_any_reference_class_are_sound():
    """A certifier can reuse its cert_ok pass (margins of the TRUE label y): H is shift-invariant,
    so the relative box of any class is a valid description of the logits."""
    net, f, x = _setup("fc", batch=6)
    eps = 0.03
    h = _entropy_at_points(f, x, eps)
    for ref in (torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 3, 2, 1, 1, 0])):
        lb_d, ub_d = output_bounds(net, x, eps, "CROWN", C=margin_spec(ref, 4, dtype=F64))
        for route in ("box", "margin"):
            lb, ub = entropy_bounds_from_margins(lb_d, ub_d, ref, route)
            assert (lb.unsqueeze(0) <= h + TOL).all() and (h <= ub.unsqueeze(0) + TOL).all()
        _, ub_lower_only = entropy_bounds_from_margins(lb_d, None, ref, "margin")
        torch.testing.assert_close(ub_lower_only, entropy_bounds_from_margins(lb_d, ub_d, ref, "margin")[1])
    with pytest.raises(ValueError, match="upper bounds"):
        entropy_bounds_from_margins(lb_d, None, ref, "box")


# ---------------------------------------------------------------- closed form of the margin route

def _h_rel(d: torch.Tensor) -> torch.Tensor:
    """Entropy of logits (0, -d_1, ..., -d_{K-1}): the top logit with the others d below it."""
    return entropy(torch.cat([torch.zeros_like(d[..., :1]), -d], dim=-1))


@pytest.mark.parametrize("k", [2, 3, 10])
def test_margin_bound_is_the_attained_maximum(k):
    gen = torch.Generator().manual_seed(k)
    for m in [0.0, 0.05, 0.3, 1.0, 2.0, 5.0, 12.0, 40.0]:
        bound = entropy_upper_bound_margin(torch.tensor(m, dtype=F64), k).item()
        # attained: every other logit exactly m below the top
        assert abs(_h_rel(torch.full((k - 1,), m, dtype=F64)).item() - bound) < 1e-12
        # random feasible configurations (some coordinates exactly at m) stay below
        spread = torch.rand(4000, 1, generator=gen, dtype=F64) * 6
        d = m + torch.rand(4000, k - 1, generator=gen, dtype=F64) ** 3 * spread
        d[::3, 0] = m
        assert _h_rel(d).max().item() <= bound + 1e-12
        # gradient ascent on H over {d >= m} climbs to the bound, never past it
        u = torch.randn(8, k - 1, generator=gen, dtype=F64).requires_grad_(True)
        opt = torch.optim.Adam([u], lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            (-_h_rel(m + u ** 2).sum()).backward()
            opt.step()
        best = _h_rel(m + u.detach() ** 2).max().item()
        assert best <= bound + 1e-12 and best >= bound - 1e-4, (m, best, bound)


@pytest.mark.parametrize("k", [2, 4, 10, 200])
def test_margin_bound_shape_and_threshold(k):
    log_k = math.log(k)
    grid = torch.linspace(0, 60, 2001, dtype=F64)
    b = entropy_upper_bound_margin(grid, k)
    assert abs(b[0].item() - log_k) < 1e-15
    positive = b[1:] > 0  # strictly decreasing until it underflows to 0
    assert positive[:1000].all() and (b[1:][positive] < b[:-1][positive]).all()
    odd = torch.tensor([-3.0, -1e-9, math.inf, math.nan, -math.inf], dtype=F64)
    special = entropy_upper_bound_margin(odd, k)
    torch.testing.assert_close(special, torch.tensor([log_k, log_k, 0.0, log_k, log_k], dtype=F64))
    assert torch.isfinite(entropy_upper_bound_margin(torch.tensor([800.0], dtype=F64), k)).all()

    previous = math.inf
    for tau in [1e-6, 0.01, 0.2, 0.5 * log_k, log_k - 1e-3]:
        t = margin_threshold_for_entropy(tau, k)
        assert 0 < t < previous  # larger tau -> smaller margin needed
        previous = t
        assert entropy_upper_bound_margin(torch.tensor(t, dtype=F64), k).item() <= tau
        below = t * (1 - 1e-9)
        assert entropy_upper_bound_margin(torch.tensor(below, dtype=F64), k).item() > tau
    assert margin_threshold_for_entropy(log_k, k) == -math.inf
    assert margin_threshold_for_entropy(log_k + 1, k) == -math.inf
    assert margin_threshold_for_entropy(0.0, k) == math.inf
    with pytest.raises(ValueError):
        margin_threshold_for_entropy(0.5, 1)


# ---------------------------------------------------------------------- interval helpers on boxes

def _random_boxes(batch: int, k: int, scale: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    center = torch.randn(batch, k, generator=gen, dtype=F64) * scale
    width = torch.rand(batch, k, generator=gen, dtype=F64) * scale
    width = width * torch.rand(batch, 1, generator=gen, dtype=F64)  # narrow and wide boxes
    width[: batch // 8] = 0.0  # degenerate boxes: the bound must be the exact entropy
    lb, ub = center - width, center + width
    pts = lb + (ub - lb) * torch.rand(1500, batch, k, generator=gen, dtype=F64)
    if k <= 6:
        verts = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k)), dtype=F64)
        pts = torch.cat([pts, lb + (ub - lb) * verts.unsqueeze(1)])
    return lb, ub, entropy(pts)


def test_probability_ranges_are_exact():
    lb, ub, _ = _random_boxes(200, 5, 3.0, seed=0)
    verts = torch.tensor(list(itertools.product([0.0, 1.0], repeat=5)), dtype=F64)
    p = torch.softmax(lb + (ub - lb) * verts.unsqueeze(1), dim=-1)
    lo, hi = _log_prob_bounds(lb, ub)
    torch.testing.assert_close(lo.exp(), p.min(0).values, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(hi.exp(), p.max(0).values, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k,scale", [(2, 1.0), (5, 3.0), (10, 10.0), (10, 200.0)])
def test_box_bounds_contain_sampled_entropies(k, scale):
    lb, ub, h = _random_boxes(160, k, scale, seed=k)
    exact = lb == ub
    for form in ("lse", "plogp", "best"):
        lo = entropy_lower_bound_interval(lb, ub, form=form)
        hi = entropy_upper_bound_interval(lb, ub, form=form)
        assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
        assert (lo.unsqueeze(0) <= h + TOL).all(), form
        assert (h <= hi.unsqueeze(0) + TOL).all(), form
        point = entropy(lb[exact.all(-1)])  # exact up to the outward slack, ~ulps x (K + scale) x |terms|
        torch.testing.assert_close(hi[exact.all(-1)], point, rtol=0, atol=1e-11 * (k + scale) ** 2)
        torch.testing.assert_close(lo[exact.all(-1)], point, rtol=0, atol=1e-11 * (k + scale) ** 2)
    pib = _max_entropy_prob_box(lb, ub)[0]
    assert (h <= pib.unsqueeze(0) + TOL).all()
    assert (pib <= entropy_upper_bound_interval(lb, ub, form="plogp") + 1e-9).all()  # Pi-max <= per-term max


def test_interval_can_beat_the_margin_bound():
    """Why the margin route is not pointwise tighter than interval arithmetic: m only says that the
    CLOSEST class is m below; the bound assumes all K-1 are. One close class, eight far ones."""
    k = 10
    d_lo = torch.tensor([[1.0] + [20.0] * 8], dtype=F64)
    d_hi = d_lo + 0.1
    ref = torch.tensor([0])
    _, ub_margin = entropy_bounds_from_margins(d_lo, d_hi, ref, "margin")
    lb_box, ub_box = entropy_bounds_from_margins(d_lo, d_hi, ref, "box")
    logit_lo = torch.cat([torch.zeros(1, 1, dtype=F64), -d_hi], 1)
    logit_hi = torch.cat([torch.zeros(1, 1, dtype=F64), -d_lo], 1)
    ub_interval = entropy_upper_bound_interval(logit_lo, logit_hi)
    assert ub_interval.item() < 0.7 < 2.0 < ub_margin.item()
    assert ub_box.item() <= ub_interval.item() + 1e-12
    true_max = _h_rel(torch.tensor([[1.0] + [20.0] * 8], dtype=F64)).item()
    assert true_max <= ub_box.item() <= true_max + 1e-6


# ------------------------------------------------------------------- tightness on a trained net

def _ibp_trained_net(k: int = 10, shape=(1, 8, 8), eps: float = 0.02, steps: int = 300):
    torch.manual_seed(0)
    train = SyntheticDataset(train=True, input_shape=shape, num_classes=k, train_size=512, noise=0.1)
    test = SyntheticDataset(train=False, input_shape=shape, num_classes=k, test_size=128, noise=0.1)
    x, y = train.data.to(F64) / 255, train.targets
    net = fc_net(in_shape=shape, hidden=(64, 64), classes=k, seed=0).double()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        ramp = eps * min(1.0, step / (0.5 * steps))  # eps 0 -> eps over the first half
        robust, logits = robust_ce_loss(net, x[idx], y[idx], max(ramp, 1e-6), "IBP", return_logits=True)
        loss = 0.5 * nn.functional.cross_entropy(logits, y[idx]) + 0.5 * robust
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, test.data.to(F64) / 255, test.targets


def test_tightness_of_the_routes_on_an_ibp_trained_net():
    """Upper bounds of H (lower ones are similar) for the three routes on a net trained with IBP.
    Pointwise, "box" <= "margin" is a theorem (a min that includes the margin bound); "margin" <=
    "interval" is not (test_interval_can_beat_the_margin_bound) and fails on some inputs even here,
    so only the batch mean is asserted, for IBP (the method the net was trained with; with CROWN
    the logit box is tight enough that interval arithmetic beats the margin bound on average).
    The attack column is a lower estimate of the true max of H: the gap to it is the looseness."""
    t0 = time.time()
    k, eps = 10, 0.02
    net, x, y = _ibp_trained_net(k=k, eps=eps)
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(-1) == y).double().mean().item()
    x_l, x_u = input_box(x, eps)
    attacked = pgd_points(lambda z: entropy(net(z)).unsqueeze(-1), x_l, x_u,
                          torch.ones(1, 1, dtype=F64), steps=30)[0]
    with torch.no_grad():
        h_attack = entropy(net(attacked))
    print(f"\nIBP-trained fc net, K={k}, synthetic 1x8x8, test acc {acc:.2f}, eps {eps}, mean clean H "
          f"{entropy(net(x)).mean():.4f}, mean attacked max H {h_attack.mean():.4f}")
    print("mean ub_H over the inputs with m >= 0 (lse-only: the reference's interval form alone; "
          "attack: a lower estimate of the true max)")
    print(f"{'method':8s} {'m>=0':>5s} {'lse-only':>9s} {'interval':>9s} {'margin':>8s} {'box':>8s} "
          f"{'attack':>8s} {'margin<=interval':>17s} {'lb_H int/box':>14s}")
    for method in ("IBP", "CROWN"):
        with torch.no_grad():
            lb_i, ub_i = entropy_bounds(net, x, eps, method, "interval")
            ub_ref = entropy_upper_bound_interval(*output_bounds(net, x, eps, method), form="lse")
            lb_m, ub_m = entropy_bounds(net, x, eps, method, "margin")
            lb_b, ub_b = entropy_bounds(net, x, eps, method, "box")
            yhat = net(x).argmax(-1)
            lb_d, _ = output_bounds(net, x, eps, method, C=margin_spec(yhat, k, dtype=F64))
            m = lb_d.min(-1).values
        pos = m >= 0
        assert pos.float().mean() > 0.5, "training did not make margins positive"
        assert (ub_b <= ub_m + 1e-12).all()
        for ub in (ub_b, ub_m, ub_i):
            assert (h_attack <= ub + TOL).all()
        # routing to the cert-net is decided by m alone in the margin route
        tau = 0.5
        threshold = margin_threshold_for_entropy(tau, k)
        assert torch.equal(ub_m <= tau, m >= threshold)
        frac = (ub_m[pos] <= ub_i[pos] + 1e-9).double().mean().item()
        print(f"{method:8s} {pos.double().mean().item():5.2f} {ub_ref[pos].mean():9.4f} {ub_i[pos].mean():9.4f} "
              f"{ub_m[pos].mean():8.4f} {ub_b[pos].mean():8.4f} {h_attack[pos].mean():8.4f} {frac:17.2f} "
              f"{lb_i.mean():6.4f}/{lb_b.mean():6.4f}")
        if method == "IBP":
            assert ub_m[pos].mean() < ub_i[pos].mean()
        assert ub_b[pos].mean() < ub_m[pos].mean()
    print(f"(trained and measured in {time.time() - t0:.1f}s)")


# ----------------------------------------------------------------------- co-training loss

@pytest.mark.parametrize("method,beta", [("IBP", None), ("CROWN-IBP", 0.5)])
def test_selection_loss_has_gradients(method, beta):
    net, _, x = _setup("fc", batch=8)
    net.zero_grad()
    with torch.no_grad():
        pred = net(x).argmax(-1)
    y = pred.clone()
    y[::2] = (pred[::2] + 1) % 4  # half wrong: both branches of the loss are exercised
    loss = entropy_selection_loss(net, x, y, 0.03, method, beta=beta)
    assert loss.dim() == 0 and 0.0 <= loss.item() <= 1.0
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient on {name}"


def test_selection_loss_trains_the_gate():
    """A few Adam steps on L_ent alone lower it: correct inputs get confident, wrong ones uncertain."""
    net, _, x = _setup("fc", batch=16, seed=3)
    y = torch.arange(16) % 4
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        loss = entropy_selection_loss(net, x, y, 0.02)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert entropy_selection_loss(net, x, y, 0.02).item() < first - 0.05


# ----------------------------------------------------------------------------- edges

def test_entropy_is_stable_and_validates():
    z = torch.tensor([[0.0, 0.0, 0.0], [1e4, 0.0, -1e4], [-1e300, 0.0, 0.0], [5.0, 5.0, -math.inf]],
                     dtype=F64)
    h = entropy(z)
    torch.testing.assert_close(h, torch.tensor([math.log(3), 0.0, math.log(2), math.log(2)], dtype=F64))
    z = torch.randn(5, 7, dtype=F64) * 4
    p = torch.softmax(z, -1)
    torch.testing.assert_close(entropy(z), -(p * p.log()).sum(-1))
    torch.testing.assert_close(entropy(z + 123.0), entropy(z))
    net, _, x = _setup("fc")
    with pytest.raises(ValueError, match="route"):
        entropy_bounds(net, x, 0.01, "IBP", "zonotope")
    with pytest.raises(ValueError, match="class indices"):
        entropy_selection_loss(net, x, torch.tensor([0, 1, 2, 7]), 0.01)
    with pytest.raises(ValueError, match="at least 2 classes"):
        entropy_upper_bound_margin(torch.tensor([1.0]), 1)


def test_train_mode_statistics_move_once():
    """The margin routes run the net once for the predicted class; that forward must not move the
    BatchNorm running statistics a second time."""
    import copy

    net, _, x = _setup("conv_bn_train")
    twin = copy.deepcopy(net)
    before = [b.clone() for b in net.buffers() if b.is_floating_point()]
    entropy_bounds(net, x, 0.01, "IBP", "box")
    output_bounds(twin, x, 0.01, "IBP")
    after = [b for b in net.buffers() if b.is_floating_point()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "statistics did not move at all"
    for a, b in zip(after, [b for b in twin.buffers() if b.is_floating_point()]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
