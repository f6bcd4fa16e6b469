"""Self-checks of the independent bound oracle (ace_lightning/bounds/reference.py).

The oracle is only useful if it is itself right, so it is checked against things that
need no bound theory: samples and box corners of the real network, eps = 0, exact LP
ranges on tiny nets, an independent module-by-module IBP, and algebraic identities
(a spec C folded into the last Linear must not change CROWN). All in float64, fixed seeds.
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from ace_lightning.nets.layers import Normalize
from ace_lightning.bounds.reference import (Affine, Relu, affine_forward, affine_layers, crown, crown_ibp, ibp,
                                            relu_relaxation)
from exact_ranges import exact_output_range

DT = torch.float64
TOL = 1e-9
METHODS = {"ibp": ibp, "crown_ibp": crown_ibp, "crown": crown}


# ------------------------------------------------------------------------------ nets


def _randomize_bn(net: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN: weights of both signs (|W| matters), shifted running stats."""
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.randn(c, generator=gen))
                m.bias.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))


def _finish(net: nn.Sequential, seed: int, bn_train: bool) -> nn.Sequential:
    _randomize_bn(net, torch.Generator().manual_seed(seed + 1))
    net = net.double().eval()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.train(bn_train)
    return net


def fc_net(bn_train: bool, seed: int = 0) -> nn.Sequential:
    """Input [B, 1, 2, 3]; Normalize, Flatten, nested Sequential with BN1d."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        Normalize([0.4], [0.3]), nn.Flatten(),
        nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU()),
        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    return _finish(net, seed, bn_train)


def conv_net(bn_train: bool, seed: int = 1) -> nn.Sequential:
    """Input [B, 3, 8, 8]; conv, BN2d, conv + AvgPool before a ReLU, then FC."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        Normalize([0.49, 0.48, 0.45], [0.25, 0.24, 0.26]),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))
    return _finish(net, seed, bn_train)


def tiny_fc(seed: int = 7) -> nn.Sequential:
    """9 ReLUs, input [1, 1, 2, 2]."""
    torch.manual_seed(seed)
    net = nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5),
                        nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    return _finish(net, seed, bn_train=False)


def tiny_conv(seed: int = 3) -> nn.Sequential:
    """8 ReLUs, input [1, 1, 4, 4]; BN2d in train mode (statistics of the single input)."""
    torch.manual_seed(seed)
    net = nn.Sequential(Normalize([0.5], [0.5]), nn.Conv2d(1, 2, 2), nn.AvgPool2d(2, stride=1),
                        nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    return _finish(net, seed, bn_train=True)


CASES = {  # name -> (net factory, input shape, eps)
    "fc_eval": (lambda: fc_net(False), (3, 1, 2, 3), 0.08),
    "fc_train": (lambda: fc_net(True), (3, 1, 2, 3), 0.08),
    "conv_eval": (lambda: conv_net(False), (3, 3, 8, 8), 0.02),
    "conv_train": (lambda: conv_net(True), (3, 3, 8, 8), 0.02),
}


def _problem(name: str, seed: int = 10):
    factory, shape, eps = CASES[name]
    net = factory()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return net, x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def frozen(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """Eval copy of ``net`` whose batch-stat BNs use the clean batch's statistics.

    Built with hooks on the real modules, independently of affine_layers: this is the
    network that train-mode bounds (auto_LiRPA semantics) actually certify.
    """
    net = copy.deepcopy(net)
    bns = [m for m in net.modules()
           if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.training]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.__setitem__(m, inp[0])) for m in bns]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    for m in bns:
        a = seen[m].transpose(0, 1).reshape(m.num_features, -1)
        m.running_mean.copy_(a.mean(1))
        m.running_var.copy_(a.var(1, unbiased=False))
    return net.eval()


