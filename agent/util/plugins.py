"""Plug-in discovery for sources and post-processors.

A plug-in is one module: a `KEY` constant, a `Config` model whose `type` field is that literal, and its
implementation. Registries are built from the modules listed by their package, so adding a type means
adding a file and its name, never another branch in an if/elif chain. A module whose optional
dependency is missing is logged and skipped instead of breaking every profile.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from types import ModuleType

log = logging.getLogger(__name__)


def discover(package: str, modules: Iterable[str]) -> dict[str, ModuleType]:
    """Import `package.<name>` for each name; key the result by each module's `KEY`."""
    found: dict[str, ModuleType] = {}
    for name in modules:
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ImportError as exc:
            log.warning("plugin skipped module=%s.%s reason=%r", package, name, str(exc))
            continue
        if module.KEY in found:
            raise RuntimeError(f"two plug-ins in {package} claim type {module.KEY!r}")
        found[module.KEY] = module
    return found
