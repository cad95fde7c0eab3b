"""The engine: every saga and step transition happens here, under the saga's row lock.

`forward` starts sagas and runs steps, `groups` runs a group's members at the same time,
`children` starts child sagas and waits for them,
`compensation` undoes them, `callbacks` are the
chains' error callbacks, `recovery` is what the sweeper does to one saga, and `operator` holds
the operator actions. `unit` is the locked saga they all change. Celery tasks
(`sagas.tasks`) and the services (`sagas.services`) call these functions; nothing else
changes a status.

The plumbing: `rows` reads and writes the rows in as few round trips as it can, `dispatch`
sends chains and callbacks after the commit, `notify` hands committed events to signals,
metrics and traces, `sweeper` finds the sagas whose messages were lost (and calls `recovery`
for each), `waker` ends the waits whose timeout is due (`waits` is the stage itself), and
`hooks` is where the test kit injects faults.
"""

from .callbacks import (
    after_unsure_commit,
    attempt_lost,
    compensation_chain_failed,
    step_chain_failed,
)
from .children import child_ended, finished_children, member_child_ended
from .compensation import begin_compensation, compensation_attempt, compensation_attempt_failed
from .forward import start, step_attempt, step_attempt_failed
from .groups import enter_group
from .operator import (
    KEEP,
    Deadline,
    Plan,
    compensate,
    plan,
    plan_compensate,
    plan_resolve,
    plan_retry,
    plan_skip,
    reconcile_now,
    repair,
    resolve,
    retry,
    skip,
)
from .recovery import deadline_passed, recover
from .unit import (
    ACTION_BEGAN,
    Outcome,
    SafeError,
    Unit,
    class_path,
    lock,
    safe_error,
    statement_failure,
)

__all__ = [
    "ACTION_BEGAN",
    "KEEP",
    "Deadline",
    "Outcome",
    "Plan",
    "SafeError",
    "Unit",
    "after_unsure_commit",
    "attempt_lost",
    "begin_compensation",
    "child_ended",
    "class_path",
    "compensate",
    "compensation_attempt",
    "compensation_attempt_failed",
    "compensation_chain_failed",
    "deadline_passed",
    "enter_group",
    "finished_children",
    "lock",
    "member_child_ended",
    "plan",
    "plan_compensate",
    "plan_resolve",
    "plan_retry",
    "plan_skip",
    "reconcile_now",
    "recover",
    "repair",
    "resolve",
    "retry",
    "safe_error",
    "skip",
    "start",
    "statement_failure",
    "step_attempt",
    "step_attempt_failed",
    "step_chain_failed",
]
