"""Make auto-LiRPA 0.3 (the only release on PyPI, written for torch < 1.13) work on torch 2.x.

Every break measured on torch 2.13/2.14 (docs/METHOD.md section 10) is restored here, each one
*only when the thing it restores is missing* (so a future auto_LiRPA or torch that fixes it makes
the patch a no-op). ``apply()`` must run before ``import auto_LiRPA`` (patches 1-5) and again after
it (patches 6-8); ``ace_lightning.bounds`` does both, and nothing else in the package imports
auto_LiRPA. ``APPLIED`` records which patches were needed, for tests and bug reports.

Patch 9 of the list (alpha-CROWN shape error when >90% of a layer is unstable) is not a code patch:
the bound layer passes ``bound_opts={'minimum_sparsity': 1.0}``, see ``DEFAULT_BOUND_OPTS``.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import types
import warnings
from typing import Callable

import torch
from torch import nn

APPLIED: dict[str, bool] = {}

# Options every BoundedModule is built with (patch 9: never take 0.3's crashing dense-alpha path).
DEFAULT_BOUND_OPTS: dict = {"minimum_sparsity": 1.0}


def _record(name: str, needed: bool) -> None:
    APPLIED[name] = APPLIED.get(name, False) or needed


# ---- patches that must run before `import auto_LiRPA` -----------------------------------------

def patch_numpy_arraysetops() -> bool:
    """1. numpy 2 removed ``numpy.lib.arraysetops`` (auto_LiRPA imports ``isin`` from it)."""
    try:
        importlib.import_module("numpy.lib.arraysetops")
        return False
    except ImportError:
        import numpy

        mod = types.ModuleType("numpy.lib.arraysetops")
        mod.isin = numpy.isin  # type: ignore[attr-defined]
        mod.unique = numpy.unique  # type: ignore[attr-defined]
        sys.modules["numpy.lib.arraysetops"] = mod
        numpy.lib.arraysetops = mod  # type: ignore[attr-defined]
        return True


def patch_torch_six() -> bool:
    """2. torch 2 removed ``torch._six`` (``string_classes`` is used in register_parameter)."""
    if hasattr(torch, "_six") and hasattr(torch._six, "string_classes"):
        return False
    try:
        importlib.import_module("torch._six")
        if hasattr(torch._six, "string_classes"):
            return False
    except ImportError:
        pass
    mod = types.ModuleType("torch._six")
    mod.string_classes = (str, bytes)  # type: ignore[attr-defined]
    sys.modules["torch._six"] = mod
    torch._six = mod  # type: ignore[attr-defined]
    return True


def _onnx_globals():
    """The exporter's GLOBALS object; its module moved in torch 2.9."""
    for path in ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"):
        try:
            return importlib.import_module(path).GLOBALS
        except (ImportError, AttributeError):
            continue
    raise ImportError("cannot find torch.onnx GLOBALS (needed by auto_LiRPA's graph parser)")


def patch_set_opset_version() -> bool:
    """3. torch >= 1.13 removed ``symbolic_helper._set_opset_version``; the opset lives on GLOBALS."""
    import torch.onnx.symbolic_helper as sh

    if hasattr(sh, "_set_opset_version"):
        return False
    glob = _onnx_globals()

    def _set_opset_version(opset_version: int) -> None:
        glob.export_onnx_opset_version = opset_version

    sh._set_opset_version = _set_opset_version  # type: ignore[attr-defined]
    return True


def patch_node_getitem() -> bool:
    """4. torch >= 1.13 dropped ``torch._C.Node.__getitem__`` (``n[k]`` in parse_graph)."""
    if hasattr(torch._C.Node, "__getitem__"):
        return False
    import torch.onnx.symbolic_helper as sh

    node_get: Callable = getattr(sh, "_node_get", None) or (
        lambda node, key: getattr(node, node.kindOf(key))(key)
    )
    torch._C.Node.__getitem__ = lambda self, key: node_get(self, key)  # type: ignore[attr-defined]
    return True


def _symbolic_registry():
    for path in (
        "torch.onnx._internal.torchscript_exporter.registration",
        "torch.onnx._internal.registration",
    ):
        try:
            return importlib.import_module(path).registry
        except (ImportError, AttributeError):
            continue
    return None


def patch_symbolic_registration() -> bool:
    """5. torch 2 registers ONNX symbolics for opsets >= 11 lazily; without them ``gather`` is
    exported as OneHot and loss fusion fails."""
    registry = _symbolic_registry()
    if registry is None:
        return False
    group = registry.get_function_group("aten::gather")
    versions = set(getattr(getattr(group, "_functions", None), "_base", {}) or {}) if group else set()
    if not group or any(v >= 11 for v in versions):
        return False
    import torch.onnx.utils as onnx_utils

    trigger = getattr(onnx_utils, "_trigger_symbolic_function_registration", None)
    if trigger is None:
        return False
    trigger()
    return True


