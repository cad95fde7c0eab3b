"""Names a package exports lazily: imported from their module on first use (PEP 562).

The package root, `sagas.api` and `sagas.testing` export this way, because they are imported
before Django's app registry is ready (by `sagas.apps`, by settings) while their names import
the models, and because DRF's settings name `sagas.api.parsers`, which DRF's views read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any


def exports(
    package: str, where: dict[str, str], exported: list[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, whose name `n` lives in `.{where[n]}`."""

    def getattr_(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{where[name]}", package), name)

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exported})

    return getattr_, dir_
