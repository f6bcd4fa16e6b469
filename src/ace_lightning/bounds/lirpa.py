"""Bounds of a network over the l-inf ball intersected with the pixel box, via auto_LiRPA.

This module and ``compat`` are the only places in ace-lightning that touch auto_LiRPA: everything
else asks for "output bounds of this net on this ball" or "margin lower bounds". Why a wrapper:
- the ball is always intersected with [0, 1] (eps lives in pixel space, docs/METHOD.md section 1;
  the question is checked in bounds/problem.py before anything is computed);
- the methods (IBP, CROWN-IBP, CROWN, alpha-CROWN) are a registry, bounds/methods.py: each runs on
  the BoundedModule built here (``_compute_bounds``);
- BoundedModules are expensive to build (a trace + ONNX pass), so they are cached per net, input
  shape, mode and parameter identity;
- auto_LiRPA copies buffers: BatchNorm running statistics would be updated in the wrapper's copy
  only. We alias the wrapper's buffers to the user's tensors so there is one copy;
- building a BoundedModule runs the net twice; in train mode that would move the running
  statistics, so they are restored afterwards;
- every bound is computed in full precision whatever the caller's context (bounds/precision.py),
  inputs and net in float32 or float64 (``dtype``).
"""
from __future__ import annotations

import contextlib
import io
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ace_lightning.bounds import compat
from ace_lightning.bounds.methods import BOUND_METHODS
from ace_lightning.bounds.precision import _working, precise
from ace_lightning.bounds.problem import (check_beta, check_c, check_labels, input_box, margin_spec, normalize_method,
                                          validate_ball, validate_box)
from ace_lightning.errors import ConfigError

compat.apply()

from auto_LiRPA import BoundedModule, BoundedTensor  # noqa: E402
from auto_LiRPA.perturbations import PerturbationLpNorm  # noqa: E402

# auto_LiRPA operators the bound layer is tested on (tests/test_bounds_*.py). Anything else is
# refused with a ValueError rather than trusted silently.
SUPPORTED_OPS = frozenset({
    "BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundLinear", "BoundMatMul",
    "BoundConv", "BoundRelu", "BoundBatchNormalization", "BoundAveragePool", "BoundFlatten",
    "BoundReshape", "BoundAdd", "BoundSub", "BoundMul", "BoundDiv", "BoundShape", "BoundGather",
    "BoundUnsqueeze", "BoundSqueeze", "BoundConcat", "BoundIdentity", "BoundGlobalAveragePool",
})
# Extra operators of the loss-fusion wrapper (built by us, not by the user).
_FUSION_OPS = frozenset({"BoundExp", "BoundReduceSum", "BoundGatherElements", "BoundNeg"})

_STRICT_AVGPOOL = True  # 0.3 is unsound on overlapping windows (tests/test_bounds_reference.py)


