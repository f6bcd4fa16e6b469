"""One registry pattern for every kind of named thing (timm's ``@register_model`` + ``create_model``).

A kind (nets, datasets, bound methods, training losses, stages, selections) owns one ``Registry``;
an implementation registers itself where it is defined::

    LOSSES = Registry("training method")

    @LOSSES.register("SABR", aliases=("sabr",))
    class SABRLoss: ...

    loss = LOSSES.create("sabr", **knobs)      # the class, called with the knobs

Names are matched exactly, then through the kind's one alias table (aliases given at registration,
case-insensitive). An unknown name is a one-line ConfigError naming the closest known one. The
registry imports nothing of the package but errors.py, so every floor may own one.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from ace_lightning.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> implementation (a class or a factory), with one alias table and a create function."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: Optional[str] = None, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator: register under ``name`` (default: the object's ``__name__``) and ``aliases``."""

        def add(obj: T) -> T:
            self.add(name or getattr(obj, "__name__"), obj, aliases=aliases)
            return obj

        return add

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        """Register ``obj`` under ``name``; a name or alias taken by another object is a bug."""
        for key in (name, *aliases):
            owner = self._aliases.get(key.lower())
            if owner is not None and owner != name:
                raise ValueError(f"{self.kind} '{key}' is already registered as '{owner}'")
        self._items[name] = obj
        for key in (name, *aliases):
            self._aliases[key.lower()] = name

    def canonical(self, name: Any) -> str:
        """The registered name for ``name`` or one of its aliases (ConfigError if none)."""
        key = str(name)
        if key in self._items:
            return key
        found = self._aliases.get(key.lower())
        if found is None:
            raise ConfigError(f"unknown {self.kind} '{key}'{did_you_mean(key, self.names())}; "
                              f"known: {', '.join(self.names())}")
        return found

    def get(self, name: Any) -> T:
        """The implementation registered under ``name`` (or an alias of it)."""
        return self._items[self.canonical(name)]

    def create(self, name: Any, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``: build the named thing."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or name.lower() in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
