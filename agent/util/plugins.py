"""Plug-in registries for sources and post-processors.

A plug-in is one module: a `KEY` constant (the module's name, `_` written `-`), a `Config` model whose
`type` field is that literal, and its implementation. Registries are built from the modules listed by
their package, so adding a type means adding a file and its name, never another branch in an if/elif
chain.

A module is imported the first time its key is looked up: a profile costs the start only the plug-ins it
names (the other modules, their imports and their pydantic classes took ~75 ms of a 0.9 s cold start).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType


class Plugins(Mapping[str, ModuleType]):
    """A package's plug-in modules by `type` key; each is imported on its first lookup.

    Iterating lists every key without importing anything; `values()` and `items()` import them all
    (the JSON Schema and the tests want every plug-in). A lookup of a module that fails to import
    raises the ImportError: the profile names a plug-in this install cannot run.
    """

    def __init__(self, package: str, modules: Iterable[str]) -> None:
        self.package = package
        self._names = {name.replace("_", "-"): name for name in modules}
        self._loaded: dict[str, ModuleType] = {}

    def __getitem__(self, key: str) -> ModuleType:
        module = self._loaded.get(key)
        if module is None:
            module = importlib.import_module(f"{self.package}.{self._names[key]}")  # KeyError: no such plug-in
            if module.KEY != key:
                raise RuntimeError(f"plug-in {module.__name__} claims type {module.KEY!r}, registered as {key!r}")
            self._loaded[key] = module
        return module

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def loaded(self) -> list[str]:
        """The keys imported so far (what a start has paid for)."""
        return list(self._loaded)