# ---- patches that need auto_LiRPA imported -------------------------------------------------

def _accepts_remove_duplicate(fn: Callable) -> bool:
    params = inspect.signature(fn).parameters
    return "remove_duplicate" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def patch_named_members() -> bool:
    """6. torch 2's ``named_parameters`` passes ``remove_duplicate=`` to ``_named_members``, which
    BoundedModule and BoundDataParallel override without it."""
    from auto_LiRPA.bound_general import BoundedModule

    classes = [BoundedModule]
    try:
        from auto_LiRPA.bound_multi_gpu import BoundDataParallel

        classes.append(BoundDataParallel)
    except ImportError:  # pragma: no cover - present in 0.3
        pass
    patched = False
    for cls in classes:
        original = cls.__dict__.get("_named_members")
        if original is None or _accepts_remove_duplicate(original):
            continue

        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True,
                           _original=original):
            # 0.3's override already de-duplicates; the flag only matters for torch's default.
            return _original(self, get_members_fn, prefix, recurse)

        cls._named_members = _named_members
        patched = True
    return patched


def _patches_const_bug_present() -> bool:
    from auto_LiRPA.operators.bivariate import BoundMul
    from auto_LiRPA.patches import Patches

    probe = Patches(torch.ones(1, 2, 3, 3, 3), stride=1, padding=1, shape=(1, 2, 3, 3, 3))
    try:
        BoundMul._multiply_by_const(probe, torch.ones(1, 3, 1, 1))
        return False
    except AssertionError:
        return True


def patch_patches_channel_const() -> bool:
    """7. (0.3 bug) CROWN in patches mode asserts on a per-channel constant of shape (1, C, 1, 1)
    before a conv (our Normalize layer): only a constant with the full batch dimension was
    accepted. Upstream later accepted batch dimension 1, which broadcasts the same way."""
    if not _patches_const_bug_present():
        return False
    from auto_LiRPA.operators.bivariate import BoundMul
    from auto_LiRPA.patches import Patches

    original = BoundMul._multiply_by_const

    def _multiply_by_const(x, const):
        if (
            isinstance(x, Patches)
            and isinstance(const, torch.Tensor)
            and const.ndim == 4
            and const.size(0) == 1
            and x.patches.ndim == 5
            and const.size(1) == x.patches.size(-3)
            and const.size(2) == const.size(3) == 1
        ):
            # patches (spec, batch, in_c, ph, pw) * const (1, in_c, 1, 1): channel-wise broadcast.
            return x.create_similar(x.patches * const)
        return original(x, const)

    BoundMul._multiply_by_const = staticmethod(_multiply_by_const)
    return True


def _clamp_gradient_is_exclusive() -> bool:
    x = torch.tensor([0.0, 1.0], requires_grad=True)
    x.clamp(min=0.0, max=1.0).sum().backward()
    return bool((x.grad == 0).any())


