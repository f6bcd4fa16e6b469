"""Certification networks (docs/METHOD.md section 8), built for any input shape and class count.

Every net is a plain ``nn.Sequential``: [optional AvgPool2d downsample] -> Normalize -> body ->
Linear(K). Only layers the bound layer (auto_LiRPA) traces are used: Conv2d, Linear, ReLU,
Flatten, BatchNorm, AvgPool2d and the residual add of ``WideBlock``. Flatten sizes come from a
dummy forward in eval mode, so BatchNorm statistics are never touched by construction.

``downsample=d`` puts an ``AvgPool2d`` in front so the cert-net sees a d x d view of the input
(ImageNet200: the core sees 224 px, the cert-net 56 px = 224 / 4; the paper's 64 px is not an
integer factor of 224). Average pooling with non-overlapping windows is linear with non-negative
weights, so bounds through it stay sound and tight, and eps keeps its pixel-space meaning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ace_lightning.nets.kinds import NET_KINDS, keywords
from ace_lightning.nets.layers import Normalize, eval_mode
from ace_lightning.errors import ConfigError
from ace_lightning.registries import Registry

Shape = tuple[int, int, int]
# the zoo: name -> body builder (stem, K, **knobs); each architecture registers itself below
CERT_NETS: Registry = Registry("cert-net")


@dataclass
class InputStem:
    """The input layers every cert-net starts with: [AvgPool2d downsample?] then Normalize."""

    layers: list[nn.Module]
    full_shape: Shape  # what the net receives
    shape: Shape  # what the body sees (after downsampling)


def input_stem(
    input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float], downsample: Optional[int] = None,
) -> InputStem:
    c, h, w = (int(v) for v in input_shape)
    if len(mean) != c or len(std) != c:
        raise ConfigError(f"mean/std need {c} entries for input shape {tuple(input_shape)}, got {len(mean)}/{len(std)}")
    layers: list[nn.Module] = []
    body = (c, h, w)
    if downsample is not None and (downsample, downsample) != (h, w):
        d = int(downsample)
        if d <= 0 or h % d or w % d:
            valid = [v for v in range(min(h, w), 0, -1) if h % v == 0 and w % v == 0][:8]
            raise ConfigError(
                f"downsample={downsample} must divide the input size {h}x{w} (average pooling by an "
                f"integer factor); valid sizes include {', '.join(map(str, valid))}"
            )
        layers.append(nn.AvgPool2d(kernel_size=(h // d, w // d)))
        body = (c, d, d)
    layers.append(Normalize(mean, std))
    return InputStem(layers, (c, h, w), body)


def _probe(layers: Sequence[nn.Module], input_shape: Shape) -> torch.Size:
    """Output shape of ``layers`` for one input, in eval mode (BN statistics untouched)."""
    with eval_mode(nn.Sequential(*layers)) as probe, torch.no_grad():
        out = probe(torch.zeros(1, *input_shape))
    return out.shape[1:]


def _conv_stack(in_ch: int, spec: Sequence[tuple[int, int, int, int]], bn: bool = False) -> list[nn.Module]:
    """spec rows: (out_channels, kernel, stride, padding); ReLU after each (BN before it if bn)."""
    layers: list[nn.Module] = []
    for out_ch, k, s, p in spec:
        layers.append(nn.Conv2d(in_ch, out_ch, k, stride=s, padding=p))
        if bn:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU())
        in_ch = out_ch
    return layers


def _conv_fc_net(
    stem: InputStem, num_classes: int,
    convs: Sequence[tuple[int, int, int, int]], hidden: Sequence[int], bn: bool = False,
) -> nn.Sequential:
    """stem -> convs -> Flatten -> hidden linears (ReLU, BN1d before it if bn) -> Linear(K)."""
    body = stem.layers + _conv_stack(stem.shape[0], convs, bn) + [nn.Flatten()]
    width = _probe(body, stem.full_shape).numel()
    for h in hidden:
        body.append(nn.Linear(width, h))
        if bn:
            body.append(nn.BatchNorm1d(h))
        body.append(nn.ReLU())
        width = h
    body.append(nn.Linear(width, num_classes))
    return nn.Sequential(*body)


# --- the zoo -------------------------------------------------------------------------------

# ``bn=True`` puts BatchNorm after every conv and hidden linear (Shi et al.'s fast IBP training).

@CERT_NETS.register()
def fc(stem: InputStem, k: int, hidden: int = 100, bn: bool = False) -> nn.Sequential:
    """Tiny fully connected net: handy for fast tests."""
    return _conv_fc_net(stem, k, [], [hidden], bn=bn)


@CERT_NETS.register()
def small(stem: InputStem, k: int, bn: bool = False) -> nn.Sequential:
    """Tiny conv net for tests and demos (2 convs, fc 100)."""
    return _conv_fc_net(stem, k, [(16, 4, 2, 1), (32, 4, 2, 1)], [100], bn=bn)


@CERT_NETS.register()
def c2(stem: InputStem, k: int, bn: bool = False) -> nn.Sequential:
    """C2: conv 32 k4 s2 p1, conv 32 k4 s2 p1, fc 200, fc K."""
    return _conv_fc_net(stem, k, [(32, 4, 2, 1), (32, 4, 2, 1)], [200], bn=bn)


@CERT_NETS.register()
def c3(stem: InputStem, k: int, bn: bool = False) -> nn.Sequential:
    """C3: conv 32 k3 s1 p1, conv 32 k4 s2 p1, conv 128 k4 s2 p1, fc 250, fc K."""
    return _conv_fc_net(stem, k, [(32, 3, 1, 1), (32, 4, 2, 1), (128, 4, 2, 1)], [250], bn=bn)


_C5_CONVS = [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)]


@CERT_NETS.register()
def c5(stem: InputStem, k: int, bn: bool = False) -> nn.Sequential:
    """C5 (IBP "DM-Large"): conv 64,64,128(s2),128,128 k3 p1, fc 512, fc K."""
    return _conv_fc_net(stem, k, _C5_CONVS, [512], bn=bn)


@CERT_NETS.register()
def cnn7(stem: InputStem, k: int) -> nn.Sequential:
    """CNN7 (Shi et al. 2021): C5's convs and fc 512, each followed by BatchNorm."""
    return _conv_fc_net(stem, k, _C5_CONVS, [512], bn=True)


