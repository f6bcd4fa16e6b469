"""Small building blocks shared by every architecture, and ``eval_mode`` for any net.

Normalisation is a layer inside each net so that eps is always given in pixel space [0, 1]
(docs/METHOD.md section 1) and the bound layer sees the exact affine map.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn
from ace_lightning.errors import ConfigError


class Normalize(nn.Module):
    """Fixed per-channel ``(x - mean) / std``; buffers so they follow ``.to(device)``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if (std_t <= 0).any():
            raise ConfigError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode inside (BatchNorm with its running statistics, no dropout), then
    ``net.train(mode it had)``, also when the body raises (like ``net.train(was)``, this sets
    every submodule to that one mode)."""
    was = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was)
