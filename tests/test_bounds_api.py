"""The bound layer's contract beyond soundness: clear errors on bad input, one cached
BoundedModule per net and shape, BatchNorm statistics that end up in the user's module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ace_lightning.bounds import (
    bounded_module,
    clear_cache,
    margin_lower_bounds,
    margin_spec,
    output_bounds,
    robust_ce_loss,
)
from bound_checks import conv_net, fc_net


@pytest.fixture
def net():
    return fc_net(in_shape=(1, 2, 2), hidden=(6,), classes=3)


X = torch.full((2, 1, 2, 2), 0.5)


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan"), "big"])
def test_eps_outside_unit_interval_is_a_one_line_value_error(net, eps):
    with pytest.raises(ValueError, match="eps") as err:
        output_bounds(net, X, eps)
    assert "\n" not in str(err.value)


def test_x_outside_pixel_box_is_rejected(net):
    with pytest.raises(ValueError, match=r"pixel box \[0, 1\]"):
        output_bounds(net, X * 3, 0.1)
    with pytest.raises(ValueError, match="floating-point"):
        output_bounds(net, torch.zeros(2, 1, 2, 2, dtype=torch.long), 0.1)


def test_unknown_method_lists_the_known_ones(net):
    with pytest.raises(ValueError, match="unknown bound method 'PGD'; known: IBP, CROWN-IBP"):
        margin_lower_bounds(net, X, torch.tensor([0, 1]), 0.1, "PGD")


def test_method_names_are_case_insensitive(net):
    a = output_bounds(net, X, 0.1, "crown-ibp")
    b = output_bounds(net, X, 0.1, "CROWN-IBP")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layer", [nn.Sigmoid(), nn.MaxPool2d(2, 1), nn.Tanh()])
def test_layer_the_bound_layer_cannot_handle(layer):
    bad = nn.Sequential(nn.Conv2d(1, 2, 1), layer, nn.Flatten(), nn.LazyLinear(3))
    bad(X)  # materialise the lazy layer
    with pytest.raises(ValueError, match="bound layer cannot handle") as err:
        output_bounds(bad, X, 0.1)
    assert "\n" not in str(err.value)


def test_overlapping_avgpool_is_refused():
    bad = nn.Sequential(nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(1, 3))
    with pytest.raises(ValueError, match="stride == kernel_size"):
        output_bounds(bad, X, 0.1)


def test_bad_labels_beta_and_spec(net):
    with pytest.raises(ValueError, match="class indices"):
        margin_lower_bounds(net, X, torch.tensor([0, 3]), 0.1)
    with pytest.raises(ValueError, match="beta"):
        margin_lower_bounds(net, X, torch.tensor([0, 1]), 0.1, "IBP", beta=0.5)
    with pytest.raises(ValueError, match="beta must be in"):
        margin_lower_bounds(net, X, torch.tensor([0, 1]), 0.1, "CROWN-IBP", beta=2.0)
    with pytest.raises(ValueError, match="C must have shape"):
        output_bounds(net, X, 0.1, C=torch.ones(3, 3))
    with pytest.raises(ValueError, match="loss fusion"):
        robust_ce_loss(net, X, torch.tensor([0, 1]), 0.1, "CROWN", loss_fusion=True)


def test_margin_spec_rows():
    """Row j of C for label y is e_y - e_j, for every j != y in order."""
    C = margin_spec(torch.tensor([1, 0]), 3)
    assert C.shape == (2, 2, 3)
    torch.testing.assert_close(C[0], torch.tensor([[-1.0, 1.0, 0.0], [0.0, 1.0, -1.0]]))
    torch.testing.assert_close(C[1], torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]]))


def test_margin_bounds_equal_bounds_through_the_spec_matrix(net):
    y = torch.tensor([2, 0])
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        lb = margin_lower_bounds(net, X, y, 0.1, method)
        lb_c, _ = output_bounds(net, X, 0.1, method, C=margin_spec(y, 3))
        torch.testing.assert_close(lb, lb_c)


def test_bounded_module_is_cached_per_net_and_shape(net):
    clear_cache()
    a = bounded_module(net, X)
    assert bounded_module(net, X) is a
    assert bounded_module(net, torch.rand(5, 1, 2, 2)) is not a  # new batch shape
    net.eval()
    assert bounded_module(net, X) is not a  # mode is part of the key
    net.train()
    assert bounded_module(net, X) is a
    other = fc_net(in_shape=(1, 2, 2), hidden=(6,), classes=3)
    assert bounded_module(other, X) is not a


def test_cache_follows_a_changed_parameter_value(net):
    before = output_bounds(net, X, 0.0)[0]
    with torch.no_grad():
        net[-1].bias.add_(1.0)
    after = output_bounds(net, X, 0.0)[0]
    torch.testing.assert_close(after, before + 1.0)


def test_batchnorm_running_stats_end_up_in_the_users_module():
    net = conv_net(bn=True).train()
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.rand(4, 2, 6, 6)
    reference = conv_net(bn=True).train()
    reference.load_state_dict(net.state_dict())
    with torch.no_grad():
        reference(x)  # one plain train-mode forward: the update a bound call must make, once
    ref_bn = next(m for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    _, logits = margin_lower_bounds(net, x, torch.zeros(4, dtype=torch.long), 0.01, return_logits=True)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    torch.testing.assert_close(logits, reference(x).detach(), rtol=1e-5, atol=1e-5)
    # a checkpoint restore replaces the values: the next eval bound uses them
    net.eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state[[k for k in state if k.endswith("running_mean")][0]].fill_(0.25)
    net.load_state_dict(state)
    lb, ub = output_bounds(net, x, 0.0)
    torch.testing.assert_close(lb, net(x).detach(), rtol=1e-5, atol=1e-5)


def test_building_the_wrapper_does_not_move_running_stats():
    net = conv_net(bn=True).train()
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    clear_cache(net)
    bounded_module(net, torch.rand(3, 2, 6, 6))
    torch.testing.assert_close(bn.running_mean, before)


def test_building_the_wrapper_keeps_a_batchnorm1d_net_in_train_mode(capsys):
    """auto_LiRPA switches a net with BatchNorm1d to eval mode while converting it (and prints
    so): the bound layer restores every module's mode and keeps the console quiet."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    output_bounds(net, torch.rand(4, 2, 2, 2), 0.01)
    assert all(m.training for m in net.modules())
    assert "eval" not in capsys.readouterr().out


def test_buffers_follow_a_device_or_dtype_move():
    net = conv_net(bn=True).eval()
    x = torch.rand(2, 2, 6, 6)
    output_bounds(net, x, 0.01)
    net.double()  # replaces every buffer tensor
    lb, _ = output_bounds(net, x.double(), 0.0)
    torch.testing.assert_close(lb, net(x.double()).detach())


def test_gradients_reach_the_users_parameters():
    net = conv_net(bn=True).train()
    loss = robust_ce_loss(net, torch.rand(3, 2, 6, 6), torch.tensor([0, 1, 2]), 0.02, "CROWN-IBP", beta=0.5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
