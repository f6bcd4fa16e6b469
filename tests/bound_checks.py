"""Shared helpers for soundness tests: random small nets, points inside the ball (uniform, box
vertices, PGD pushing every output and every margin both ways) and the containment check.
Used by the bound-layer tests and the architecture-zoo tests."""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

from ace_lightning.bounds import input_box
from ace_lightning.nets.layers import Normalize


def fc_net(in_shape=(1, 2, 2), hidden=(8, 8), classes=3, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    d = int(torch.tensor(in_shape).prod())
    layers: list[nn.Module] = [Normalize([0.3] * in_shape[0], [0.7] * in_shape[0]), nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def conv_net(channels=2, side=6, classes=4, bn=True, pool=False, seed=0) -> nn.Sequential:
    """Normalize, (AvgPool), conv, (BN), relu, strided conv, relu, flatten, fc, relu, fc."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if pool:
        layers.append(nn.AvgPool2d(2))
        side //= 2
    layers += [Normalize([0.4 + 0.1 * c for c in range(channels)], [0.25] * channels),
               nn.Conv2d(channels, 4, 3, 1, 1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    out = (side + 2 - 4) // 2 + 1
    layers += [nn.ReLU(), nn.Conv2d(4, 6, 4, 2, 1), nn.ReLU(), nn.Flatten(),
               nn.Linear(6 * out * out, 10), nn.ReLU(), nn.Linear(10, classes)]
    net = nn.Sequential(*layers)
    with torch.no_grad():  # non-trivial running statistics for eval-mode BN
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def frozen_batch_stats(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """The function auto_LiRPA bounds in train mode: BatchNorm with the statistics of the clean
    batch x held constant. Returned as an eval-mode copy."""
    ref = copy.deepcopy(net).train()
    stats = {}

    def hook(module, inputs, _out):
        inp = inputs[0]
        dims = [0] + list(range(2, inp.dim()))
        stats[module] = (inp.mean(dims).detach(), inp.var(dims, unbiased=False).detach())

    handles = [m.register_forward_hook(hook) for m in ref.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        ref(x)
    for h in handles:
        h.remove()
    for m, (mean, var) in stats.items():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return ref.eval()


def _project(z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.max(torch.min(z, hi), lo)


def pgd_points(f: Callable[[torch.Tensor], torch.Tensor], x_l: torch.Tensor, x_u: torch.Tensor,
               objectives: torch.Tensor, steps: int = 20, seed: int = 0) -> torch.Tensor:
    """For every row of ``objectives`` ([S, K]: maximise objectives @ f), run signed-gradient
    ascent from a random start in the box; returns points [S, B, ...]."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for obj in objectives:
        z = x_l + (x_u - x_l) * torch.rand(x_l.shape, generator=gen, dtype=x_l.dtype)
        step = (x_u - x_l) / 4
        for _ in range(steps):
            z = z.detach().requires_grad_(True)
            (f(z) @ obj).sum().backward()
            z = _project(z + step * z.grad.sign(), x_l, x_u)
            step = step * 0.8
        outs.append(z.detach())
    return torch.stack(outs)


def points_in_ball(f, x: torch.Tensor, eps: float, n_uniform: int = 64, n_vertices: int = 64,
                   pgd: bool = True, C: Optional[torch.Tensor] = None, seed: int = 0) -> torch.Tensor:
    """[N, B, ...] points of B(x) intersected with [0,1]: uniform, box vertices, and PGD points
    pushing each output (or each row of C, [B, S, K]) up and down."""
    gen = torch.Generator().manual_seed(seed)
    x_l, x_u = input_box(x, eps)
    width = x_u - x_l
    uniform = x_l + width * torch.rand((n_uniform,) + x.shape, generator=gen, dtype=x.dtype)
    corners = torch.randint(0, 2, (n_vertices,) + x.shape, generator=gen).to(x.dtype)
    vertices = x_l + width * corners
    pts = [x.unsqueeze(0), uniform, vertices]
    if pgd:
        with torch.no_grad():
            k = f(x).shape[-1]
        if C is None:
            eye = torch.eye(k, dtype=x.dtype)
            pts.append(pgd_points(f, x_l, x_u, torch.cat([eye, -eye]), seed=seed))
        else:  # per-sample specification rows: maximise and minimise c_s . f
            for s in range(C.shape[1]):
                for sign in (1.0, -1.0):
                    rows = sign * C[:, s, :]  # [B, K]

                    def g(z, rows=rows):
                        return (f(z) * rows).sum(-1, keepdim=True)

                    pts.append(pgd_points(g, x_l, x_u, torch.ones(1, 1, dtype=x.dtype), seed=seed))
    return torch.cat(pts)


def values_at(f, points: torch.Tensor, C: Optional[torch.Tensor] = None) -> torch.Tensor:
    """f at every point: [N, B, K] (or [N, B, S] through C)."""
    with torch.no_grad():
        vals = torch.stack([f(p) for p in points])
    if C is not None:
        vals = torch.einsum("bsk,nbk->nbs", C, vals)
    return vals


def assert_contained(lb: torch.Tensor, ub: torch.Tensor, vals: torch.Tensor, tol: float,
                     what: str = "") -> None:
    below = (lb.unsqueeze(0) - vals).max().item()
    above = (vals - ub.unsqueeze(0)).max().item()
    assert below <= tol, f"{what}: a value lies {below:.3g} below the lower bound"
    assert above <= tol, f"{what}: a value lies {above:.3g} above the upper bound"
