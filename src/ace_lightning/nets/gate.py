"""Selection networks: the cert-net architecture with one output logit, initialised from a
trained cert-net except for the last linear layer (docs/METHOD.md section 2a).

The reference implementation crashed while copying these weights; here every parameter and
buffer but the final Linear is checked by name and shape first, and the first mismatch is named.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ace_lightning.nets.cert import CertKind, create_cert_net
from ace_lightning.nets.kinds import NET_KINDS
from ace_lightning.nets.checkpoint import load_state_dict_file, strip_prefix
from ace_lightning.errors import ConfigError


def final_linear_name(net: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` (the classification head)."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(net).__name__} has no Linear layer to replace")
    return names[-1]


def init_gate_from_cert(gate: nn.Module, cert: Union[nn.Module, str]) -> nn.Module:
    """Copy all cert-net parameters/buffers except the final Linear into ``gate`` (in place)."""
    state = cert.state_dict() if isinstance(cert, nn.Module) else load_state_dict_file(cert)
    target = gate.state_dict()
    state = strip_prefix(state, target.keys())
    head = final_linear_name(gate)
    body = [k for k in target if not k.startswith(head + ".")]
    src = f"cert-net {cert if isinstance(cert, str) else type(cert).__name__}"
    for k in body:
        if k not in state:
            raise ConfigError(f"{src} does not match the gate architecture: it lacks {k} {list(target[k].shape)}")
        if state[k].shape != target[k].shape:
            raise ConfigError(
                f"{src} does not match the gate architecture: {k} is {list(state[k].shape)} in the cert-net, "
                f"{list(target[k].shape)} in the gate"
            )
    head_w = state.get(head + ".weight")
    if head_w is None or head_w.shape[1:] != target[head + ".weight"].shape[1:]:
        shape = None if head_w is None else list(head_w.shape)
        raise ConfigError(f"{src} does not match the gate architecture: head {head}.weight is {shape}, gate expects [*, {target[head + '.weight'].shape[1]}]")
    extra = [k for k in state if k not in target]
    if extra:
        raise ConfigError(f"{src} does not match the gate architecture: it has {extra[0]} {list(state[extra[0]].shape)} which the gate lacks")
    with torch.no_grad():
        gate.load_state_dict({**target, **{k: state[k] for k in body}})
    return gate


def create_gate(
    cert_name: str,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    downsample: Optional[int] = None,
    from_cert: Union[nn.Module, str, None] = None,
    **kwargs,
) -> nn.Sequential:
    """Gate g(x): cert-net ``cert_name`` with one logit; body copied from ``from_cert`` if given."""
    gate = create_cert_net(cert_name, input_shape, 1, mean, std, downsample=downsample, **kwargs)
    if from_cert is not None:
        init_gate_from_cert(gate, from_cert)
    return gate


@NET_KINDS.register("gate")
class GateKind:
    """``kind: gate``: a zoo cert-net with one logit (its knobs are the cert-net's)."""

    knobs = staticmethod(CertKind.knobs)

    @staticmethod
    def build(name: str, info: Any, **kw: Any) -> nn.Sequential:
        return create_gate(name, info.input_shape, info.mean, info.std, **kw)
