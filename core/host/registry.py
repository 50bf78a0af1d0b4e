"""Named registries of plugin contributions with clear duplicate and did-you-mean errors."""

from __future__ import annotations

from typing import Generic, TypeVar

from layerscope.util.errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to contributed classes and remembers which plugin contributed each."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self.origin: dict[str, str] = {}

    def add(self, name: str, item: T, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"plugin '{plugin}' registered a {self.kind} without a name")
        if name in self._items:
            raise UserError(
                f"{self.kind} '{name}' is registered by both plugin '{self.origin[name]}' and plugin '{plugin}'"
            )
        self._items[name] = item
        self.origin[name] = plugin

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UserError(f"unknown {self.kind} '{name}'.{did_you_mean(name, self._items)} Known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self):
        return self._items.items()

    def by_plugin(self, plugin: str) -> list[str]:
        return sorted(name for name, owner in self.origin.items() if owner == plugin)
