"""Cert-net zoo shapes, downsampled views, timm cores (stems, weight files, errors) and gates."""
from __future__ import annotations

import glob
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ace_lightning.data import get_dataset_info
from ace_lightning.nets import (
    CERT_NETS,
    Normalize,
    PretrainedUnavailableError,
    build_net,
    create_cert_net,
    create_core,
    create_gate,
    final_linear_name,
)
from ace_lightning.nets import core as core_mod
from ace_lightning.nets.cert import WideBlock

CONF = os.path.join(os.path.dirname(__file__), "..", "src", "ace_lightning", "conf")
SHAPES = [(3, 32, 32), (1, 28, 28), (3, 64, 64)]
# The full-width WRN (160/320/640 channels) is slow on one CPU thread; its width is checked below.
SMALL_KW = {"wrn": {"widen_factor": 1}}


def _stats(c):
    return [0.3 + 0.1 * i for i in range(c)], [0.25] * c


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(CERT_NETS))
def test_cert_net_shapes(name, shape):
    torch.manual_seed(0)
    net = create_cert_net(name, shape, 7, *_stats(shape[0]), **SMALL_KW.get(name, {}))
    assert isinstance(net, nn.Sequential) and isinstance(net[0], Normalize)
    assert isinstance(net[-1], nn.Linear) and net[-1].out_features == 7
    x = torch.rand(3, *shape)
    assert net(x).shape == (3, 7)
    net.eval()
    assert net(x[:1]).shape == (1, 7)


def test_zoo_architectures_match_the_method_table():
    c5 = create_cert_net("c5", (3, 32, 32), 10, *_stats(3))
    convs = [(m.out_channels, m.kernel_size[0], m.stride[0]) for m in c5 if isinstance(m, nn.Conv2d)]
    assert convs == [(64, 3, 1), (64, 3, 1), (128, 3, 2), (128, 3, 1), (128, 3, 1)]
    assert [m.out_features for m in c5 if isinstance(m, nn.Linear)] == [512, 10]
    cnn7 = create_cert_net("cnn7", (3, 32, 32), 10, *_stats(3))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in cnn7) == 5 and sum(isinstance(m, nn.BatchNorm1d) for m in cnn7) == 1
    c2 = create_cert_net("c2", (3, 32, 32), 10, *_stats(3))
    assert [m.out_features for m in c2 if isinstance(m, nn.Linear)] == [200, 10]
    wrn = create_cert_net("wrn", (3, 56, 56), 200, *_stats(3))  # TinyImageNet: construction only
    blocks = [m for m in wrn if isinstance(m, WideBlock)]
    assert [b.conv2.out_channels for b in blocks] == [160, 320, 640]
    assert wrn[-1].in_features == 640 * 2 * 2  # 56 -> 14 after two stride-2 blocks, avg pool 7


def test_downsampled_view_equals_the_small_net_on_pooled_input():
    torch.manual_seed(0)
    big = create_cert_net("c2", (3, 32, 32), 5, *_stats(3), downsample=8)
    small = create_cert_net("c2", (3, 8, 8), 5, *_stats(3))
    assert isinstance(big[0], nn.AvgPool2d) and isinstance(big[1], Normalize)
    shifted = {}  # same layers, indices moved by the AvgPool2d in front
    for k, v in big.state_dict().items():
        index, rest = k.split(".", 1)
        shifted[f"{int(index) - 1}.{rest}"] = v
    small.load_state_dict(shifted)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(big(x), small(F.avg_pool2d(x, 4)))
    imagenet = create_cert_net("small", (3, 224, 224), 200, *_stats(3), downsample=56)
    assert imagenet[0].kernel_size == (4, 4)
    with pytest.raises(ValueError, match="downsample=64 must divide the input size 224x224.*56"):
        create_cert_net("c2", (3, 224, 224), 200, *_stats(3), downsample=64)


