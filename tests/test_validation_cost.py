"""Validation spends its bound passes and attacks only where a metric can change (issue 16): the
cert stage's CROWN-IBP runs on the inputs correct at x that IBP does not certify, the gate's on
the inputs whose label is decided at x but not certifiably, validation PGD skips certified inputs
while drawing the same random starts; the metrics and the RNG stream are those of the full pass."""
from __future__ import annotations

import pytest
import torch

from ace_lightning.attacks import adversarial_correct
from ace_lightning.bounds import bounded_module, clear_cache, output_bounds, padded_rows
from ace_lightning.bounds import lirpa
from ace_lightning.bounds.lirpa import CACHE_PER_NET
from ace_lightning.data import get_dataset_info
from ace_lightning.nets import build_net
from ace_lightning.stages import certified as cert_mod
from ace_lightning.stages.cert import CertConfig, CertStage
from ace_lightning.stages.certified import certified_correct
from ace_lightning.stages.gate import GateConfig, GateStage

EPS = 1e-4  # a random net: IBP certifies most correct inputs, CROWN-IBP a few more


def _info():
    return get_dataset_info("synthetic").specialise(input_shape=[1, 16, 16], num_classes=3)


def _net(kind: str):
    torch.manual_seed(0)
    return build_net({"name": "small", "kind": kind}, _info()).eval()


def _batch(net, n: int = 96):
    torch.manual_seed(3)
    x = torch.rand(n, 1, 16, 16)
    with torch.no_grad():
        y = net(x).argmax(-1)
    y[::7] = (y[::7] + 1) % 3  # some inputs misclassified at x
    return x, y


def _fitting(monkeypatch, cls, value: bool) -> None:
    monkeypatch.setattr(cls, "fitting", property(lambda self: value))


def test_padded_rows_pads_to_a_power_of_two_and_keeps_the_real_rows_first():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[3, 9, 40, 41, 77]] = True
    idx, n = padded_rows(mask)
    assert n == 5 and idx.tolist() == [3, 9, 40, 41, 77, 3, 3, 3]
    assert padded_rows(torch.zeros(4, dtype=torch.bool))[1] == 0
    full, n = padded_rows(torch.ones(100, dtype=torch.bool))
    assert n == 100 and full.tolist() == list(range(100))  # never past the batch itself


def test_bounded_module_cache_keeps_the_recent_shapes_only():
    net = _net("cert")
    clear_cache(net)
    x = torch.rand(40, 1, 16, 16)
    first = bounded_module(net, x[:1])
    for b in range(2, CACHE_PER_NET + 6):
        bounded_module(net, x[:b])
        bounded_module(net, x[:1])  # used again: stays
    assert len(lirpa._CACHE[net]) == CACHE_PER_NET
    assert bounded_module(net, x[:1]) is first
    clear_cache(net)


def test_cert_validation_bounds_with_crown_ibp_only_where_it_can_add_a_certificate(monkeypatch):
    net = _net("cert")
    module = CertStage(net, CertConfig.from_dict({"optimizer": {"name": "adam", "lr": 1e-3}, "lr_schedule": {},
                                                  "val_crown_ibp": True, "val_pgd_steps": 3}, EPS), EPS)
    x, y = _batch(net)
    nat = net(x).argmax(-1) == y
    ibp = certified_correct(net, x, y, EPS, "IBP")
    crown = certified_correct(net, x, y, EPS, "CROWN-IBP")
    assert bool((crown & ~ibp).any()) and bool(ibp.any()) and bool((~nat).any())  # a real test

    seen = []
    real = cert_mod.certified_correct

    def spy(net_, x_, y_, eps, method):
        seen.append((method, x_.shape[0]))
        return real(net_, x_, y_, eps, method)

    monkeypatch.setattr(cert_mod, "certified_correct", spy)
    _fitting(monkeypatch, CertStage, False)
    torch.manual_seed(0)
    full = module.evaluate(x, y)
    after_full = torch.rand(4)
    _fitting(monkeypatch, CertStage, True)
    seen.clear()
    torch.manual_seed(0)
    val = module.evaluate(x, y)
    after_val = torch.rand(4)

    assert torch.equal(full["cert_acc"], ibp | crown) and torch.equal(val["cert_acc"], full["cert_acc"])
    assert "crown_ibp_cert_acc" in full and "crown_ibp_cert_acc" not in val
    open_rows = int((nat & ~ibp).sum())
    assert seen == [("IBP", x.shape[0]), ("CROWN-IBP", padded_rows(nat & ~ibp)[0].numel())]
    assert 0 < open_rows < x.shape[0]
    # PGD: certified inputs count as robust, the rest get the same verdict, the RNG stream is the same
    assert torch.equal(val["pgd_acc"], full["pgd_acc"])
    assert torch.equal(after_val, after_full)


def test_adversarial_correct_with_known_robust_inputs_draws_the_same_random_starts():
    net = _net("cert")
    x, y = _batch(net, 64)
    known = torch.zeros(64, dtype=torch.bool)
    known[::3] = True
    torch.manual_seed(5)
    every = adversarial_correct(net, x, y, 0.1, steps=4, restarts=2)
    state = torch.get_rng_state()
    torch.manual_seed(5)
    some = adversarial_correct(net, x, y, 0.1, steps=4, restarts=2, known=known)
    assert torch.equal(torch.get_rng_state(), state)
    correct = net(x).argmax(-1) == y
    assert torch.equal(some[known], correct[known])  # counted robust where correct at x
    assert torch.equal(some[~known], every[~known])
    assert bool((~every[~known]).any())  # the attack breaks some of the others


def test_gate_validation_bounds_with_crown_ibp_only_where_a_metric_can_change(monkeypatch):
    gate = _net("gate")
    module = GateStage(gate, GateConfig.from_dict({"optimizer": {"name": "adam", "lr": 1e-3}, "lr_schedule": {},
                                                  "val_crown_ibp": True}, EPS), EPS)
    x, _ = _batch(gate, 96)
    with torch.no_grad():
        g = gate(x).view(-1)
    module.threshold = float(g.median())
    label = (torch.arange(96) % 3 != 0).long()
    label[::11] = -1  # excluded
    calls = []
    real = output_bounds

    def spy(net_, x_, eps, method, *a, **k):
        calls.append((method, x_.shape[0]))
        return real(net_, x_, eps, method, *a, **k)

    import ace_lightning.stages.gate as gate_mod
    monkeypatch.setattr(gate_mod, "output_bounds", spy)
    _fitting(monkeypatch, GateStage, False)
    full = module.evaluate(x, torch.zeros(96, dtype=torch.long), label)
    assert calls[-1] == ("CROWN-IBP", 96)
    _fitting(monkeypatch, GateStage, True)
    calls.clear()
    val = module.evaluate(x, torch.zeros(96, dtype=torch.long), label)
    assert calls[0] == ("IBP", 96) and (len(calls) == 1 or calls[1][1] < 96)
    for name in ("certified_selection_rate", "certified_rejection_rate", "selection_rate", "false_selection_rate"):
        assert torch.equal(val[name], full[name]), name
    assert bool(full["certified_selection_rate"].any()) and bool(full["certified_rejection_rate"].any())
    assert not bool(full["certified_selection_rate"].all())