class _MarginCE(nn.Module):
    """Loss-fusion head: sum_j exp(z_j - z_y), whose log is the cross-entropy. Bounding it from
    above bounds the CE directly with one bound row instead of K-1 margin rows."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        z = z - torch.gather(z, dim=-1, index=y.unsqueeze(-1))
        return torch.exp(z).sum(dim=-1, keepdim=True)


@dataclass
class _Entry:
    bounded: BoundedModule
    buffer_links: list = field(default_factory=list)  # (bound node, user module, buffer name)

    def sync_buffers(self) -> None:
        """Point the wrapper's buffer nodes at the user's current tensors (``.to()``, ``load_state_dict``
        with assign, or a checkpoint restore may have replaced them)."""
        for node, module, name in self.buffer_links:
            tensor = module._buffers[name]
            if node._buffers.get("buffer") is not tensor:
                node._buffers["buffer"] = tensor


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
CACHE_PER_NET = 16  # BoundedModules kept per net (one per input shape and kind)


def _resolve_buffer(root: nn.Module, dotted: str):
    module_name, _, buf_name = dotted.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    if buf_name not in module._buffers:
        return None
    return module, buf_name


def _check_ops(bounded: BoundedModule, net: nn.Module, extra: frozenset = frozenset()) -> None:
    allowed = SUPPORTED_OPS | extra
    for node in bounded._modules.values():
        kind = type(node).__name__
        if _STRICT_AVGPOOL and kind == "BoundAveragePool" and (list(node.kernel_size) != list(node.stride)
                                           or any(node.padding)):
            # 0.3's backward pass for average pooling is exact only for non-overlapping windows.
            raise ConfigError(f"bound layer handles AvgPool2d only with stride == kernel_size and no "
                             f"padding (got kernel {list(node.kernel_size)}, stride "
                             f"{list(node.stride)}, padding {list(node.padding)})")
        if kind not in allowed:
            where = getattr(node, "ori_name", "") or node.name
            raise ConfigError(f"bound layer cannot handle operation {kind[5:] or kind} (at {where!r}) in "
                             f"{type(net).__name__}; supported: Linear, Conv2d, ReLU, BatchNorm, "
                             f"AvgPool2d, Flatten, residual add, Normalize")


def _build(net: nn.Module, x: torch.Tensor, kind: str) -> _Entry:
    fusion = kind == "fusion"
    model = _MarginCE(net) if fusion else net
    # The whole batch as the trace input: train-mode BatchNorm1d needs more than one sample.
    dummy = ((x.detach(), torch.zeros(x.shape[0], dtype=torch.long, device=x.device)) if fusion
             else (x.detach(),))
    # Building traces and runs the net: in train mode that would move BN running statistics.
    saved = {k: v.detach().clone() for k, v in net.state_dict().items() if not isinstance(v, nn.Parameter)}
    named_buffers = dict(net.named_buffers())
    # auto_LiRPA switches a net with BatchNorm1d to eval mode while converting it: restore the modes
    modes = [(m, m.training) for m in net.modules()]
    try:
        # ONNX-export chatter and auto_LiRPA's prints from the trace are not the user's concern
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            bounded = BoundedModule(model, dummy, bound_opts=dict(compat.DEFAULT_BOUND_OPTS),
                                    device=x.device)
    except NotImplementedError as err:
        raise ConfigError(f"bound layer cannot handle {type(net).__name__}: auto_LiRPA reports "
                         f"{str(err).splitlines()[0] if str(err) else 'an unsupported operation'}") from None
    except Exception as err:  # tracing failures: name the module, keep it one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"bound layer cannot handle {type(net).__name__}: {first}") from None
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                if name in named_buffers:
                    named_buffers[name].copy_(value)
        for m, mode in modes:
            m.training = mode
    _check_ops(bounded, net, _FUSION_OPS if fusion else frozenset())
    # final_shape is overwritten by later calls with a spec C: remember the net's own width.
    bounded.ace_num_outputs = int(bounded.final_shape[-1])
    entry = _Entry(bounded)
    prefix = "net." if fusion else ""
    for node in bounded._modules.values():
        if type(node).__name__ != "BoundBuffers":
            continue
        ori = getattr(node, "ori_name", "")
        if ori.startswith(prefix):
            found = _resolve_buffer(net, ori[len(prefix):])
            if found is not None:
                entry.buffer_links.append((node, *found))
    entry.sync_buffers()
    return entry


def bounded_module(net: nn.Module, x: torch.Tensor, kind: str = "plain") -> BoundedModule:
    """The cached BoundedModule for ``net`` at this input shape (built on first use). ``kind``:
    "plain"; "fusion" (the loss-fusion head); "alpha" (alpha-CROWN keeps optimised slopes in the
    module and reuses them in later backward passes, so it never shares a module with CROWN)."""
    if kind not in ("plain", "fusion", "alpha"):
        raise ConfigError(f"unknown BoundedModule kind {kind!r}")
    key = (kind, tuple(x.shape), x.device, x.dtype, net.training,
           tuple(id(p) for p in net.parameters()))
    per_net = _CACHE.setdefault(net, {})
    entry = per_net.pop(key, None)
    if entry is None:
        entry = _build(net, x, kind)
        while len(per_net) >= CACHE_PER_NET:  # the least recently used shape goes (a module holds the
            per_net.pop(next(iter(per_net)))  # intermediate bounds of its last pass)
    per_net[key] = entry  # most recently used last
    entry.sync_buffers()
    entry.bounded.train(net.training)
    return entry.bounded


def padded_rows(rows: torch.Tensor, step: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """(the row indices ``rows`` (a bool mask over a batch, or indices) padded by repeating the
    first, the number of real ones): a bound pass on a varying subset of a batch then meets few
    input shapes, so its BoundedModules come from the cache instead of being traced again.

    Padded to the next power of two; with ``step``, to powers of two up to ``step`` and multiples
    of ``step`` beyond (fewer padded rows on large subsets); a mask's never beyond its length. The
    size is part of a caller's results (a bound pass's rounding may depend on its batch shape), so
    each caller keeps the rule it has always used."""
    mask = rows.dtype == torch.bool
    idx = rows.nonzero().flatten() if mask else rows
    n = int(idx.numel())
    size = 1 << max(0, n - 1).bit_length()
    if step is not None and n > step:
        size = -(-n // step) * step
    if mask:
        size = min(size, int(rows.numel()))
    if 0 < n < size:
        idx = torch.cat([idx, idx[:1].expand(size - n)])
    return idx, n


def clear_cache(net: Optional[nn.Module] = None) -> None:
    """Drop cached BoundedModules (of one net, or all)."""
    if net is None:
        _CACHE.clear()
    else:
        _CACHE.pop(net, None)


def _bounded_input(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> BoundedTensor:
    """x (the clean point: the forward pass and train-mode BN statistics) perturbed over the box."""
    eps = float((upper - lower).max()) / 2 if upper.numel() else 0.0
    return BoundedTensor(x, PerturbationLpNorm(norm=np.inf, eps=eps, x_L=lower, x_U=upper))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """0.3 allocates some tensors in the default dtype (alpha-CROWN's best-so-far buffers, the
    exp relaxation of loss fusion): match the input's so float64 bounds work."""
    previous = torch.get_default_dtype()
    switch = dtype in (torch.float32, torch.float64) and dtype != previous
    if switch:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        if switch:
            torch.set_default_dtype(previous)


