"""Soundness of the bound layer: every value the net takes on the ball lies inside the bounds, for
every method, on random small nets (conv, linear, relu, flatten, Normalize, AvgPool, BatchNorm in
eval and train mode), at uniform points, box vertices and PGD points that push each output and
each margin up and down. float64 so a violation is a bug, not rounding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ace_lightning.bounds import (
    METHODS,
    margin_lower_bounds,
    margin_spec,
    output_bounds,
    robust_ce_loss,
)
from bound_checks import (
    assert_contained,
    conv_net,
    fc_net,
    frozen_batch_stats,
    points_in_ball,
    values_at,
)

TOL = 1e-9
EPS = 0.04

NETS = {
    "fc": lambda: fc_net(in_shape=(1, 3, 3), hidden=(12, 10), classes=4),
    "conv_bn_eval": lambda: conv_net(bn=True).eval(),
    "conv_bn_train": lambda: conv_net(bn=True, seed=1).train(),
    "conv_pool": lambda: conv_net(bn=False, pool=True, side=8, seed=2),
}


def _setup(name: str, batch: int = 3):
    net = NETS[name]().double()
    torch.manual_seed(7)
    shape = (1, 3, 3) if name == "fc" else ((2, 8, 8) if name == "conv_pool" else (2, 6, 6))
    x = torch.rand((batch,) + shape, dtype=torch.float64) * 0.9 + 0.05
    y = torch.arange(batch) % 4
    # what is being bounded: in train mode, BN with the clean batch's statistics held fixed
    f = frozen_batch_stats(net, x) if net.training else net
    return net, f, x, y


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(NETS))
def test_output_bounds_contain_every_point(name, method):
    net, f, x, _ = _setup(name)
    lb, ub = output_bounds(net, x, EPS, method)
    assert lb.shape == ub.shape == (x.shape[0], 4)
    assert_contained(lb, ub, values_at(f, points_in_ball(f, x, EPS)), TOL, f"{name}/{method}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(NETS))
def test_margin_lower_bounds_hold_at_attacked_points(name, method):
    net, f, x, y = _setup(name)
    lb = margin_lower_bounds(net, x, y, EPS, method)
    C = margin_spec(y, 4, dtype=x.dtype)
    assert lb.shape == (x.shape[0], 3)
    vals = values_at(f, points_in_ball(f, x, EPS, C=C), C)
    assert_contained(lb, torch.full_like(lb, float("inf")), vals, TOL, f"{name}/{method} margins")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_crown_ibp_beta_mixture_is_sound_and_between(beta):
    net, f, x, y = _setup("conv_bn_eval")
    mixed = margin_lower_bounds(net, x, y, EPS, "CROWN-IBP", beta=beta)
    ibp = margin_lower_bounds(net, x, y, EPS, "IBP")
    crown_ibp = margin_lower_bounds(net, x, y, EPS, "CROWN-IBP")
    torch.testing.assert_close(mixed, beta * crown_ibp + (1 - beta) * ibp, rtol=0, atol=1e-12)
    C = margin_spec(y, 4, dtype=x.dtype)
    vals = values_at(f, points_in_ball(f, x, EPS, C=C), C)
    assert_contained(mixed, torch.full_like(mixed, float("inf")), vals, TOL, f"beta={beta}")


@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP"])
def test_robust_loss_bounds_the_worst_case_cross_entropy(method, fusion):
    net, f, x, y = _setup("conv_bn_eval", batch=4)
    bound = robust_ce_loss(net, x, y, EPS, method, loss_fusion=fusion)
    pts = points_in_ball(f, x, EPS, n_uniform=16, n_vertices=16, C=margin_spec(y, 4, dtype=x.dtype))
    with torch.no_grad():
        per_point = torch.stack([nn.functional.cross_entropy(f(p), y, reduction="none") for p in pts])
    worst = per_point.max(0).values.mean().item()
    assert bound.item() >= worst - TOL, f"robust loss {bound.item()} < attacked loss {worst}"


@pytest.mark.parametrize("method", METHODS)
def test_zero_eps_gives_the_point_value(method):
    net, _, x, _ = _setup("conv_bn_eval")
    lb, ub = output_bounds(net, x, 0.0, method)
    with torch.no_grad():
        z = net(x)
    torch.testing.assert_close(lb, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(ub, z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_widths_never_shrink_as_eps_grows(method):
    net, _, x, _ = _setup("fc")
    widths = []
    for eps in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2):
        lb, ub = output_bounds(net, x, eps, method)
        widths.append(ub - lb)
    for small, large in zip(widths, widths[1:]):
        assert (large >= small - 1e-12).all(), f"{method}: a bound got tighter on a larger ball"


def test_alpha_crown_never_looser_than_crown_and_strictly_tighter_when_unstable():
    net = fc_net(in_shape=(1, 2, 2), hidden=(32, 32), classes=3, seed=3).double()
    x = torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64)
    for eps in (0.02, 0.3):
        lc, uc = output_bounds(net, x, eps, "CROWN")
        la, ua = output_bounds(net, x, eps, "alpha-CROWN")
        assert (la >= lc - 1e-9).all() and (ua <= uc + 1e-9).all()
    # at eps = 0.3 most ReLUs are unstable: alpha must buy something
    assert (la - lc).max() > 1e-3 and (uc - ua).max() > 1e-3


@pytest.mark.parametrize("kind", ["IBP", "CROWN-IBP-beta", "fusion"])
def test_robust_loss_gradient_matches_finite_differences(kind):
    """The robust loss is differentiable in the net's parameters: autograd agrees with central
    differences (float64, away from ReLU kinks for this seed)."""
    net = fc_net(in_shape=(1, 2, 2), hidden=(6,), classes=3, seed=5).double()
    x = torch.rand(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    weight = net[2].weight

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight.copy_(w)
        if kind == "IBP":
            return robust_ce_loss(net, x, y, 0.05, "IBP")
        if kind == "fusion":
            return robust_ce_loss(net, x, y, 0.05, "CROWN-IBP", beta=0.5, loss_fusion=True)
        return robust_ce_loss(net, x, y, 0.05, "CROWN-IBP", beta=0.5)

    w0 = weight.detach().clone()
    net.zero_grad()
    loss_of(w0).backward()
    analytic = weight.grad.detach().clone()
    numeric = torch.zeros_like(w0)
    h = 1e-6
    for idx in range(w0.numel()):
        d = torch.zeros_like(w0).view(-1)
        d[idx] = h
        d = d.view_as(w0)
        numeric.view(-1)[idx] = (loss_of(w0 + d).item() - loss_of(w0 - d).item()) / (2 * h)
    with torch.no_grad():
        weight.copy_(w0)
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-6)
    assert analytic.abs().sum() > 0
