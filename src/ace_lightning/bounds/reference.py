"""Independent pure-PyTorch reference ("oracle") for the certified-bound methods.

Why this exists: ``ace_lightning.bounds.lirpa`` wraps auto_LiRPA 0.3; a bug there (or in how we
call it) silently produces *unsound* certificates. This module re-implements IBP, CROWN-IBP
and CROWN from scratch, with deliberately naive dense linear algebra, so that the wrapper
can be checked against something that shares no code with it: the test suite does, and so does
the audit of a run folder (``ace-certify action=audit``, docs/METHOD.md section 13). It imports
neither auto_LiRPA nor the rest of ``ace_lightning.bounds`` (tests/test_reference_bounds.py checks
that). The exact ranges of tiny nets the tests hold it to: tests/exact_ranges.py.

Representation: every supported layer is turned into either an :class:`Affine` step
(a dense matrix on the flattened per-sample vector, built in float64) or a :class:`Relu`
step. Dense matrices are cheap for the tests' nets (<= 3x8x8 inputs) and still fine for the
project's small cert-nets (28x28 inputs: a few tens of MB); they make every formula a
one-liner that is easy to audit. Every bound function takes a net or the step list
:func:`affine_layers` made of it (build it once when bounding many batches).

Conventions (chosen to match auto_LiRPA 0.3 with default options):

* IBP is propagated layer by layer in center/radius form, ``mid' = W mid + b``,
  ``rad' = |W| rad``. Consecutive affine layers are *not* merged (merging would be tighter
  than auto_LiRPA, e.g. conv followed by avg-pool). A specification ``C`` is folded into a
  final ``nn.Linear`` like auto_LiRPA's ``IBP_general`` does, otherwise applied as an
  interval matrix product.
* CROWN uses the "adaptive" ReLU relaxation of auto_LiRPA (see :func:`relu_relaxation`),
  the input box is concretised as ``A c -/+ |A| r``.
* BatchNorm in train mode is "BN with the clean batch's statistics frozen": mean and
  biased variance over batch and spatial dims of the CLEAN input's activations at that
  layer, treated as constants. Hence every function takes the clean input ``x`` as a
  keyword; it is mandatory when a train-mode BN is present (the box midpoint is *not* the
  clean input once the box is clipped to [0, 1]).
* :func:`crown` computes every intermediate bound with CROWN over a dense identity
  specification. This equals auto_LiRPA with ``bound_opts={'sparse_intermediate_bounds':
  False}``; auto_LiRPA's default additionally keeps (IBP-from-previous-layer) bounds for
  neurons that IBP already proves stable, which can make it marginally tighter.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ace_lightning.nets.layers import Normalize

__all__ = [
    "Affine",
    "Relu",
    "Step",
    "Unsupported",
    "affine_layers",
    "affine_forward",
    "relu_relaxation",
    "ibp",
    "crown_ibp",
    "crown",
    "interval_pre_bounds",
    "steps_for",
    "supported",
]

_F64 = torch.float64


@dataclass(frozen=True)
class Affine:
    """``y = W x + b`` on flattened per-sample vectors; W is [n_out, n_in], float64."""

    W: Tensor
    b: Tensor
    in_shape: tuple
    out_shape: tuple
    kind: str  # class name of the source module, e.g. "Linear" (needed for C folding)


@dataclass(frozen=True)
class Relu:
    """Element-wise ReLU on a flattened vector of ``prod(shape)`` neurons."""

    shape: tuple


Step = Union[Affine, Relu]
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_LEAVES = (Normalize, nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten, nn.AvgPool2d) + _BN


# --------------------------------------------------------------------------- layers


class Unsupported(ValueError):
    """The net has a layer the reference does not model exactly (a residual block, MaxPool, ...):
    callers that check a whole run folder report it and skip the check instead of failing."""



def _leaf_modules(net: nn.Module) -> list[nn.Module]:
    """Flatten nested ``nn.Sequential``; reject anything we do not model exactly."""
    if isinstance(net, nn.Sequential):
        return [leaf for child in net for leaf in _leaf_modules(child)]
    if type(net) in _LEAVES:  # exact types: a subclass may override forward()
        return [net]
    raise Unsupported(f"reference bounds: unsupported module {type(net).__name__}: {net}")


def _uses_batch_stats(m: nn.Module) -> bool:
    # PyTorch semantics: train mode, or no running stats tracked at all.
    return isinstance(m, _BN) and (m.training or m.running_mean is None)


def _needs_clean_input(net: nn.Module) -> bool:
    return any(_uses_batch_stats(m) for m in _leaf_modules(net))


def _basis(in_shape: tuple) -> Tensor:
    """Identity basis, one input per row, shaped like a batch of inputs."""
    n = int(np.prod(in_shape))
    return torch.eye(n, dtype=_F64).view(n, *in_shape)


def _matrix(out: Tensor) -> Tensor:
    """Stack of images of the basis vectors -> dense matrix [n_out, n_in]."""
    return out.reshape(out.shape[0], -1).T.contiguous()


def _channel_affine(scale: Tensor, shift: Tensor, shape: tuple, kind: str) -> Affine:
    """Per-channel ``scale * x + shift`` (channel = dim 0 of the per-sample shape)."""
    view = (-1,) + (1,) * (len(shape) - 1)
    s = (scale.view(view) * torch.ones(shape, dtype=_F64)).flatten()
    t = (shift.view(view) * torch.ones(shape, dtype=_F64)).flatten()
    return Affine(torch.diag(s), t, shape, shape, kind)


def _batchnorm(m: nn.Module, shape: tuple, h: Tensor) -> Affine:
    """BN as a fixed per-channel affine map; ``h`` = clean activations [B, n] at its input."""
    ranks = (1, 2) if isinstance(m, nn.BatchNorm1d) else (3,)
    if shape[0] != m.num_features or len(shape) not in ranks:
        raise ValueError(f"{type(m).__name__}({m.num_features}) got per-sample input shape {shape}")
    if _uses_batch_stats(m):
        per_channel = h.view(h.shape[0], shape[0], -1)  # [B, C, spatial]
        if per_channel.shape[0] * per_channel.shape[2] < 2:
            raise ValueError("BatchNorm with batch statistics needs > 1 value per channel")
        mean = per_channel.mean(dim=(0, 2))
        var = per_channel.var(dim=(0, 2), unbiased=False)  # biased, as F.batch_norm / auto_LiRPA
    else:
        mean, var = m.running_mean.to(_F64), m.running_var.to(_F64)
    weight = m.weight.detach().to(_F64) if m.weight is not None else torch.ones_like(mean)
    bias = m.bias.detach().to(_F64) if m.bias is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + m.eps)
    return _channel_affine(scale, bias - mean * scale, shape, type(m).__name__)


def _to_step(m: nn.Module, shape: tuple, h: Tensor) -> Step:
    if isinstance(m, nn.ReLU):
        return Relu(shape)
    if isinstance(m, Normalize):
        if len(shape) != 3:
            raise ValueError(f"Normalize expects [C, H, W] inputs, got {shape}")
        std, mean = m.std.detach().to(_F64).flatten(), m.mean.detach().to(_F64).flatten()
        return _channel_affine(1.0 / std, -mean / std, shape, "Normalize")
    if isinstance(m, _BN):
        return _batchnorm(m, shape, h)
    zero = torch.zeros(1, *shape, dtype=_F64)
    if isinstance(m, nn.Linear):
        W = _matrix(F.linear(_basis(shape), m.weight.detach().to(_F64)))
        b = F.linear(zero, torch.zeros_like(m.weight, dtype=_F64),
                     None if m.bias is None else m.bias.detach().to(_F64))
    elif isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode={m.padding_mode!r} not supported")
        conv = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        W = _matrix(F.conv2d(_basis(shape), m.weight.detach().to(_F64), None, **conv))
        bias = None if m.bias is None else m.bias.detach().to(_F64)
        b = F.conv2d(zero, torch.zeros_like(m.weight, dtype=_F64), bias, **conv)
    elif isinstance(m, nn.AvgPool2d):  # parameter-free and linear: image of the basis
        W, b = _matrix(m(_basis(shape))), m(zero)
    elif isinstance(m, nn.Flatten):
        if m(torch.zeros(2, *shape)).shape[0] != 2:
            raise ValueError("nn.Flatten must not flatten the batch dimension")
        n = int(np.prod(shape))
        W, b = torch.eye(n, dtype=_F64), m(zero)
    else:  # pragma: no cover - _leaf_modules already filtered
        raise ValueError(f"unsupported module {m}")
    return Affine(W, b.flatten(), shape, tuple(b.shape[1:]), type(m).__name__)


def affine_layers(net: nn.Module, x: Tensor) -> list[Step]:
    """Turn ``net`` into a list of :class:`Affine` / :class:`Relu` steps.

    ``x`` is the clean input batch: it fixes the per-sample shape and, for BatchNorm using
    batch statistics, the (constant) statistics, taken from the clean activations.
    """
    shape = tuple(x.shape[1:])
    h = x.detach().cpu().to(_F64).flatten(1)  # clean activations, flattened
    net = copy.deepcopy(net).to("cpu", _F64)  # matrices are built on the CPU in float64
    steps: list[Step] = []
    for m in _leaf_modules(net):
        step = _to_step(m, shape, h)
        steps.append(step)
        h = _apply(step, h)
        if isinstance(step, Affine):
            shape = step.out_shape
    return steps


def _apply(step: Step, h: Tensor) -> Tensor:
    if isinstance(step, Relu):
        return h.clamp(min=0)
    return h @ step.W.to(h).T + step.b.to(h)


def _out_shape(steps: Sequence[Step], in_shape: tuple) -> tuple:
    for s in steps:
        in_shape = s.out_shape if isinstance(s, Affine) else s.shape
    return in_shape


def affine_forward(steps: Sequence[Step], inp: Tensor) -> Tensor:
    """Evaluate the step list (BN with frozen statistics); output shaped like the net's."""
    h = inp.flatten(1)
    for s in steps:
        h = _apply(s, h)
    return h.view(inp.shape[0], *_out_shape(steps, tuple(inp.shape[1:])))


