"""The one registry pattern (registries.Registry): names, aliases, create, one-line errors."""
from __future__ import annotations

import pytest

from ace_lightning.errors import ConfigError
from ace_lightning.registries import Registry


def test_register_create_and_aliases():
    reg: Registry = Registry("widget")

    @reg.register("Big-Widget", aliases=("big", "bw"))
    class Big:
        def __init__(self, size: int = 1) -> None:
            self.size = size

    assert reg.create("Big-Widget", size=3).size == 3
    assert reg.create("BIG").size == 1 and reg.get("bw") is Big
    assert reg.canonical("big-widget") == "Big-Widget"
    assert "bw" in reg and "small" not in reg and reg.names() == ("Big-Widget",)


def test_unknown_name_is_one_line_with_the_closest():
    reg: Registry = Registry("widget")
    reg.add("sabr", object)
    with pytest.raises(ConfigError, match=r"unknown widget 'sbar' \(did you mean 'sabr'\?\); known: sabr"):
        reg.get("sbar")


def test_a_name_taken_twice_is_a_bug():
    reg: Registry = Registry("widget")
    reg.add("a", object, aliases=("x",))
    with pytest.raises(ValueError, match="already registered"):
        reg.add("b", object, aliases=("X",))


def test_every_kind_is_one_registry_with_the_old_names_and_aliases():
    """The kinds moved onto Registry keep their names, their order (bounds.METHODS: the records'
    method codes) and every alias the old tables had."""
    from ace_lightning.attacks.pgd import LOSSES
    from ace_lightning.bounds import METHODS, normalize_method
    from ace_lightning.certify import certify_folder
    from ace_lightning.data import DATASETS
    from ace_lightning.nets import CERT_NETS, CORE_NETS, NET_KINDS
    from ace_lightning.selections import SELECTIONS
    from ace_lightning.stages.losses import CERT_METHODS, normalize_training_method

    assert METHODS == ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN")
    assert [normalize_method(a) for a in ("ibp", "crown_ibp", "crown", "crown-optimized", "Alpha_CROWN")] == \
        ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN", "alpha-CROWN"]
    assert CERT_METHODS.names() == ("IBP", "CROWN-IBP", "SABR", "MTL-IBP", "CC-IBP", "Exp-IBP")
    assert [normalize_training_method(a) for a in ("sabr", "crown_ibp", "mtlibp", "cc_ibp", "expibp")] == \
        ["SABR", "CROWN-IBP", "MTL-IBP", "CC-IBP", "Exp-IBP"]
    assert CERT_NETS.names() == ("fc", "small", "c2", "c3", "c5", "cnn7", "wrn")
    assert CORE_NETS.names() == ("small_cnn",) and NET_KINDS.names() == ("cert", "core", "gate")
    assert DATASETS.names() == ("cifar10", "fashion_mnist", "mnist", "tinyimagenet", "imagenet200", "synthetic",
                                "image_folder")
    assert LOSSES.names() == ("ce", "margin") and SELECTIONS.names() == ("gate", "entropy", "margin")
    assert [certify_folder(s) for s in SELECTIONS] == ["certify", "certify_entropy", "certify_margin"]
    assert certify_folder("entropy", "cert") == "certify_entropy_cert"
    with pytest.raises(ConfigError, match=r"unknown selection 'gaet' \(did you mean 'gate'\?\)"):
        certify_folder("gaet")
