"""Soundness of the bound layer on every cert-net of the zoo (issue 3, item 6).

For each architecture (small inputs and batches), including the average-pooled downsampled
view, sample points of B(x) intersected with [0, 1] (uniform, box vertices, PGD pushing every
output and every margin both ways) and check lb <= f(x') <= ub for IBP and CROWN-IBP, and
margin lower bounds <= z_y - z_j. BatchNorm nets are checked in eval mode and in train mode
(where the bounded function is BN with the clean batch's statistics frozen).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ace_lightning.bounds import margin_lower_bounds, margin_spec, output_bounds
from ace_lightning.nets import CERT_NETS, create_cert_net
from bound_checks import assert_contained, frozen_batch_stats, points_in_ball, values_at

K, EPS = 4, 0.03
BATCH = {"eval": 2, "train": 6}  # train-mode BN normalises with the batch: a batch of 2 is degenerate
# (name, input shape, kwargs): small inputs keep CPU time low; wrn at a reduced width.
ZOO = [
    ("fc", (1, 6, 6), {}),
    ("small", (3, 8, 8), {}),
    ("c2", (1, 12, 12), {}),
    ("c3", (3, 8, 8), {}),
    ("c5", (3, 8, 8), {}),
    ("cnn7", (3, 8, 8), {}),
    ("wrn", (3, 8, 8), {"widen_factor": 1, "in_planes": 4}),
    # a cert-net that sees an average-pooled view of the input (ImageNet200 style)
    ("c2", (3, 16, 16), {"downsample": 8}),
    ("cnn7", (1, 16, 16), {"downsample": 4}),
    ("wrn", (3, 16, 16), {"downsample": 8, "widen_factor": 1, "in_planes": 4}),
]
METHODS = ["IBP", "CROWN-IBP"]


def _has_bn(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def _cases():
    for name, shape, kw in ZOO:
        probe = create_cert_net(name, shape, K, [0.5] * shape[0], [0.25] * shape[0], **kw)
        for mode in ("eval", "train") if _has_bn(probe) else ("eval",):
            ds = f"-down{kw['downsample']}" if "downsample" in kw else ""
            yield pytest.param(name, shape, kw, mode, id=f"{name}{ds}-{'x'.join(map(str, shape))}-{mode}")


def _net(name, shape, kw, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    c = shape[0]
    net = create_cert_net(name, shape, K, [0.4 + 0.1 * i for i in range(c)], [0.2 + 0.05 * i for i in range(c)], **kw)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def _inputs(shape, batch, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch,) + shape, generator=g)
    x[0, 0, 0, :] = 0.0  # pixels on the box edges: the ball is clipped to [0, 1]
    x[1, -1, -1, :] = 1.0
    y = torch.randint(0, K, (batch,), generator=g)
    return x, y


def test_zoo_covers_every_cert_net():
    assert {name for name, _, _ in ZOO} == set(CERT_NETS)
    assert any("downsample" in kw for _, _, kw in ZOO)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,shape,kw,mode", list(_cases()))
def test_zoo_bounds_contain_sampled_outputs(name, shape, kw, mode, method):
    net = _net(name, shape, kw)
    batch = BATCH[mode]
    x, y = _inputs(shape, batch)
    net.train(mode == "train")
    # the function being bounded: in train mode BN uses the clean batch's statistics
    f = frozen_batch_stats(net, x) if mode == "train" else net
    lb, ub = output_bounds(net, x, EPS, method=method)
    assert lb.shape == ub.shape == (batch, K)
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all() and (lb <= ub).all()
    tol = 1e-4 * max(1.0, lb.abs().max().item(), ub.abs().max().item())
    pts = points_in_ball(f, x, EPS, n_uniform=32, n_vertices=32)
    assert_contained(lb, ub, values_at(f, pts), tol, f"{name} {mode} {method} outputs")

    m_lb = margin_lower_bounds(net, x, y, EPS, method=method)
    assert m_lb.shape == (batch, K - 1)
    C = margin_spec(y, K)
    pts = points_in_ball(f, x, EPS, n_uniform=16, n_vertices=16, C=C)
    assert_contained(m_lb, torch.full_like(m_lb, float("inf")), values_at(f, pts, C=C), tol,
                     f"{name} {mode} {method} margins")
