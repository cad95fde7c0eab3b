"""Where tests and drills plug fault injection into the engine. Empty in production.

`sagas.testing` installs its hook when it is in INSTALLED_APPS; a step task then asks it for
the faults of each attempt. Without it, a task pays one attribute read.
"""

from __future__ import annotations

from typing import Any, Protocol


class FaultHook(Protocol):
    def __call__(self, saga_id: str, index: int, *, forward: bool, member: int | None) -> Any:
        """The injector for this attempt of step `index` (its action or its compensation; a
        group's member at position `member`), or None. An injector has `before_action`,
        `after_action`, `before_compensation`, `after_commit` and
        `after_final_failure(task_id, saga_id, epoch, forward)`."""


fault_hook: FaultHook | None = None


def install_fault_hook(hook: FaultHook | None) -> None:
    global fault_hook
    fault_hook = hook