class WideBlock(nn.Module):
    """Pre-activation wide residual block (BN-ReLU-conv twice) + (1x1 conv) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + self.shortcut(x)


@CERT_NETS.register()
def wrn(stem: InputStem, k: int, widen_factor: int = 10, in_planes: int = 16, pool: int = 7) -> nn.Sequential:
    """TinyImageNet wide ResNet (CROWN-IBP's ``wide_resnet_imagenet64``): conv 16, three groups
    of one wide block (16w, 32w, 64w channels; w=10 gives 160/320/640), BN-ReLU, average pool
    7 (smaller if the map is smaller; non-overlapping windows), fc K."""
    w = widen_factor
    layers = stem.layers + [
        nn.Conv2d(stem.shape[0], in_planes, 3, padding=1),
        WideBlock(in_planes, in_planes * w, 1),
        WideBlock(in_planes * w, 2 * in_planes * w, 2),
        WideBlock(2 * in_planes * w, 4 * in_planes * w, 2),
        nn.BatchNorm2d(4 * in_planes * w),
        nn.ReLU(),
    ]
    _, h, wd = _probe(layers, stem.full_shape)
    layers += [nn.AvgPool2d(min(pool, h, wd)), nn.Flatten()]
    layers.append(nn.Linear(_probe(layers, stem.full_shape).numel(), k))
    return nn.Sequential(*layers)


def create_cert_net(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    downsample: Optional[int] = None,
    **kwargs,
) -> nn.Sequential:
    """A cert-net from the zoo: logits [B, num_classes] for inputs [B, *input_shape] in [0, 1]."""
    name = CERT_NETS.canonical(name)
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    return CERT_NETS.create(name, input_stem(input_shape, mean, std, downsample), int(num_classes), **kwargs)


@NET_KINDS.register("cert")
class CertKind:
    """``kind: cert``: a zoo cert-net on the data's shape, classes and normalisation."""

    @staticmethod
    def build(name: str, info: Any, **kw: Any) -> nn.Sequential:
        return create_cert_net(name, info.input_shape, info.num_classes, info.mean, info.std, **kw)

    @staticmethod
    def knobs(name: str) -> Optional[list[str]]:
        """The keys a net config of ``name`` may have (its builder's after (stem, k))."""
        return ["name", "kind", "downsample", *keywords(CERT_NETS.get(name), 2)]
