"""Name -> object registries that refuse duplicates and fail loudly on a miss."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from neobench.core.errors import NeobenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of named entries (methods, variants, losses, presets, ...).

    >>> r = Registry[int]("colour")
    >>> r.add("red", 1)
    1
    >>> r.get("blue")
    Traceback (most recent call last):
    neobench.core.errors.NeobenchError: unknown colour 'blue'; valid: red
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise NeobenchError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