def _compute(bounded: BoundedModule, bx: BoundedTensor, C: Optional[torch.Tensor], method: str,
             beta: Optional[float], lower: bool, upper: bool):
    """One forward at x (returned: the clean output) and the bounds of ``C @ net`` over the ball."""
    with _default_dtype(bx.dtype):
        return _compute_bounds(bounded, bx, C, method, beta, lower, upper)


def _compute_bounds(bounded: BoundedModule, bx: BoundedTensor, C: Optional[torch.Tensor], method: str,
                    beta: Optional[float], lower: bool, upper: bool):
    """The named method's pass (bounds/methods.py) on the BoundedModule."""
    return BOUND_METHODS.create(method, bounded, bx, C, beta, lower, upper)


def _box_pass(net: nn.Module, x: torch.Tensor, box, method: str, beta: Optional[float], C, y,
              lower_side: bool, upper_side: bool, dtype):
    """The one place a bound is computed: net and box in the working dtype (``box``: eps of the
    ball around x, or the corners (lower, upper)), C from ``C`` or the margin rows of ``y``.
    Returns (logits at x, lb, ub). Caller holds full_precision."""
    net, x, dtype = _working(net, x, dtype)
    lower, upper = input_box(x, box) if isinstance(box, float) else (box[0].to(dtype), box[1].to(dtype))
    bounded = bounded_module(net, x, "alpha" if method == "alpha-CROWN" else "plain")
    if y is not None:
        y = check_labels(y, x.shape[0], bounded.ace_num_outputs, x.device)
        C = margin_spec(y, bounded.ace_num_outputs, dtype=dtype)
    elif C is not None:
        C = C.to(dtype)
    return _compute(bounded, _bounded_input(x, lower, upper), C, method, beta, lower_side, upper_side)


@precise
def output_bounds(net: nn.Module, x: torch.Tensor, eps: float, method: str = "IBP", *,
                  beta: Optional[float] = None, C: Optional[torch.Tensor] = None,
                  return_logits: bool = False, dtype: Union[None, str, torch.dtype] = None):
    """Elementwise bounds ``(lb, ub)`` of ``net(x')`` (or of ``C @ net(x')``, C: [B, S, K]) over
    x' in B(x) intersected with [0, 1]. Differentiable w.r.t. the net's parameters (except
    alpha-CROWN, and a ``dtype`` other than the net's own). With ``return_logits`` also returns
    net(x), from the same forward pass (so BN statistics in train mode move exactly once).
    Full precision whatever the caller's autocast/TF32 settings; results in ``dtype`` (float32,
    or float64 when x or the net is float64)."""
    method = normalize_method(method)
    beta = check_beta(method, beta)
    eps = validate_ball(x, eps)
    check_c(C, x.shape[0])
    logits, lb, ub = _box_pass(net, x, eps, method, beta, C, None, True, True, dtype)
    return (lb, ub, logits) if return_logits else (lb, ub)