def _clamp_inclusive(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp whose gradient is 1 on the closed interval [lo, hi] (torch < 2.14 behaviour)."""
    inside = (x >= lo) & (x <= hi)
    return torch.where(inside, x, x.detach().clamp(min=lo, max=hi))


def patch_relu_alpha_clamp() -> bool:
    """8. torch 2.14 gives clamp a zero gradient at the boundary. alpha starts at exactly 0 or 1
    (the adaptive CROWN slopes), so alpha never moves and alpha-CROWN silently equals CROWN."""
    if not _clamp_gradient_is_exclusive():
        return False
    from auto_LiRPA.operators.activation import BoundRelu

    def _relu_mask_alpha(lower, upper, lb_lower_d, ub_lower_d):
        lower_mask = (lower >= 0).requires_grad_(False).to(lower.dtype)
        upper_mask = (upper <= 0).requires_grad_(False)
        zero_coeffs = upper_mask.all()
        no_mask = (1.0 - lower_mask) * (1.0 - upper_mask.to(upper.dtype))
        if lb_lower_d is not None:
            lb_lower_d = _clamp_inclusive(lb_lower_d, 0.0, 1.0) * no_mask + lower_mask
        if ub_lower_d is not None:
            ub_lower_d = _clamp_inclusive(ub_lower_d, 0.0, 1.0) * no_mask + lower_mask
        return lb_lower_d, ub_lower_d, zero_coeffs

    BoundRelu._relu_mask_alpha = staticmethod(_relu_mask_alpha)
    return True


def _params_forward_mutates_requires_grad() -> bool:
    from auto_LiRPA.operators.leaf import BoundParams

    param = nn.Parameter(torch.zeros(1))
    node = BoundParams("probe", param)
    node.eval()
    node.forward()
    return not param.requires_grad


def patch_params_requires_grad() -> bool:
    """10. (0.3 design, not a torch break) ``BoundParams.forward`` calls
    ``param.requires_grad_(self.training)`` on the *user's* parameters: an eval-mode bound
    computation silently freezes the net (bounds are no longer differentiable) and a train-mode one
    unfreezes a net the user froze (a gate's frozen cert-net). Parameters are shared with the user's
    module, so the bound layer must not touch their flags."""
    if not _params_forward_mutates_requires_grad():
        return False
    from auto_LiRPA.operators.leaf import BoundParams

    def forward(self):
        return self.param_init if self.initializing else self.param

    BoundParams.forward = forward
    return True


def patch_avgpool_noncontiguous() -> bool:
    """11. (0.3 bug) ``BoundAveragePool.bound_backward`` calls ``.view`` on the incoming A matrix,
    which fails when A is non-contiguous (an average-pooling first layer under a Normalize layer,
    the downsampled cert-net view of the paper's ImageNet200 setting)."""
    from auto_LiRPA.operators.pooling import BoundAveragePool

    original = BoundAveragePool.bound_backward
    if "last_A.view(" not in inspect.getsource(original):
        return False

    def bound_backward(self, last_lA, last_uA, x, _original=original):
        def fix(a):
            return a.contiguous() if isinstance(a, torch.Tensor) else a

        return _original(self, fix(last_lA), fix(last_uA), x)

    BoundAveragePool.bound_backward = bound_backward
    return True


PRE_IMPORT = {
    "numpy_arraysetops": patch_numpy_arraysetops,
    "torch_six": patch_torch_six,
    "set_opset_version": patch_set_opset_version,
    "node_getitem": patch_node_getitem,
    "symbolic_registration": patch_symbolic_registration,
}
POST_IMPORT = {
    "named_members": patch_named_members,
    "patches_channel_const": patch_patches_channel_const,
    "relu_alpha_clamp": patch_relu_alpha_clamp,
    "params_requires_grad": patch_params_requires_grad,
    "avgpool_noncontiguous": patch_avgpool_noncontiguous,
}


_DONE = False


SKIP_ENV = "ACE_LIRPA_COMPAT_SKIP"


@contextlib.contextmanager
def quiet_import():
    """auto_LiRPA 0.3's import configures the whole process: ``logging.basicConfig(stream=sys.stdout)``
    (a root handler: every library's log records then print a second time, in its format, on
    stdout), ``warnings.simplefilter("once")`` twice (every DeprecationWarning of every library shows
    from then on, over any filter set before), torch.jit.script's FutureWarning from its operators,
    and torch.utils.cpp_extension's "No CUDA runtime is found" on CPU-only torch (about the CUDA
    extension auto_LiRPA can build, which ace-lightning never does). Inside this block basicConfig
    finds a (placeholder) root handler and does nothing, the warning filters are restored after,
    and the warnings raised are recorded: deprecations dropped, any other shown again."""
    root = logging.getLogger()
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension.level
    cpp_extension.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
    finally:
        root.removeHandler(placeholder)
        cpp_extension.setLevel(level)
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def apply(skip: tuple[str, ...] = ()) -> dict[str, bool]:
    """Apply every needed patch and import auto_LiRPA; later calls are no-ops (the first call
    wins). ``skip`` (or the comma-separated env var ACE_LIRPA_COMPAT_SKIP) exists for the tests
    that show each patch is needed, run in a fresh process since patches are process-wide."""
    global _DONE
    skip = tuple(skip) + tuple(s for s in os.environ.get(SKIP_ENV, "").split(",") if s)
    unknown = set(skip) - set(PRE_IMPORT) - set(POST_IMPORT)
    if unknown:
        raise ValueError(f"unknown compat patch(es) {sorted(unknown)}; known: "
                         f"{sorted(PRE_IMPORT) + sorted(POST_IMPORT)}")
    if _DONE:
        return dict(APPLIED)
    _DONE = True
    for name, fn in PRE_IMPORT.items():
        if name not in skip:
            _record(name, fn())
    with quiet_import():
        importlib.import_module("auto_LiRPA")
    for name, fn in POST_IMPORT.items():
        if name not in skip:
            _record(name, fn())
    return dict(APPLIED)
