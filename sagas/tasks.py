"""Celery tasks of the engine. They pass ids, call `sagas.engine`, and act on its outcome.

Every task is idempotent: it checks the rows under the saga's lock before it does anything,
and a message of an older epoch than the saga's does nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore
from django.db import InterfaceError, OperationalError, ProgrammingError, close_old_connections

from . import conf, engine, retention
from .bulk import batches
from .engine import dispatch, hooks, reconcile, sweeper, waker
from .models import BulkAction, Saga

logger = logging.getLogger("sagas")

# The database is unreachable (restart, failover) or a transaction lost a deadlock: the task is
# sent again later, without spending one of the step's attempts.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)


class StepFailed(Exception):
    """A step (or a compensation) failed for good, and that is recorded: the chain ends here
    and its error callback sends what comes next.

    It must survive pickling: Celery may hand it to other processes.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.error = engine.SafeError(code, message)

    def __str__(self) -> str:
        return f"{self.error.code}: {self.error.message}"


def _database_unavailable(
    task: Any, saga_id: Any, *, what: str = "saga", kwargs: dict[str, Any] | None = None
) -> Exception:
    logger.warning("%s %s: database unavailable, task sent again later", what, saga_id)
    return _later(task, kwargs)


def _schema_behind(task: Any, saga_id: Any, *, what: str = "saga") -> Exception:
    """PostgreSQL refused the engine's own statements (an undefined table or column): the
    tables are not those of this code, as after a deploy that did not run `migrate`. Nothing
    is recorded, nothing is spent: the task is sent again until they are."""
    logger.error(
        "%s %s: the database refused the framework's statements (has `migrate` run for this "
        "version?); task sent again later",
        what,
        saga_id,
        exc_info=True,
    )
    return _later(task)


def _later(task: Any, kwargs: dict[str, Any] | None = None) -> Exception:
    """Send the task again with backoff (with `kwargs`, instead of its own)."""
    close_old_connections()
    countdown = min(30.0, 0.5 * 2 ** min(task.request.retries, 6))
    return task.retry(countdown=countdown, kwargs=kwargs)


def attempt(
    saga_id: str,
    index: int,
    epoch: int,
    *,
    forward: bool,
    fault: Any = None,
    bound: float | None = None,
    member: int | None = None,
) -> engine.Outcome:
    """One delivery of a step's (or a compensation's) message: run it, or record its failure.
    `bound`: the task's hard time limit, which bounds the attempt's database session too.

    Lets `Saga.DoesNotExist` and database outages through, for the task to handle.
    """
    execute = engine.step_attempt if forward else engine.compensation_attempt
    record_failure = engine.step_attempt_failed if forward else engine.compensation_attempt_failed
    try:
        return execute(saga_id, index, epoch=epoch, fault=fault, bound=bound, member=member)
    except Saga.DoesNotExist:
        raise
    except DATABASE_UNAVAILABLE as exc:
        if not engine.statement_failure(exc):
            raise  # the connection, not the attempt: see `_run`
        exception: Exception = exc
    except Exception as exc:  # logged by the engine, with a reference for the timeline
        exception = exc
    # The attempt's transaction rolled back, and its failure is recorded next: a connection
    # lost now loses no attempt (the record commits, or the attempt runs again).
    engine.ACTION_BEGAN.set(False)
    return record_failure(saga_id, index, exception, epoch=epoch, member=member)


def _lost(task: Any, lost: str) -> str:
    """Why this delivery follows an attempt that may have run and recorded nothing, or "":
    the previous delivery said so (`lost`: its database session ended after the action
    began), or the message came back from the broker (its worker died before it committed;
    a warm shutdown restores the messages it held too, counted although they never ran)."""
    if lost:
        return lost
    return "redelivered" if (task.request.delivery_info or {}).get("redelivered") else ""