def margin_spec(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """C = e_y - e_j (j != y), with one label y for the whole batch, shape [B, K-1, K]."""
    with torch.no_grad():
        K = frozen(net, x)(x).shape[1]
        y = int(frozen(net, x)(x)[0].argmax())
    eye = torch.eye(K, dtype=DT)
    C = torch.stack([eye[y] - eye[j] for j in range(K) if j != y])
    return C.expand(x.shape[0], K - 1, K)


def samples(x_L: torch.Tensor, x_U: torch.Tensor, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """n uniform points plus the box corners (all if <= 2^12 of them, else n random)."""
    gen = torch.Generator().manual_seed(seed)
    d = x_L.numel()
    u = torch.rand((n, *x_L.shape), generator=gen, dtype=DT)
    if d <= 12:
        bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=DT)
    else:
        bits = torch.randint(0, 2, (n, d), generator=gen).to(DT)
    corners = bits.view(-1, *x_L.shape)
    t = torch.cat([u, corners])
    return x_L + t * (x_U - x_L)


def _inside(v: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor, tol: float = TOL) -> None:
    assert (v >= lb - tol).all(), f"below lower bound by {(lb - v).max().item():.3g}"
    assert (v <= ub + tol).all(), f"above upper bound by {(v - ub).max().item():.3g}"


# ----------------------------------------------------------------------------- tests


def test_relu_relaxation_matches_adaptive_rule_and_is_sound():
    l = torch.tensor([-1.0, -3.0, -1.0, 0.5, -2.0, 0.0, -2.0, -2e-9], dtype=DT)
    u = torch.tensor([3.0, 1.0, 1.0, 2.0, -0.5, 0.0, 0.0, -2e-9], dtype=DT)
    d_l, d_u, b_u = relu_relaxation(l, u)
    # last column: the 1e-8 guard makes a tiny negative l = u look unstable (u_r = 8e-9)
    exp_d_u = torch.tensor([0.75, 0.25, 0.5, 1, 0, 1, 0, 0.8], dtype=DT)
    torch.testing.assert_close(d_u, exp_d_u, rtol=1e-12, atol=0)
    torch.testing.assert_close(b_u, torch.tensor([0.75, 0.75, 0.5, 0, 0, 0, 0, 1.6e-9], dtype=DT),
                               rtol=1e-12, atol=0)
    # d_u > 0.5 strictly: a symmetric interval gets the zero lower line
    torch.testing.assert_close(d_l, torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 1], dtype=DT))
    g = torch.Generator().manual_seed(0)
    l, u = -torch.rand(500, generator=g, dtype=DT), torch.rand(500, generator=g, dtype=DT)
    d_l, d_u, b_u = relu_relaxation(l, u)
    z = l + (u - l) * torch.linspace(0, 1, 101, dtype=DT)[:, None]
    assert (d_l * z <= z.clamp(min=0) + 1e-12).all()
    assert (d_u * z + b_u >= z.clamp(min=0) - 1e-12).all()


