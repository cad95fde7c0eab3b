"""A test kit for sagas: real workers, injected faults, and a failure matrix that checks the
framework's guarantees and your own invariant on any saga definition.

    from sagas.testing import CeleryWorker, FailureMatrix, test_database_env

`send_signal`, `decide` and `expire_wait` drive a saga's waits in your own tests: an event sent
as your code would send it, an approval approved or rejected as a person would, a timeout that
fires now instead of in a week.

Add "sagas.testing" to INSTALLED_APPS in your test settings (its `Fault` model and the hook
that injects them). The names below import lazily, so that a worker which only needs
`sagas.testing.boot` does not need the app installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .guarantees import Result
    from .matrix import Case, FailureMatrix
    from .waits import decide, expire_wait, send_signal
    from .worker import CeleryWorker, test_database_env, wait_for

_WHERE = {
    "Case": "matrix",
    "FailureMatrix": "matrix",
    "Result": "guarantees",
    "CeleryWorker": "worker",
    "test_database_env": "worker",
    "wait_for": "worker",
    "decide": "waits",
    "expire_wait": "waits",
    "send_signal": "waits",
}

__all__ = [
    "Case",
    "CeleryWorker",
    "FailureMatrix",
    "Result",
    "decide",
    "expire_wait",
    "send_signal",
    "test_database_env",
    "wait_for",
]


__getattr__, __dir__ = exports(__name__, _WHERE, __all__)
