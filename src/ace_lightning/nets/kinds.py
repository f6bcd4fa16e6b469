"""The kinds of a net config (``kind: cert | core | gate``), one registry: each module that builds
a kind registers it (``@NET_KINDS.register("cert")`` on a class with ``build`` and ``knobs``), and
``nets.build_net`` / ``nets.check_net_config`` look the kind up instead of switching on it."""
from __future__ import annotations

import inspect
from typing import Any

from ace_lightning.registries import Registry

NET_KINDS: Registry = Registry("net kind")


def keywords(fn: Any, skip: int) -> list[str]:
    """The parameter names of ``fn`` after the first ``skip`` (the ones the data fills in)."""
    return list(inspect.signature(fn).parameters)[skip:]