def test_hand_computed_example():
    """relu(x) - relu(-x) on x in [-1, 3] (= x, range [-1, 3]), worked out by hand.

    z1 = x in [-1, 3]: upper 0.75 z + 0.75, lower z (0.75 > 0.5).
    z2 = -x in [-3, 1]: upper 0.25 z + 0.75, lower 0 (0.25 <= 0.5).
    lower: z1 - (0.25 z2 + 0.75) = 1.25 x - 0.75 -> -2 at x = -1;
    upper: (0.75 z1 + 0.75) - 0 = 0.75 x + 0.75 -> 3 at x = 3.
    """
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[2].bias.zero_()
    x_L, x_U = torch.tensor([[-1.0]], dtype=DT), torch.tensor([[3.0]], dtype=DT)
    expected = {"ibp": (-1.0, 3.0), "crown_ibp": (-2.0, 3.0), "crown": (-2.0, 3.0)}
    for k, fn in METHODS.items():
        lb, ub = fn(net, x_L, x_U)
        assert (lb.item(), ub.item()) == pytest.approx(expected[k], abs=1e-12), k
    lo, hi = exact_output_range(net, x_L, x_U)
    assert (lo.item(), hi.item()) == pytest.approx((-1.0, 3.0), abs=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_step_list_reproduces_network(name):
    net, x, _, _ = _problem(name)
    steps = affine_layers(net, x)
    assert sum(isinstance(s, Relu) for s in steps) == (3 if "conv" in name else 2)
    with torch.no_grad():
        ref = copy.deepcopy(net)(x)  # train-mode BN uses this very batch's statistics
    torch.testing.assert_close(affine_forward(steps, x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_ibp_matches_module_by_module_ibp(name):
    """Independent IBP with the real torch modules (checks the dense matrices)."""
    net, x, x_L, x_U = _problem(name)
    mods = [m for m in frozen(net, x).modules() if not isinstance(m, nn.Sequential)]
    mid, rad = (x_U + x_L) / 2, (x_U - x_L) / 2
    with torch.no_grad():
        for m in mods:
            if isinstance(m, nn.ReLU):
                lo, hi = (mid - rad).clamp(min=0), (mid + rad).clamp(min=0)
                mid, rad = (hi + lo) / 2, (hi - lo) / 2
            elif isinstance(m, nn.Linear):
                mid, rad = m(mid), rad @ m.weight.abs().T
            elif isinstance(m, nn.Conv2d):
                mid, rad = m(mid), nn.functional.conv2d(rad, m.weight.abs(), None, m.stride, m.padding)
            elif isinstance(m, (nn.AvgPool2d, nn.Flatten)):  # non-negative weights
                mid, rad = m(mid), m(rad)
            else:  # element-wise affine (Normalize, BN): |W| r = |f(r) - f(0)|
                mid, rad = m(mid), (m(rad) - m(torch.zeros_like(rad))).abs()
    lb, ub = ibp(net, x_L, x_U, x=x)
    torch.testing.assert_close(lb, mid - rad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ub, mid + rad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_bounds_contain_samples_and_corners(name):
    net, x, x_L, x_U = _problem(name)
    f = frozen(net, x)
    C = margin_spec(net, x)
    for b in range(x.shape[0]):
        with torch.no_grad():
            out = f(samples(x_L[b], x_U[b], seed=b))
        for fn in METHODS.values():
            lb, ub = fn(net, x_L, x_U, x=x)
            _inside(out, lb[b], ub[b])
            lb, ub = fn(net, x_L, x_U, C=C, x=x)
            _inside(out @ C[b].T, lb[b], ub[b])


@pytest.mark.parametrize("name", CASES)
def test_zero_eps_is_exact(name):
    net, x, _, _ = _problem(name)
    with torch.no_grad():
        fx = frozen(net, x)(x)
    for fn in METHODS.values():
        lb, ub = fn(net, x, x, x=x)
        torch.testing.assert_close(lb, fx, rtol=0, atol=1e-10)
        torch.testing.assert_close(ub, fx, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_crown_tighter_than_crown_ibp_and_spec_folding(name):
    net, x, x_L, x_U = _problem(name)
    C = margin_spec(net, x)
    width = {k: [fn(net, x_L, x_U, x=x), fn(net, x_L, x_U, C=C, x=x)]
             for k, fn in METHODS.items()}
    for spec in (0, 1):
        w = {k: (v[spec][1] - v[spec][0]).mean().item() for k, v in width.items()}
        assert w["crown"] < w["crown_ibp"], w  # never looser on average
        assert w["crown_ibp"] < w["ibp"], w  # not a theorem; holds on these nets
    # margin net: C folded into the last Linear, no spec
    folded = copy.deepcopy(net)
    last = folded[-1]
    new = nn.Linear(last.in_features, C.shape[1]).double()
    with torch.no_grad():
        new.weight.copy_(C[0] @ last.weight)
        new.bias.copy_(C[0] @ last.bias)
    folded[-1] = new
    for k, fn in METHODS.items():
        lb, ub = width[k][1]
        flb, fub = fn(folded, x_L, x_U, x=x)
        torch.testing.assert_close(lb, flb, rtol=0, atol=1e-10, msg=k)
        torch.testing.assert_close(ub, fub, rtol=0, atol=1e-10, msg=k)


EXACT = {"tiny_fc": (tiny_fc, (1, 1, 2, 2), 0.5), "tiny_conv": (tiny_conv, (1, 1, 4, 4), 0.2)}


@pytest.mark.parametrize("name", EXACT)
def test_exact_range_within_bounds_and_contains_samples(name):
    factory, shape, eps = EXACT[name]
    net = factory()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    x_L, x_U = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    C = margin_spec(net, x)
    with torch.no_grad():
        out = frozen(net, x)(samples(x_L[0], x_U[0]))
    for spec, vals in ((None, out), (C, out @ C[0].T)):
        lo, hi = exact_output_range(net, x_L, x_U, C=spec, x=x)
        assert lo.dtype == DT and lo.shape == (1, vals.shape[1])
        _inside(vals, lo[0], hi[0])
        if x.numel() <= 12:  # all corners sampled: sampling should come close to the range
            assert ((vals.min(0).values - lo[0]) <= 0.05 * (hi - lo)[0]).all()
            assert ((hi[0] - vals.max(0).values) <= 0.05 * (hi - lo)[0]).all()
        gaps = []
        for fn in METHODS.values():
            lb, ub = fn(net, x_L, x_U, C=spec, x=x)
            assert (lb <= lo + TOL).all() and (hi <= ub + TOL).all()
            gaps.append((lo - lb).max().item())
        assert max(gaps) > 1e-3  # unstable ReLUs: relaxations are genuinely inexact here


def _brute_force_range(steps, x_L, x_U):
    """All 2^n patterns, no pruning: the reference for the pruned search."""
    box = np.stack([x_L.flatten().numpy(), x_U.flatten().numpy()], 1)
    sizes = [int(np.prod(s.shape)) for s in steps if isinstance(s, Relu)]
    lo, hi = None, None
    for bits in itertools.product([0.0, 1.0], repeat=sum(sizes)):
        G, g, A, b, k = np.eye(box.shape[0]), np.zeros(box.shape[0]), [], [], 0
        for s in steps:
            if isinstance(s, Affine):
                G, g = s.W.numpy() @ G, s.W.numpy() @ g + s.b.numpy()
                continue
            m = np.array(bits[k:k + G.shape[0]])
            k += G.shape[0]
            sign = 1 - 2 * m  # active: -z <= 0, inactive: z <= 0
            A += list(sign[:, None] * G)
            b += list(-sign * g)
            G, g = m[:, None] * G, m * g
        vals_lo, vals_hi = [], []
        for row, off in zip(G, g):
            r1 = linprog(row, A_ub=np.array(A), b_ub=np.array(b), bounds=box, method="highs")
            if r1.status == 2:
                break
            r2 = linprog(-row, A_ub=np.array(A), b_ub=np.array(b), bounds=box, method="highs")
            vals_lo.append(r1.fun + off)
            vals_hi.append(-r2.fun + off)
        else:
            lo = np.minimum(lo, vals_lo) if lo is not None else np.array(vals_lo)
            hi = np.maximum(hi, vals_hi) if hi is not None else np.array(vals_hi)
    return lo, hi


def test_exact_range_pruning_agrees_with_brute_force():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(),
                        nn.Linear(3, 2)).double()
    x = torch.rand(1, 3, dtype=DT, generator=torch.Generator().manual_seed(8))
    x_L, x_U = x - 0.5, x + 0.5
    lo, hi = exact_output_range(net, x_L, x_U)
    blo, bhi = _brute_force_range(affine_layers(net, x), x_L, x_U)
    np.testing.assert_allclose(lo[0].numpy(), blo, atol=1e-7)
    np.testing.assert_allclose(hi[0].numpy(), bhi, atol=1e-7)


def test_float32_inputs_follow_input_dtype():
    net, x, x_L, x_U = _problem("conv_eval")
    for fn in METHODS.values():
        lb64, ub64 = fn(net, x_L, x_U)
        lb32, ub32 = fn(net.float(), x_L.float(), x_U.float())
        net.double()
        assert lb32.dtype == torch.float32
        torch.testing.assert_close(lb32.double(), lb64, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ub32.double(), ub64, rtol=1e-4, atol=1e-4)


def test_rejects_unsupported_layers_and_missing_clean_input():
    x = torch.rand(2, 1, 2, 3, dtype=DT)
    for bad in (nn.Tanh(), nn.MaxPool2d(2), nn.Sequential(nn.Flatten(0))):
        with pytest.raises(ValueError):
            ibp(nn.Sequential(bad).double(), x, x)
    net, x, x_L, x_U = _problem("fc_train")
    with pytest.raises(ValueError, match="clean input"):
        crown(net, x_L, x_U)


def test_the_reference_shares_no_code_with_the_bound_layer():
    """bounds/reference.py (and the MILP built on it) import neither auto_LiRPA nor the rest of
    ace_lightning.bounds, and scipy only inside functions (it is an extra, not a dependency)."""
    import ast
    from pathlib import Path

    import ace_lightning.bounds.reference as reference

    folder = Path(reference.__file__).parent
    for name in ("reference.py", "milp.py"):
        tree = ast.parse((folder / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if "auto_LiRPA" in m or m.startswith("ace_lightning.bounds.")
                    and m != "ace_lightning.bounds.reference"}, (name, imported)
        top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in top if m.startswith("scipy")}, name


@pytest.mark.parametrize("name", ["fc_eval", "conv_eval"])
def test_step_lists_and_pre_activation_bounds(name):
    """A prebuilt step list bounds like the net; the pre-activation bounds (IBP, and IBP intersected
    with CROWN) contain every sampled pre-activation, and the intersection is never wider."""
    from ace_lightning.bounds.reference import interval_pre_bounds

    net, x, x_L, x_U = _problem(name)
    steps = affine_layers(net, x)
    for fn in METHODS.values():
        for a, b in zip(fn(steps, x_L, x_U), fn(net, x_L, x_U)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    ibp_pre = interval_pre_bounds(steps, x_L, x_U, tighten=False)
    tight = interval_pre_bounds(steps, x_L, x_U)
    assert sorted(ibp_pre) == sorted(tight) == [i for i, s in enumerate(steps) if isinstance(s, Relu)]
    for b in range(x.shape[0]):
        h = samples(x_L[b], x_U[b], n=500, seed=b).flatten(1)
        for i, s in enumerate(steps):
            if isinstance(s, Relu):
                for lo, hi in (ibp_pre[i], tight[i]):
                    _inside(h, lo[b], hi[b])
                assert (tight[i][0][b] >= ibp_pre[i][0][b]).all() and (tight[i][1][b] <= ibp_pre[i][1][b]).all()
            h = h.clamp(min=0) if isinstance(s, Relu) else h @ s.W.T + s.b
    assert any((t[1] - t[0]).sum() < (p[1] - p[0]).sum() for t, p in zip(tight.values(), ibp_pre.values()))
