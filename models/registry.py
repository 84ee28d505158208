"""A registry of model families that raises on unknown names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised when a registry is asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        """Return the message without KeyError's quoting."""
        return str(self.args[0])


class Registry(Generic[T]):
    """Map names to factories; unknown names raise :class:`UnknownNameError` listing the known ones.

    Parameters
    ----------
    kind : str
        What the registry holds, used in error messages ("model family", "strategy").
    """

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name``."""

        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self._kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        """Return the item registered under ``name``."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(
                f"unknown {self._kind} {name!r}; known {self._kind}s: {known}"
            ) from None

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        """Return whether ``name`` is registered."""
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        """Iterate over the registered names, sorted."""
        return iter(self.names())