def _run(
    task: Any,
    saga_id: str,
    index: int,
    epoch: int,
    *,
    forward: bool,
    lost: str,
    unsure_since: float,
    member: int | None = None,
) -> None:
    engine.ACTION_BEGAN.set(False)
    began = time.time()
    why = _lost(task, lost)
    failed = None
    try:
        if unsure_since or why == "redelivered":
            # A previous delivery may have committed unheard, or died right after its commit.
            since = unsure_since or None
            failed = engine.after_unsure_commit(
                saga_id, index, forward=forward, since=since, member=member
            )
        counted = (
            engine.attempt_lost(saga_id, index, forward=forward, why=why, member=member)
            if why
            else None
        )
        why = ""  # counted, or nothing to count
        injector = None
        if counted is not None:
            outcome = counted  # its retry (a new message), or the step's budget is spent
        else:
            hook = hooks.fault_hook
            injector = (
                hook(saga_id, index, forward=forward, member=member) if hook is not None else None
            )
            hard_limit = (task.request.timelimit or (None, None))[0]
            outcome = attempt(
                saga_id,
                index,
                epoch,
                forward=forward,
                fault=injector,
                bound=hard_limit,
                member=member,
            )
    except Saga.DoesNotExist:
        logger.warning("saga %s does not exist: message ignored", saga_id)
        raise Ignore() from None
    except DATABASE_UNAVAILABLE:
        if engine.ACTION_BEGAN.get():  # the action may have had effects
            why = "connection_lost"
        # Sent again: an attempt that may have run is counted by the next delivery, which
        # also tells what a transaction of this one may have committed unheard
        # (`engine.after_unsure_commit`).
        again: dict[str, Any] = {"epoch": epoch, "lost": why, "unsure_since": unsure_since or began}
        if member is not None:
            again["member"] = member
        raise _database_unavailable(task, saga_id, kwargs=again) from None
    except ProgrammingError:
        raise _schema_behind(task, saga_id) from None
    if outcome.kind == "retry":
        kwargs: dict[str, Any] = {"epoch": epoch}
        if member is not None:
            kwargs["member"] = member
        raise task.retry(countdown=outcome.countdown, kwargs=kwargs)
    if outcome.kind == "fail":
        assert outcome.error is not None
        if injector is not None:
            injector.after_final_failure(task.request.id, saga_id, epoch, forward)
        raise StepFailed(outcome.error.code, outcome.error.message)
    if outcome.kind == "stop" and failed is not None:
        # A previous delivery may have failed the step for good and never ended its chain:
        # end it with the step's error now, so that the chain's error callback is sent.
        raise StepFailed(failed.code, failed.message)
    if outcome.kind == "stop":
        # The saga is no longer on this path (aborted, paused, or the message is stale):
        # end the chain here without calling its error callback.
        raise Ignore()
    if injector is not None and outcome.kind == "done":
        injector.after_commit()


@shared_task(bind=True, name="sagas.run_step", max_retries=None, throws=(StepFailed,))
def run_step(
    self: Any,
    saga_id: str,
    index: int,
    epoch: int,
    lost: str = "",
    unsure_since: float = 0.0,
    member: int | None = None,
) -> None:
    """Run step `index` of a saga. Idempotent: a completed step is not run again. `lost`:
    why the previous delivery's attempt may have run and recorded nothing (counted first);
    `unsure_since`: when a previous delivery that lost its database connection began."""
    _run(
        self,
        saga_id,
        index,
        epoch,
        forward=True,
        lost=lost,
        unsure_since=unsure_since,
        member=member,
    )


@shared_task(bind=True, name="sagas.compensate_step", max_retries=None, throws=(StepFailed,))
def compensate_step(
    self: Any,
    saga_id: str,
    index: int,
    epoch: int,
    lost: str = "",
    unsure_since: float = 0.0,
    member: int | None = None,
) -> None:
    """Compensate step `index` of a saga. Idempotent: a compensated step is skipped. `lost`
    as for `run_step`; `member`: a group's member's position in stage `index`."""
    _run(
        self,
        saga_id,
        index,
        epoch,
        forward=False,
        lost=lost,
        unsure_since=unsure_since,
        member=member,
    )


# Not bound, and taking the failure's (request, exc, traceback): Celery calls it in the process
# that saw the failure, which for a hard time limit is the worker's main one. So it only
# sends the chain's real error callback (a bound task, which Celery would send as a message
# with the failed task's id alone) with the class of the exception that failed the task: the
# saga's lock is taken by a worker process, never by the main one. Which callback, and for
# which saga and epoch, it reads from the failed task's name and id; chains sent by earlier
# releases name them in its keyword arguments.
@shared_task(name="sagas.chain_failed", ignore_result=True)
def chain_failed(
    request: Any,
    exc: BaseException,
    traceback: Any,
    *,
    saga_id: str | None = None,
    epoch: int | None = None,
    callback: str | None = None,
) -> None:
    """Error callback of a saga's chain, run where the task failed: sends the chain's error
    callback with what failed the task. Safe to lose (the sweeper makes up for it) and to
    repeat."""
    if saga_id is None or epoch is None or callback is None:
        task = getattr(request, "task", None)
        failed = dispatch.failed_chain(str(request.id), task)
        if failed is None:
            logger.error(
                "task %s (%s) of no saga's chain failed: its error callback does nothing",
                request.id,
                task,
            )
            return
        saga_id, epoch, callback = failed
    cause = engine.class_path(type(exc))
    dispatch.send_error_callback(callback, request.id, saga_id, epoch, cause)


def _callback(
    task: Any, failed_task_id: str, saga_id: str, handle: Any, epoch: int, cause: str | None
) -> None:
    try:
        handle(
            saga_id,
            epoch,
            failed=dispatch.failed_index(failed_task_id, saga_id, epoch),
            cause=cause,
            task_id=failed_task_id,
        )
    except Saga.DoesNotExist:
        logger.warning("saga %s does not exist: error callback ignored", saga_id)
    except DATABASE_UNAVAILABLE:
        raise _database_unavailable(task, saga_id) from None
    except ProgrammingError:
        raise _schema_behind(task, saga_id) from None


