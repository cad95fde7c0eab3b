"""Celery tasks of the engine. They pass ids, load rows and call `sagas.engine`."""

from __future__ import annotations

import logging
from typing import Any

from celery import chain, shared_task
from celery.exceptions import Ignore
from django.db import InterfaceError, OperationalError, close_old_connections

from . import conf, engine, faults, recovery
from .exceptions import StepError, TransientError
from .models import Saga

logger = logging.getLogger("sagas")

# The database is unreachable (restart, failover) or a transaction lost a deadlock: the task is
# sent again later, without spending one of the step's attempts.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)


class StepFailed(Exception):
    """A step (or a compensation) failed for good; the chain's error callback takes over.

    It must survive pickling: Celery hands the error callback a wrapper instead of any
    exception it cannot round-trip, and the callback needs `exhausted`.
    """

    def __init__(self, code: str, message: str, exhausted: bool = False) -> None:
        super().__init__(code, message, exhausted)
        self.error = engine.SafeError(code, message)
        self.exhausted = exhausted

    def __str__(self) -> str:
        return f"{self.error.code}: {self.error.message}"


def _database_unavailable(task: Any, saga_id: str) -> Exception:
    logger.warning("saga %s: database unavailable, task sent again later", saga_id)
    close_old_connections()
    countdown = min(30.0, 0.5 * 2 ** min(task.request.retries, 6))
    return task.retry(countdown=countdown)


def _run(task: Any, saga_id: str, index: int, attempt: int, forward: bool) -> None:
    points = faults.STEP_POINTS if forward else faults.COMPENSATION_POINTS
    execute = engine.run_step if forward else engine.compensate_step
    record_failure = engine.step_attempt_failed if forward else engine.compensation_attempt_failed
    try:
        injector = faults.take(saga_id, index, points)
        try:
            outcome = execute(saga_id, index, attempt=attempt, fault=injector)
        except (Saga.DoesNotExist, *DATABASE_UNAVAILABLE):
            raise
        except Exception as exc:
            # Declines and transient errors are expected: one line. Anything else is a bug in
            # the step's code, and its traceback is for the developer reading the worker log.
            expected = isinstance(exc, StepError | TransientError)
            logger.warning(
                "saga %s step %d attempt %d failed: %s",
                saga_id,
                index,
                attempt,
                type(exc).__name__,
                exc_info=not expected,
            )
            outcome = record_failure(saga_id, index, exc, attempt=attempt)
    except Saga.DoesNotExist:
        logger.warning("saga %s does not exist: message ignored", saga_id)
        raise Ignore() from None
    except DATABASE_UNAVAILABLE:
        raise _database_unavailable(task, saga_id) from None
    if outcome.kind == "retry":
        raise task.retry(countdown=outcome.countdown, kwargs={"attempt": attempt + 1})
    if outcome.kind == "fail":
        assert outcome.error is not None
        error = outcome.error
        exhausted = outcome.exhausted or not forward
        raise StepFailed(error.code, error.message, exhausted=exhausted)
    if outcome.kind == "stop":
        # The saga is no longer on this path (aborted, paused, or the message is stale):
        # end the chain here without calling its error callback.
        raise Ignore()
    if injector is not None and outcome.kind == "done":
        injector.after_commit()


@shared_task(bind=True, name="sagas.run_step", max_retries=None, throws=(StepFailed,))
def run_step(self: Any, saga_id: str, index: int, attempt: int = 1) -> None:
    """Run step `index` of a saga. Idempotent: a completed step is not run again."""
    _run(self, saga_id, index, attempt, forward=True)


@shared_task(bind=True, name="sagas.compensate_step", max_retries=None, throws=(StepFailed,))
def compensate_step(self: Any, saga_id: str, index: int, attempt: int = 1) -> None:
    """Compensate step `index` of a saga. Idempotent: a compensated step is skipped."""
    _run(self, saga_id, index, attempt, forward=False)


def _failed_index(request: Any) -> int:
    return int(request.args[1])


@shared_task(name="sagas.on_step_failure")
def on_step_failure(request: Any, exc: BaseException, traceback: Any, saga_id: str) -> None:
    """Error callback of a saga's step chain. Idempotent: a repeated call changes nothing."""
    if isinstance(exc, StepFailed):
        exhausted, error = exc.exhausted, exc.error
    else:  # killed by the hard time limit, or failed outside the engine
        exhausted, error = True, engine.safe_error(exc)
    engine.step_failed(saga_id, _failed_index(request), exhausted=exhausted, error=error)


@shared_task(name="sagas.on_compensation_failure")
def on_compensation_failure(request: Any, exc: BaseException, traceback: Any, saga_id: str) -> None:
    """Error callback of a saga's compensation chain. Idempotent."""
    engine.compensation_failed(saga_id, _failed_index(request))


@shared_task(name="sagas.sweep")
def sweep() -> dict[str, int]:
    """Re-dispatch stalled sagas (run by Celery beat). Safe to run on several machines."""
    report = recovery.sweep()
    return {"recovered": len(report.recovered), "dead_lettered": len(report.dead_lettered)}


def dispatch_steps(saga_id: str, limits: list[tuple[int, int]]) -> None:
    """Send the remaining steps as one chain with the saga's error callback.

    Each step gets its time limit: a soft one raised inside the action (retried as transient)
    and a hard one a little later that kills the process if the action ignores the first.
    """
    grace = conf.hard_time_limit_grace()
    signatures = [
        # celery-types does not list the time limits among set()'s options; Celery accepts them.
        run_step.si(saga_id, index).set(
            soft_time_limit=limit,  # type: ignore[call-arg]
            time_limit=limit + grace,
        )
        for index, limit in limits
    ]
    chain(*signatures).on_error(on_step_failure.s(saga_id)).apply_async()


def dispatch_compensations(saga_id: str, indexes: list[int]) -> None:
    """Send the compensations, in the order given (reverse), as one chain."""
    signatures = [compensate_step.si(saga_id, index) for index in indexes]
    chain(*signatures).on_error(on_compensation_failure.s(saga_id)).apply_async()