@precise
def box_bounds(net: nn.Module, lower: torch.Tensor, upper: torch.Tensor, method: str = "IBP", *,
               x: Optional[torch.Tensor] = None, beta: Optional[float] = None,
               C: Optional[torch.Tensor] = None, return_logits: bool = False,
               dtype: Union[None, str, torch.dtype] = None):
    """``(lb, ub)`` of net(x') (or C @ net(x')) over an arbitrary box [lower, upper] inside [0, 1],
    e.g. SABR's small box around an adversarial point; the same checks and precision as
    output_bounds. ``x``: the point the clean forward runs at (logits, train-mode BN statistics),
    inside the box; the box centre by default."""
    method = normalize_method(method)
    beta = check_beta(method, beta)
    validate_box(lower, upper, x)
    check_c(C, lower.shape[0])
    point = (lower + upper) / 2 if x is None else x
    logits, lb, ub = _box_pass(net, point, (lower, upper), method, beta, C, None, True, True, dtype)
    return (lb, ub, logits) if return_logits else (lb, ub)


@precise
def box_margin_lower_bounds(net: nn.Module, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor,
                            method: str = "IBP", *, x: Optional[torch.Tensor] = None,
                            beta: Optional[float] = None, return_logits: bool = False,
                            dtype: Union[None, str, torch.dtype] = None):
    """margin_lower_bounds over the box [lower, upper] instead of a ball: Tensor[B, K-1] of lower
    bounds of z_y - z_j (SABR's robust loss). Not a certificate of the ball unless the box
    contains it."""
    method = normalize_method(method)
    beta = check_beta(method, beta)
    validate_box(lower, upper, x)
    point = (lower + upper) / 2 if x is None else x
    logits, lb, _ = _box_pass(net, point, (lower, upper), method, beta, None, y, True, False, dtype)
    return (lb, logits) if return_logits else lb


@precise
def margin_lower_bounds(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                        method: str = "IBP", *, beta: Optional[float] = None,
                        return_logits: bool = False, dtype: Union[None, str, torch.dtype] = None):
    """Lower bounds of z_y - z_j for every j != y over the ball: Tensor[B, K-1]. All positive
    means certified. The specification is folded into the last linear layer by auto_LiRPA
    (exact for IBP too, which would otherwise lose the correlation between z_y and z_j).
    Full precision and ``dtype`` as in output_bounds."""
    method = normalize_method(method)
    beta = check_beta(method, beta)
    eps = validate_ball(x, eps)
    logits, lb, _ = _box_pass(net, x, eps, method, beta, None, y, True, False, dtype)
    return (lb, logits) if return_logits else lb


@dataclass
class BoundPass:
    """One bound computation for a training loss: lower bounds of C f [B, S] over the ball or box,
    the logits at the pass's clean point, and (on request) the bounds of every ReLU's input, in
    the order of the graph (Shi et al.'s regularisers read them). All differentiable."""

    lb: torch.Tensor
    logits: torch.Tensor
    relu_bounds: Optional[list] = None


@precise
def bound_pass(net: nn.Module, x: torch.Tensor, C: torch.Tensor, *, eps: Optional[float] = None,
               box: Optional[tuple[torch.Tensor, torch.Tensor]] = None, method: str = "IBP",
               beta: Optional[float] = None, relu_bounds: bool = False,
               dtype: Union[None, str, torch.dtype] = None) -> BoundPass:
    """Lower bounds of C @ net(x') over B(x, eps) ∩ [0, 1] (``eps``) or over ``box`` = (lower,
    upper) containing x (SABR's small box): the one call the certified-training losses make."""
    method = normalize_method(method)
    beta = check_beta(method, beta)
    if (eps is None) == (box is None):
        raise ConfigError("bound_pass needs exactly one of eps (the ball around x) or box (lower, upper)")
    if eps is not None:
        region: Union[float, tuple] = validate_ball(x, eps)
    else:
        validate_box(box[0], box[1], x)
        region = (box[0], box[1])
    check_c(C, x.shape[0])
    logits, lb, _ = _box_pass(net, x, region, method, beta, C, None, True, False, dtype)
    relus = None
    if relu_bounds:
        work, wx, _ = _working(net, x, dtype)
        bounded = bounded_module(work, wx, "alpha" if method == "alpha-CROWN" else "plain")
        relus = [(node.inputs[0].lower, node.inputs[0].upper) for node in bounded._modules.values()
                 if type(node).__name__ == "BoundRelu"]
    return BoundPass(lb, logits, relus)