def supported(net: nn.Module) -> Optional[str]:
    """None if the reference can bound ``net`` (in eval mode), else why not (one line)."""
    try:
        _leaf_modules(net)
    except Unsupported as err:
        return " ".join(str(err).split())
    return None


Net = Union[nn.Module, Sequence[Step]]


def steps_for(net: Net, x_L: Tensor, x_U: Tensor, x: Optional[Tensor]) -> list[Step]:
    """The step list of ``net`` (or ``net`` itself when it already is one) for inputs in [x_L, x_U]."""
    if not isinstance(net, nn.Module):  # a step list made by affine_layers
        return list(net)
    if x is None:
        if _needs_clean_input(net):
            raise ValueError("net has BatchNorm using batch statistics: pass the clean input x=")
        x = (x_L + x_U) / 2  # only used for shapes
    return affine_layers(net, x)


# ----------------------------------------------------------------------------- IBP


def _interval_affine(W: Tensor, b: Tensor, lb: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    """Center/radius interval product; W is [n_out, n_in] or batched [B, n_out, n_in]."""
    mid, rad = (ub + lb) / 2, (ub - lb) / 2
    if W.dim() == 2:  # one matrix for the batch: a broadcast batched product would copy W per input
        mid, rad = mid @ W.T + b, rad @ W.abs().T
    else:
        mid = (W @ mid.unsqueeze(-1)).squeeze(-1) + b
        rad = (W.abs() @ rad.unsqueeze(-1)).squeeze(-1)
    return mid - rad, mid + rad


def _ibp_steps(steps: Sequence[Step], x_L: Tensor, x_U: Tensor, C: Optional[Tensor] = None):
    """IBP through ``steps``; also returns the bounds at every ReLU input (by step index)."""
    lb, ub = x_L.flatten(1), x_U.flatten(1)
    pre: dict[int, tuple[Tensor, Tensor]] = {}
    for i, s in enumerate(steps):
        if isinstance(s, Relu):
            pre[i] = (lb, ub)
            lb, ub = lb.clamp(min=0), ub.clamp(min=0)
            continue
        W, b = s.W.to(lb), s.b.to(lb)
        if C is not None and i == len(steps) - 1 and s.kind == "Linear":
            W, b, C = C @ W, (C @ b.unsqueeze(-1)).squeeze(-1), None  # fold spec into last Linear
        lb, ub = _interval_affine(W, b, lb, ub)
    if C is not None:
        lb, ub = _interval_affine(C, torch.zeros((), dtype=lb.dtype, device=lb.device), lb, ub)
    return lb, ub, pre


def _shaped(lb: Tensor, ub: Tensor, steps, x_L: Tensor, C: Optional[Tensor]):
    if C is not None:
        return lb, ub
    shape = (x_L.shape[0], *_out_shape(steps, tuple(x_L.shape[1:])))
    return lb.view(shape), ub.view(shape)


def ibp(net: Net, x_L: Tensor, x_U: Tensor, C: Optional[Tensor] = None,
        x: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Interval bounds of ``net`` (or of ``C @ net``, C: [B, S, K]) over the box."""
    steps = steps_for(net, x_L, x_U, x)
    lb, ub, _ = _ibp_steps(steps, x_L, x_U, C)
    return _shaped(lb, ub, steps, x_L, C)


# --------------------------------------------------------------------------- CROWN


def relu_relaxation(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """auto_LiRPA 0.3 "adaptive" relaxation: ``d_l x <= relu(x) <= d_u x + b_u`` on [l, u].

    The 1e-8 guard (auto_LiRPA's ``_relu_upper_bound``) keeps the division finite for
    l = u = 0; stable neurons then come out exact (d_u = d_l = 1 or 0, b_u = 0).
    Returns ``(d_l, d_u, b_u)``.
    """
    l_r = l.clamp(max=0)
    u_r = torch.max(u.clamp(min=0), l_r + 1e-8)
    d_u = u_r / (u_r - l_r)
    b_u = -l_r * d_u
    d_l = (d_u > 0.5).to(d_u.dtype)
    return d_l, d_u, b_u


def _backward(steps: Sequence[Step], pre: dict, C: Optional[Tensor], x_L: Tensor, x_U: Tensor):
    """One CROWN pass: linear bounds of ``C @ steps(x)`` pushed back to the input box.

    ``pre[i]`` are the bounds of the input of ReLU step ``i``; C is [B, S, n_out]. C = None is the
    identity specification on an output of an Affine step (a ReLU's input): the pass starts from
    that step's own matrix, which is exactly I @ W without the n x n product.
    """
    if C is None:
        last = steps[-1]
        assert isinstance(last, Affine), "the identity specification starts at an Affine step"
        W, b = last.W.to(x_L), last.b.to(x_L)
        lA = uA = W.expand(x_L.shape[0], *W.shape)
        lbias = b.expand(x_L.shape[0], -1).clone()
        ubias = lbias.clone()
        steps = steps[:-1]
    else:
        lA, uA = C, C
        lbias = torch.zeros(C.shape[:2], dtype=C.dtype, device=C.device)
        ubias = lbias.clone()
    for i in reversed(range(len(steps))):
        s = steps[i]
        if isinstance(s, Affine):
            W, b = s.W.to(lA), s.b.to(lA)
            lbias, ubias = lbias + lA @ b, ubias + uA @ b
            lA, uA = lA @ W, uA @ W
            continue
        d_l, d_u, b_u = (t.unsqueeze(1) for t in relu_relaxation(*pre[i]))  # [B, 1, n]
        # lower bound: positive coefficients take the lower line, negative the upper line
        pos, neg = lA.clamp(min=0), lA.clamp(max=0)
        lbias = lbias + (neg * b_u).sum(-1)
        lA = pos * d_l + neg * d_u
        # upper bound: the other way round
        pos, neg = uA.clamp(min=0), uA.clamp(max=0)
        ubias = ubias + (pos * b_u).sum(-1)
        uA = pos * d_u + neg * d_l
    c = ((x_U + x_L) / 2).flatten(1).unsqueeze(-1)
    r = ((x_U - x_L) / 2).flatten(1).unsqueeze(-1)
    lb = (lA @ c - lA.abs() @ r).squeeze(-1) + lbias
    ub = (uA @ c + uA.abs() @ r).squeeze(-1) + ubias
    return lb, ub


def _spec(C: Optional[Tensor], steps, x_L: Tensor) -> Tensor:
    if C is not None:
        return C.to(x_L)
    n = int(np.prod(_out_shape(steps, tuple(x_L.shape[1:]))))
    return torch.eye(n, dtype=x_L.dtype, device=x_L.device).expand(x_L.shape[0], n, n)


def crown_ibp(net: Net, x_L: Tensor, x_U: Tensor, C: Optional[Tensor] = None,
              x: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """CROWN-IBP: IBP pre-activation bounds, then one CROWN pass from the output."""
    steps = steps_for(net, x_L, x_U, x)
    _, _, pre = _ibp_steps(steps, x_L, x_U)
    lb, ub = _backward(steps, pre, _spec(C, steps, x_L), x_L, x_U)
    return _shaped(lb, ub, steps, x_L, C)


def crown(net: Net, x_L: Tensor, x_U: Tensor, C: Optional[Tensor] = None,
          x: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Full CROWN: each ReLU's input bounded by its own CROWN pass, in forward order."""
    steps = steps_for(net, x_L, x_U, x)
    pre: dict[int, tuple[Tensor, Tensor]] = {}
    for i, s in enumerate(steps):
        if isinstance(s, Relu):
            pre[i] = _backward(steps[:i], pre, None, x_L, x_U)
    lb, ub = _backward(steps, pre, _spec(C, steps, x_L), x_L, x_U)
    return _shaped(lb, ub, steps, x_L, C)


def interval_pre_bounds(net: Net, x_L: Tensor, x_U: Tensor, x: Optional[Tensor] = None,
                        tighten: bool = True) -> dict[int, tuple[Tensor, Tensor]]:
    """Bounds of every ReLU's input (by step index; [B, n] each) over the box: IBP, and with
    ``tighten`` the intersection of IBP and CROWN, layer by layer (each CROWN pass uses the
    tightest bounds of the layers before it). The intersection of sound bounds is sound; an
    exact verifier (bounds/milp.py) needs them as tight as it can get for its big-M encoding."""
    steps = steps_for(net, x_L, x_U, x)
    _, _, ibp_pre = _ibp_steps(steps, x_L, x_U)
    if not tighten:
        return ibp_pre
    pre: dict[int, tuple[Tensor, Tensor]] = {}
    for i, s in enumerate(steps):
        if isinstance(s, Relu):
            lo, hi = _backward(steps[:i], pre, None, x_L, x_U)
            pre[i] = (torch.maximum(lo, ibp_pre[i][0]), torch.minimum(hi, ibp_pre[i][1]))
    return pre
