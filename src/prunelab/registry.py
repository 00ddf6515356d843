"""Small explicit registries: names -> factories, with one-line descriptions.

Each kind of component (criterion, granularity, allocation, method, model, dataset)
has its own :class:`Registry`, filled by explicit ``register`` calls in the module that
defines the registry's entries -- importing prunelab registers nothing anywhere else
and there is no global mutable state shared between registries.

    >>> ACTIVATIONS = Registry("activation")
    >>> @ACTIVATIONS.register("relu", "max(x, 0)")
    ... def relu(x): return max(x, 0)
    >>> ACTIVATIONS.get("relu")(-1)
    0
    >>> ACTIVATIONS.get("rleu")
    Traceback (most recent call last):
    prunelab.errors.PrunelabError: unknown activation 'rleu'; valid names: relu
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from prunelab.errors import PrunelabError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered item: its name, its object and a one-line description."""

    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    """A name -> object mapping that fails loudly on unknown or duplicate names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; the object is returned unchanged."""

        def decorate(obj: T) -> T:
            self.add(name, obj, description)
            return obj

        return decorate

    def add(self, name: str, obj: T, description: str) -> None:
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        if not description or "\n" in description:
            raise ValueError(f"{self.kind} {name!r} needs a one-line description")
        self._entries[name] = Entry(name, obj, description)

    def get(self, name: str) -> T:
        """The object registered as ``name``; the error lists every valid name."""
        try:
            return self._entries[name].obj
        except (KeyError, TypeError):  # TypeError: an unhashable name such as a list
            raise PrunelabError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            ) from None

    def describe(self, name: str) -> str:
        self.get(name)
        return self._entries[name].description

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        for name in self.names():
            yield self._entries[name]

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable name such as a list is simply not registered
            return False

    def __len__(self) -> int:
        return len(self._entries)