def test_unknown_cert_net_and_bad_stats():
    with pytest.raises(ValueError, match="unknown cert-net 'c9'; known: fc, small, c2, c3"):
        create_cert_net("c9", (3, 32, 32), 10, *_stats(3))
    with pytest.raises(ValueError, match="mean/std need 1 entries"):
        create_cert_net("c2", (1, 28, 28), 10, *_stats(3))


# --- cores ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "efficientnet_b0"])
def test_core_at_32px_with_adapted_stem(name):
    torch.manual_seed(0)
    core = create_core(name, 10, (3, 32, 32), mean=(0.5,) * 3, std=(0.2,) * 3)
    assert isinstance(core.normalize, Normalize)
    assert core(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    if name == "resnet18":
        assert core.model.conv1.stride == (1, 1) and core.model.conv1.kernel_size == (3, 3)
        assert isinstance(core.model.maxpool, nn.Identity)
    if name == "efficientnet_b0":
        assert core.model.conv_stem.stride == (1, 1)


def test_core_keeps_imagenet_stems_for_large_inputs_and_takes_one_channel():
    assert create_core("efficientnet_b0", 200, (3, 224, 224)).model.conv_stem.stride == (2, 2)
    assert create_core("resnet18", 200, (3, 224, 224)).model.conv1.stride == (2, 2)
    fm = create_core("resnet18", 10, (1, 28, 28))
    assert fm.model.conv1.in_channels == 1 and fm(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_core_weight_file_round_trip_and_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = create_core("resnet18", 10, (3, 32, 32)).eval()
    torch.save(src.state_dict(), tmp_path / "core.pt")
    torch.save({"state_dict": {f"core.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "stage.ckpt")
    x = torch.rand(2, 3, 32, 32)
    for f in ("core.pt", "stage.ckpt"):
        torch.manual_seed(1)
        dst = create_core("resnet18", 10, (3, 32, 32), pretrained_path=str(tmp_path / f)).eval()
        torch.testing.assert_close(dst(x), src(x))


def test_core_from_bare_timm_imagenet_weights(tmp_path):
    torch.manual_seed(0)
    imagenet = timm.create_model("resnet18", num_classes=1000)  # what a hub download holds
    torch.save(imagenet.state_dict(), tmp_path / "resnet18_in1k.pth")
    core = create_core("resnet18", 10, (1, 32, 32), pretrained_path=str(tmp_path / "resnet18_in1k.pth"))
    torch.testing.assert_close(core.model.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
    assert core.model.fc.weight.shape == (10, 512) and core.model.conv1.weight.shape == (64, 1, 3, 3)
    eff = timm.create_model("efficientnet_b0", num_classes=1000)
    torch.save(eff.state_dict(), tmp_path / "eff.pth")
    core = create_core("efficientnet_b0", 10, (1, 32, 32), pretrained_path=str(tmp_path / "eff.pth"))
    # 3 -> 1 input channels: the stem keeps its weights, summed over colour channels
    torch.testing.assert_close(core.model.conv_stem.weight, eff.conv_stem.weight.sum(1, keepdim=True))


def test_core_weight_file_mismatch_names_keys(tmp_path):
    torch.save(create_core("resnet18", 10, (3, 32, 32)).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ValueError, match=r"does not fit core 'efficientnet_b0'.*missing: model\.conv_stem"):
        create_core("efficientnet_b0", 10, (3, 32, 32), pretrained_path=str(tmp_path / "r18.pt"))
    with pytest.raises(ValueError, match=r"shape mismatch: model\.fc\.weight \(file \[10, 512\] vs net \[7, 512\]\)"):
        create_core("resnet18", 7, (3, 32, 32), pretrained_path=str(tmp_path / "r18.pt"))
    torch.save({"not": "weights"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        create_core("resnet18", 10, (3, 32, 32), pretrained_path=str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="weight file not found"):
        create_core("resnet18", 10, (3, 32, 32), pretrained_path=str(tmp_path / "absent.pt"))


def test_unknown_timm_name_says_how_to_list_names():
    with pytest.raises(ValueError, match=r"unknown core 'resnet_9000'.*timm\.list_models"):
        create_core("resnet_9000", 10, (3, 32, 32))


def test_pretrained_from_hub_offline_names_the_file(monkeypatch, tmp_path):
    """Never touches the network: the probe says offline and huggingface_hub is put offline
    with an empty cache, so timm fails at once; the error must say what file to pass."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(core_mod, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedUnavailableError) as err:
        create_core("resnet18", 10, (3, 32, 32), pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and "no network" in msg and "pretrained_path=" in msg and "timm/resnet18" in msg
    assert hf.HF_HUB_OFFLINE is False or os.environ.get("HF_HUB_OFFLINE")  # restored


# --- gates ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["c3", "cnn7", "wrn"])
def test_gate_copies_everything_but_the_head(name, tmp_path):
    torch.manual_seed(0)
    shape, kw = (3, 16, 16), SMALL_KW.get(name, {})
    cert = create_cert_net(name, shape, 5, *_stats(3), **kw)
    with torch.no_grad():  # non-default BN statistics must be copied too
        for m in cert.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
    gate = create_gate(name, shape, *_stats(3), from_cert=cert, **kw)
    head = final_linear_name(gate)
    cs, gs = cert.state_dict(), gate.state_dict()
    for k, v in gs.items():
        if not k.startswith(head + "."):
            assert torch.equal(v, cs[k]), k
    assert gs[head + ".weight"].shape[0] == 1 and gate(torch.rand(2, *shape)).shape == (2, 1)
    torch.save({"state_dict": {f"cert.{k}": v for k, v in cs.items()}}, tmp_path / "cert.ckpt")
    from_file = create_gate(name, shape, *_stats(3), from_cert=str(tmp_path / "cert.ckpt"), **kw)
    for k, v in from_file.state_dict().items():
        if not k.startswith(head + "."):
            assert torch.equal(v, cs[k]), k


def test_gate_mismatch_names_first_parameter():
    c2 = create_cert_net("c2", (3, 16, 16), 5, *_stats(3))
    with pytest.raises(ValueError, match=r"does not match the gate architecture: 1\.weight is \[32, 3, 4, 4\] in the cert-net, \[32, 3, 3, 3\]"):
        create_gate("c3", (3, 16, 16), *_stats(3), from_cert=c2)
    big = create_cert_net("c3", (3, 32, 32), 5, *_stats(3))
    with pytest.raises(ValueError, match=r"8\.weight is \[250, 8192\] in the cert-net, \[250, 2048\] in the gate"):
        create_gate("c3", (3, 16, 16), *_stats(3), from_cert=big)
    cnn7 = create_cert_net("cnn7", (3, 16, 16), 5, *_stats(3))
    with pytest.raises(ValueError, match="does not match the gate architecture"):
        create_gate("c5", (3, 16, 16), *_stats(3), from_cert=cnn7)


# --- configs -------------------------------------------------------------------------------

def test_every_net_config_builds():
    info = get_dataset_info("synthetic").specialise(input_shape=(3, 16, 16), num_classes=4)
    files = sorted(glob.glob(os.path.join(CONF, "net", "*.yaml")))
    names = {os.path.basename(f)[:-5] for f in files}
    assert set(CERT_NETS) <= names and {"small_cnn", "resnet18", "efficientnet_b0"} <= names
    for f in files:
        cfg = OmegaConf.to_container(OmegaConf.load(f))
        assert cfg["name"] == os.path.basename(f)[:-5] and cfg["kind"] in ("cert", "core")
        over = {"widen_factor": 1} if cfg["name"] == "wrn" else {}
        net = build_net(cfg, info, **over)
        assert net(torch.rand(2, 3, 16, 16)).shape == (2, 4), f
        if cfg["kind"] == "cert":
            assert build_net({**cfg, "kind": "gate"}, info, **over)(torch.rand(2, 3, 16, 16)).shape == (2, 1)
