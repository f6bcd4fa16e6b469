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
