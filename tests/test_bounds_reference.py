"""The bound layer against an independent pure-PyTorch implementation (bounds/reference.py,
no auto_LiRPA code) and against exact ranges of tiny nets. A future torch or auto_LiRPA change
that silently alters bounds fails here."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from ace_lightning.bounds import input_box, margin_lower_bounds, margin_spec, output_bounds
from ace_lightning.bounds.problem import METHODS
from ace_lightning.bounds.reference import crown, crown_ibp, ibp
from exact_ranges import exact_output_range
from ace_lightning.nets.layers import Normalize
from test_reference_bounds import conv_net, fc_net, tiny_conv

AGREE = 1e-9
REFERENCE = {"IBP": ibp, "CROWN-IBP": crown_ibp}


def _whole_mode(net: nn.Module, train: bool) -> nn.Module:
    """The bound layer follows the net's own mode (``net.training``) for every BN layer."""
    return net.train(train)


CASES = {  # name -> (factory, input shape, eps)
    "fc_bn_eval": (lambda: _whole_mode(fc_net(False), False), (4, 1, 2, 3), 0.05),
    "fc_bn_train": (lambda: _whole_mode(fc_net(True), True), (4, 1, 2, 3), 0.05),
    "conv_bn_eval": (lambda: _whole_mode(conv_net(False), False), (3, 3, 8, 8), 0.03),
    "conv_bn_train": (lambda: _whole_mode(conv_net(True), True), (3, 3, 8, 8), 0.03),
}


def _problem(name: str):
    factory, shape, eps = CASES[name]
    net = factory()
    gen = torch.Generator().manual_seed(11)
    x = (0.05 + 0.9 * torch.rand(shape, generator=gen)).double()
    y = torch.arange(shape[0]) % 4
    return net, x, y, eps


@pytest.mark.parametrize("method", sorted(REFERENCE))
@pytest.mark.parametrize("name", sorted(CASES))
def test_output_bounds_agree_with_reference(name, method):
    net, x, _, eps = _problem(name)
    x_l, x_u = input_box(x, eps)
    lb, ub = output_bounds(net, x, eps, method)
    rlb, rub = REFERENCE[method](net, x_l, x_u, x=x)
    torch.testing.assert_close(lb, rlb, rtol=0, atol=AGREE)
    torch.testing.assert_close(ub, rub, rtol=0, atol=AGREE)


@pytest.mark.parametrize("method", sorted(REFERENCE))
@pytest.mark.parametrize("name", sorted(CASES))
def test_margin_bounds_agree_with_reference(name, method):
    net, x, y, eps = _problem(name)
    x_l, x_u = input_box(x, eps)
    lb = margin_lower_bounds(net, x, y, eps, method)
    rlb, _ = REFERENCE[method](net, x_l, x_u, C=margin_spec(y, 5 if "conv" in name else 4,
                                                               dtype=x.dtype), x=x)
    torch.testing.assert_close(lb, rlb, rtol=0, atol=AGREE)


@pytest.mark.parametrize("name", ["fc_bn_eval", "conv_bn_eval"])
def test_crown_is_at_least_as_tight_as_the_pure_crown_reference(name):
    """auto_LiRPA's CROWN keeps IBP intermediate bounds for neurons IBP already proves stable
    (sparse intermediate bounds), so it may be tighter than pure CROWN but never looser."""
    net, x, _, eps = _problem(name)
    x_l, x_u = input_box(x, eps)
    lb, ub = output_bounds(net, x, eps, "CROWN")
    rlb, rub = crown(net, x_l, x_u, x=x)
    assert (lb >= rlb - AGREE).all() and (ub <= rub + AGREE).all()
    torch.testing.assert_close(lb, rlb, rtol=0, atol=1e-3)  # and not wildly different


def tiny_fc8(seed: int = 4) -> nn.Sequential:
    """8 ReLUs (5 + 3), input [1, 1, 2, 2]."""
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.5], [0.4]), nn.Flatten(), nn.Linear(4, 5), nn.ReLU(),
                         nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 3)).double()


def tiny_conv8(seed: int = 2) -> nn.Sequential:
    """8 ReLUs (a 2-channel stride-2 conv on 4x4), then a linear layer; input [1, 1, 4, 4]."""
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.5], [0.3]), nn.Conv2d(1, 2, 2, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8, 3)).double()


def test_overlapping_avgpool_is_unsound_in_auto_lirpa_and_refused():
    """Why the bound layer refuses AvgPool2d with stride != kernel: 0.3's backward pass assumes
    non-overlapping windows. tiny_conv (AvgPool2d(2, stride=1)) would get a CROWN lower bound
    above the exact minimum; the layer raises instead of certifying wrongly."""
    with pytest.raises(ValueError, match="stride == kernel_size"):
        output_bounds(tiny_conv(), torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64), 0.2, "CROWN")


TINY = {"fc8": (tiny_fc8, (1, 1, 2, 2), 0.4), "conv8": (tiny_conv8, (1, 1, 4, 4), 0.25)}


@functools.lru_cache(maxsize=None)
def _exact(name: str):
    """(net, x, eps, exact output range, exact margin minimum for y = 1); LPs are slow: once."""
    factory, shape, eps = TINY[name]
    net = factory().eval()
    x = torch.full(shape, 0.5, dtype=torch.float64)
    x_l, x_u = input_box(x, eps)
    lo, hi = exact_output_range(net, x_l, x_u, x=x)
    mlo, _ = exact_output_range(net, x_l, x_u, C=margin_spec(torch.tensor([1]), 3, dtype=x.dtype), x=x)
    return net, x, eps, lo, hi, mlo


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(TINY))
def test_every_method_contains_the_exact_range(name, method):
    net, x, eps, lo, hi, mlo = _exact(name)
    lb, ub = output_bounds(net, x, eps, method)
    assert (lb <= lo + AGREE).all(), f"{method} lower bound above the exact minimum"
    assert (ub >= hi - AGREE).all(), f"{method} upper bound below the exact maximum"
    assert (margin_lower_bounds(net, x, torch.tensor([1]), eps, method) <= mlo + AGREE).all()


def test_tiny_nets_have_at_most_eight_relus_and_some_unstable():
    for name, (factory, shape, _) in TINY.items():
        net, x, eps, lo, hi, _ = _exact(name)
        count = {}
        hooks = [m.register_forward_hook(lambda m, i, o: count.__setitem__(m, o[0].numel()))
                 for m in net.modules() if isinstance(m, nn.ReLU)]
        net(x)
        for h in hooks:
            h.remove()
        assert sum(count.values()) <= 8
        lb, ub = output_bounds(net, x, eps, "IBP")
        assert ((ub - lb) - (hi - lo)).max() > 1e-3  # IBP is strictly loose: ReLUs are unstable
