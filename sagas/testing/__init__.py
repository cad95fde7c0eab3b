"""A test kit for sagas: real workers and injected faults.

    from sagas.testing import CeleryWorker, test_database_env

Add "sagas.testing" to INSTALLED_APPS in your test settings (its `Fault` model and the hook
that injects them). The names below import lazily, so that a worker which only needs
`sagas.testing.boot` does not need the app installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .worker import CeleryWorker, test_database_env, wait_for

_WHERE = {
    "CeleryWorker": "worker",
    "test_database_env": "worker",
    "wait_for": "worker",
}

__all__ = ["CeleryWorker", "test_database_env", "wait_for"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