# The worst-case cross-entropy from margin lower bounds, as a batch mean and per input. The two are
# the same quantity (mean of margin_ce == worst_case_ce in exact arithmetic) from two kernels
# (cross_entropy, logsumexp) whose float results and gradients differ in the last bits: each
# training path keeps its own, so that a run's numbers do not move.

def worst_case_ce(lb_margins: torch.Tensor) -> torch.Tensor:
    """Mean CE of the negated margin lower bounds [B, K-1] (true-class entry 0): an upper bound of
    the worst-case cross-entropy over the ball (docs/METHOD.md section 6). The IBP / CROWN-IBP
    training path (robust_ce_loss, the cert stage's margin pass)."""
    worst = torch.cat([torch.zeros_like(lb_margins[:, :1]), -lb_margins], dim=1)
    target = torch.zeros(lb_margins.shape[0], dtype=torch.long, device=lb_margins.device)
    return nn.functional.cross_entropy(worst, target)


def margin_ce(lb: torch.Tensor) -> torch.Tensor:
    """Per input: the same bound as ``worst_case_ce`` (when lb bounds the margins from below), for
    the training methods' per-input losses (stages/losses.py: SABR, the expressive losses, Shi)."""
    worst = torch.cat([torch.zeros_like(lb[:, :1]), -lb], dim=1)
    return torch.logsumexp(worst, dim=1)


@precise
def robust_ce_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                   method: str = "IBP", *, beta: Optional[float] = None, loss_fusion: bool = False,
                   return_logits: bool = False):
    """Upper bound of the worst-case cross-entropy over the ball (mean over the batch): the CE of
    the negated margin lower bounds (true-class entry 0), docs/METHOD.md section 6. With
    ``loss_fusion`` the CE itself is bounded (sum_j exp(z_j - z_y) from above), which costs one
    bound row instead of K-1 (much cheaper with CROWN-IBP and many classes). In fusion mode
    ``return_logits`` runs the plain net once more for the clean logits. A training loss: always
    in the net's own precision (float32 under mixed precision), so gradients reach it."""
    if not loss_fusion:
        out = margin_lower_bounds(net, x, y, eps, method, beta=beta, return_logits=return_logits)
        lb, logits = out if return_logits else (out, None)
        loss = worst_case_ce(lb)
        return (loss, logits) if return_logits else loss
    method = normalize_method(method)
    beta = check_beta(method, beta)
    if method not in ("IBP", "CROWN-IBP"):
        raise ConfigError(f"loss fusion is a training method: use IBP or CROWN-IBP, not {method}")
    eps = validate_ball(x, eps)
    net, x, _ = _working(net, x, None)
    y = torch.as_tensor(y, device=x.device).long().view(-1)
    bounded = bounded_module(net, x, "fusion")
    bx = _bounded_input(x, *input_box(x, eps))
    with _default_dtype(x.dtype):
        bounded(bx, y)
        if method == "IBP" or (beta is not None and beta < 1e-8):
            _, ub = bounded.compute_bounds(x=(bx, y), method="IBP", bound_lower=False)
        else:
            _, iub = bounded.compute_bounds(x=(bx, y), method="IBP", bound_lower=False)
            _, cub = bounded.compute_bounds(method="backward", IBP=False, bound_lower=False)
            b = 1.0 if beta is None else beta
            # Any valid upper bound is >= 1 (the j = y term is exp(0)); the clamp below only
            # guards the log against rounding.
            ub = b * cub + (1 - b) * iub
    loss = torch.log(ub.clamp(min=1.0)).mean()
    if return_logits:
        return loss, net(x)
    return loss
