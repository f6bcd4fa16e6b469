"""Rounding that can only widen a certificate (docs/METHOD.md section 12).

A bound computed in floating point is a bound of the real-arithmetic network only up to the
rounding of the computation, and the deployed model routes by its own rounded forward pass. Two
rules keep both on the safe side:
- every bound the certifier stores is widened by ``slack(dtype) * scale`` (about 256 ulps of the
  pass's dtype times the magnitude of the values involved), so that the rounding of the bound pass
  and of the deployed forward pass cannot put a reachable value outside it;
- whenever precision is lowered (a float64 result written into float32 records, a float64
  threshold exported), lower bounds are rounded toward -inf and upper bounds toward +inf
  (``round_down`` / ``round_up``), never to nearest.
"""
from __future__ import annotations

import torch

# relative slack per dtype: 2^-16 = 256 float32 ulps at 1, 2^-45 = 256 float64 ulps at 1
_REL = {torch.float32: 2.0 ** -16, torch.float64: 2.0 ** -45}


def slack(*dtypes: torch.dtype) -> float:
    """Relative outward slack for values computed in the coarsest of ``dtypes``: the bound pass's
    dtype and the deployed net's (a float64 bound of a float32 model must still cover the float32
    forward pass the model routes and answers with). float16/bfloat16 never certify."""
    for dtype in dtypes:
        if dtype not in _REL:
            raise ValueError(f"certification runs in float32 or float64, not {dtype}")
    return max(_REL[d] for d in dtypes)


def param_dtype(net: torch.nn.Module) -> torch.dtype:
    """The dtype a net runs in when deployed (its first floating parameter; float32 if none)."""
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)


def widen(lb: torch.Tensor, ub: torch.Tensor | None, scale: torch.Tensor, *dtypes: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lb - s, ub + s) with s = slack(*dtypes) * scale (scale >= 0 per entry, e.g. 1 + |values|);
    ``ub`` None: only the lower side. NaN stays NaN (the rule never certifies it)."""
    s = slack(*dtypes) * scale
    return lb - s, (None if ub is None else ub + s)


def round_down(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, rounded toward -inf: the result is <= t (a lower bound stays one)."""
    out = t.to(dtype)
    if out.dtype == t.dtype:
        return out
    with torch.no_grad():
        above = out.to(t.dtype) > t
        step = torch.where(above, torch.nextafter(out, torch.full_like(out, -float("inf"))), out) - out
    return out + step  # gradient as of a plain cast (training losses go through here too)


def round_up(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, rounded toward +inf: the result is >= t (an upper bound stays one)."""
    out = t.to(dtype)
    if out.dtype == t.dtype:
        return out
    with torch.no_grad():
        below = out.to(t.dtype) < t
        step = torch.where(below, torch.nextafter(out, torch.full_like(out, float("inf"))), out) - out
    return out + step