@shared_task(bind=True, name="sagas.on_step_failure", max_retries=None)
def on_step_failure(
    self: Any, task_id: str, saga_id: str, epoch: int, cause: str | None = None
) -> None:
    """Error callback of a saga's step chain. Idempotent: a repeated call changes nothing."""
    _callback(self, task_id, saga_id, engine.step_chain_failed, epoch, cause)


@shared_task(bind=True, name="sagas.on_compensation_failure", max_retries=None)
def on_compensation_failure(
    self: Any, task_id: str, saga_id: str, epoch: int, cause: str | None = None
) -> None:
    """Error callback of a saga's compensation chain. Idempotent."""
    _callback(self, task_id, saga_id, engine.compensation_chain_failed, epoch, cause)


@shared_task(bind=True, name="sagas.child_ended", max_retries=None)
def child_ended(self: Any, parent_id: str, stage: int, member: int | None = None) -> None:
    """A child saga ended (or stopped for an operator): its parent goes on, or fails the stage
    (or the group's `member` that started it). Idempotent: the parent's rows say whether it
    still waits for it."""
    try:
        if member is None:
            engine.child_ended(parent_id, stage)
        else:
            engine.member_child_ended(parent_id, stage, member)
    except Saga.DoesNotExist:
        logger.warning("saga %s does not exist: child_ended ignored", parent_id)
    except DATABASE_UNAVAILABLE:
        raise _database_unavailable(self, parent_id) from None
    except ProgrammingError:
        raise _schema_behind(self, parent_id) from None


@shared_task(bind=True, name="sagas.repair", max_retries=None)
def repair(self: Any, saga_id: str, index: int, actor: str = "") -> str:
    """Run step `index`'s compensation again, a repair an operator chose after a
    reconciliation check found a discrepancy (`sagas.engine.reconcile`), and check again.
    Idempotent: a repeated message finds the discrepancy gone and does nothing."""
    try:
        return reconcile.run_repair(saga_id, index, actor=actor)
    except Saga.DoesNotExist:
        logger.warning("saga %s does not exist: repair ignored", saga_id)
        return "not offered"
    except DATABASE_UNAVAILABLE:
        raise _database_unavailable(self, saga_id) from None


@shared_task(bind=True, name="sagas.bulk_action_batch", max_retries=None)
def bulk_action_batch(self: Any, bulk_action_id: int) -> None:
    """Act on the next batch of a bulk action's sagas, then send the next batch. Idempotent:
    each saga's outcome is recorded with its action, and a saga with one is passed over."""
    try:
        more = batches.run_batch(bulk_action_id)
    except BulkAction.DoesNotExist:
        logger.warning("bulk action %s does not exist: message ignored", bulk_action_id)
        raise Ignore() from None
    except DATABASE_UNAVAILABLE:
        raise _database_unavailable(self, bulk_action_id, what="bulk action") from None
    if more:
        dispatch.send_bulk_batch(bulk_action_id)


@shared_task(name="sagas.sweep")
def sweep() -> dict[str, int]:
    """Re-dispatch stalled sagas and bulk actions, and send the signals no process sent (run
    by Celery beat). Safe to run on several machines."""
    report = sweeper.sweep()
    return {
        "recovered": len(report.recovered),
        "dead_lettered": len(report.dead_lettered),
        "bulk_actions_resumed": len(report.bulk_actions_resumed),
        "relayed": report.relayed,
        "waits_timed_out": len(report.waits_timed_out),
        "signals_applied": report.signals_applied,
        "children_ended": report.children_ended,
        "reconciled": report.reconciled,
        "discrepant": report.discrepant,
    }


@shared_task(name="sagas.wake")
def wake() -> dict[str, int]:
    """End the waits whose timeout is due and apply the signals kept while their saga was busy
    (sent by Celery beat every few seconds; the sweep does it too, as a safety net). One
    indexed query when nothing is due. Safe to run on several machines."""
    try:
        report = waker.wake()
    except DATABASE_UNAVAILABLE:
        # Nothing to send again: beat sends the next wake in a few seconds.
        logger.warning("wake: database unavailable; the next wake tries again")
        close_old_connections()
        return {"waits_timed_out": 0, "signals_applied": 0}
    return {
        "waits_timed_out": len(report.waits_timed_out),
        "signals_applied": report.signals_applied,
    }


# Batches of a run of the task: up to 100,000 sagas, so that a first run over a long history
# ends well within the task's time limit; the next run goes on.
PURGE_MAX_BATCHES = 100


@shared_task(name="sagas.purge")
def purge() -> dict[str, int]:
    """Delete finished sagas older than `SAGAS_RETENTION` (run by Celery beat); off while the
    setting is None. Safe to run on several machines (batches claimed with SKIP LOCKED)."""
    older_than = conf.retention()
    if older_than is None:
        return {"purged": 0}
    report = retention.purge(older_than=older_than, max_batches=PURGE_MAX_BATCHES)
    if report.total:
        logger.info("retention: %s", report.summary())
    return {"purged": report.total}
