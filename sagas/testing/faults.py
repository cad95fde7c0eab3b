"""Fault injection for tests and drills: with `sagas.testing` in INSTALLED_APPS only.

A `Fault` row names a step, a point and an effect. The faults that fire in an attempt are taken
(and counted down) in their own committed statement before the step's transaction begins, so a
fault that rolls the step back is still counted.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import current_app, current_task
from celery.exceptions import SoftTimeLimitExceeded
from django.db import connection, transaction
from django.db.models import F, Q
from kombu.exceptions import OperationalError

from sagas.engine import dispatch
from sagas.exceptions import BusinessError, TransientError
from sagas.models import Saga, SagaMember, SagaStep, StepStatus

from .models import Fault, FaultEffect, FaultPoint


class InjectedTransientError(TransientError):
    code = "injected_transient_error"


class InjectedBusinessError(BusinessError):
    code = "injected_business_error"


HOLD_TIMEOUT = 30.0  # seconds a held member waits for another's failure at most


@dataclass
class Injector:
    effects: dict[str, str] = field(default_factory=dict)  # point -> effect
    # The attempt's saga, stage and member (a group's), for a hold.
    saga_id: str = ""
    index: int = 0
    member: int | None = None

    def fire(self, point: str) -> None:
        effect = self.effects.get(point)
        if effect == FaultEffect.HOLD:
            self.hold()
        if effect == FaultEffect.FAIL_WHILE_HELD:
            self.fail_while_held()
        if effect == FaultEffect.CRASH:
            os._exit(137)  # as if the kernel killed the worker process
        if effect == FaultEffect.TRANSIENT_ERROR:
            raise InjectedTransientError("Injected transient fault.")
        if effect == FaultEffect.BUSINESS_ERROR:
            raise InjectedBusinessError("Injected business fault.")
        if effect == FaultEffect.HANG:
            hang()
        if effect == FaultEffect.LOSE_COMMIT_ANSWER:
            lose_next_commit_answer()
        if effect == FaultEffect.STATEMENT_TIMEOUT:
            statement_times_out()

    def before_action(self) -> None:
        self.fire(FaultPoint.BEFORE_ACTION)

    def after_action(self) -> None:
        self.fire(FaultPoint.AFTER_ACTION)

    def before_compensation(self) -> None:
        self.fire(FaultPoint.BEFORE_COMPENSATION)

    def after_commit(self) -> None:
        if self.effects.get(FaultPoint.AFTER_COMMIT) == FaultEffect.REDELIVER:
            redeliver()
        if self.effects.get(FaultPoint.AFTER_COMMIT) == FaultEffect.REFUSE_NEXT:
            refuse_next_message()
        self.fire(FaultPoint.AFTER_COMMIT)

    def after_final_failure(self, task_id: str, saga_id: str, epoch: int, forward: bool) -> None:
        """A crash here loses the chain's error callback; a repeat sends it twice."""
        if self.effects.get(FaultPoint.AFTER_FINAL_FAILURE) == FaultEffect.REPEAT_CALLBACK:
            errback = dispatch.ON_STEP_FAILURE if forward else dispatch.ON_COMPENSATION_FAILURE
            cause = "sagas.tasks.StepFailed"
            dispatch.send_error_callback(errback, task_id, saga_id, epoch, cause, countdown=1)
        self.fire(FaultPoint.AFTER_FINAL_FAILURE)

    def hold(self) -> None:
        """Wait until another member of this one's group failed for good (committed), so that
        this one's outcome comes after that failure; go on after `HOLD_TIMEOUT` regardless.
        While it waits, it holds an advisory lock of its group, which `fail_while_held` sees."""
        others = SagaMember.objects.filter(
            saga_id=self.saga_id, stage=self.index, status=StepStatus.FAILED
        ).exclude(position=-1 if self.member is None else self.member)
        key = self._group_key()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock((%s)::int, (%s)::int)", key)
        try:
            until(others.exists)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock((%s)::int, (%s)::int)", key)

    def fail_while_held(self) -> None:
        """Fail for good once another member of the group is held (`hold`): it began its
        attempt, and its action will end after this failure."""

        def held() -> bool:
            with connection.cursor() as cursor:
                cursor.execute(HELD_SQL, self._group_key())
                return bool(cursor.fetchone()[0])

        until(held)
        raise InjectedBusinessError("Injected business fault.")

    def _group_key(self) -> tuple[int, int]:
        """The advisory lock of a hold in this attempt's group: (a constant, the group's)."""
        digest = zlib.crc32(f"{self.saga_id}:{self.index}".encode())
        return HOLD_LOCK_CLASS, digest - (1 << 31)


HOLD_LOCK_CLASS = 0x5A6A  # the first key of a hold's advisory lock
HELD_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND classid = (%s)::int::oid AND objid = (%s)::int::oid AND objsubid = 2)"
)


def until(condition: Callable[[], bool], timeout: float = HOLD_TIMEOUT) -> None:
    """Wait until `condition()` holds, or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)


def redeliver() -> None:
    """Publish the message being run once more, as a broker does when the worker died after the
    commit and before the acknowledgement: the same task id, epoch and rest of the chain."""
    if not current_task:
        raise RuntimeError("a message is redelivered from inside the task that runs it")
    current_task.signature_from_request().apply_async()


def refuse_next_message() -> None:
    """Make the broker refuse the next message of this task's chain, which Celery publishes
    once the task returns (`AMQP._retry_publish`, its seam for a chain's next message): the
    task then fails after its commit, and the chain's error callback is sent."""
    if not current_task or not current_task.request.chain:
        return  # the chain's last task: there is no next message to refuse
    amqp: Any = current_app.amqp
    publish = amqp._retry_publish

    def refuse(*args: object, **kwargs: object) -> None:
        amqp._retry_publish = publish  # once
        raise OperationalError("Injected: the broker refused the chain's next message.")

    amqp._retry_publish = refuse


def lose_next_commit_answer() -> None:
    """The next COMMIT of this process commits, then its answer is lost, as when PostgreSQL
    restarts between the two: the worker hears an OperationalError for a change that is done.
    Both ways a transaction commits: the engine's COMMIT sent with its last write, and
    Django's own."""
    from django.db import DEFAULT_DB_ALIAS, connections
    from django.db import OperationalError as DatabaseOperationalError

    from sagas.engine.rows import cursors, write

    database: Any = connections[DEFAULT_DB_ALIAS]
    commit, execute = database._commit, write.execute

    def restore() -> None:
        database._commit, write.execute = commit, execute
        _armed.clear()

    def lost() -> DatabaseOperationalError:
        restore()  # once
        return DatabaseOperationalError("Injected: the answer to the COMMIT was lost.")

    def django_commit() -> None:
        commit()
        raise lost()

    def engine_execute(db: Any, cursor: Any, sql: str, params: list[Any], *, commit: bool) -> None:
        commits = commit and cursors.outermost_transaction(db)
        execute(db, cursor, sql, params, commit=commit)
        if commits:
            raise lost()

    restore_commit()
    database._commit, write.execute = django_commit, engine_execute
    _armed.append(restore)


def statement_times_out() -> None:
    """A query of the attempt's own, in its transaction, cut by its statement timeout."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = '1ms'")
        cursor.execute("SELECT pg_sleep(0.05)")


# How to put the COMMITs back, while the next one's answer is to be lost.
_armed: list[Any] = []


def restore_commit() -> None:
    """Lose no COMMIT's answer after all (the attempt committed nothing)."""
    for restore in list(_armed):
        restore()


def hang() -> None:
    """Ignore the soft time limit, as a step stuck in a call that swallows it would."""
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            continue


def take(saga_id: str, index: int, *, forward: bool, member: int | None = None) -> Injector | None:
    """The faults that fire in this attempt of step `index` (a group's member at position
    `member`), counted down now (the hook). A fault names the stage; a member too, by its
    name or position (`<group>.<member>`, `<group>[<position>]`); a step of a child saga is
    also named in its parent's faults, under the parent's stage (`<stage>.<step>`)."""
    points = STEP_POINTS if forward else COMPENSATION_POINTS
    names = fault_names(saga_id, index, member)
    aimed = (Q(saga_id=saga_id) | Q(saga__isnull=True)) & Q(step_name__in=names)
    parent_id, parent_stage, parent_member = (
        Saga.objects.filter(pk=saga_id)
        .values_list("parent_id", "parent_stage", "parent_member")
        .first()
    ) or (None, None, None)
    if parent_id is not None and parent_stage is not None:
        stage = SagaStep.objects.filter(saga_id=parent_id, index=parent_stage)
        for stage_name in stage.values_list("name", flat=True)[:1]:
            if parent_member is not None:  # a group's child member: `<group>.<member>.<step>`
                starter = SagaMember.objects.filter(
                    saga_id=parent_id, stage=parent_stage, position=parent_member
                )
                stage_name += "." + (starter.values_list("name", flat=True).first() or "")
            aimed |= Q(saga_id=parent_id, step_name__in=[f"{stage_name}.{n}" for n in names])
    injector = Injector(saga_id=saga_id, index=index, member=member)
    with transaction.atomic():
        rows = (
            Fault.objects.select_for_update()
            .filter(aimed, point__in=points)
            .filter(Q(remaining__isnull=True) | Q(remaining__gt=0))
            .order_by("id")
        )
        for fault in rows:
            if fault.point in injector.effects:
                continue
            injector.effects[fault.point] = fault.effect
            taken: dict[str, Any] = {"taken_by": os.getpid()}
            if fault.remaining is not None:
                taken["remaining"] = F("remaining") - 1
            Fault.objects.filter(pk=fault.pk).update(**taken)
    return injector if injector.effects else None


def fault_names(saga_id: str, index: int, member: int | None) -> list[str]:
    """The names a fault may give the attempt's step by: its stage's; a member's too."""
    name = SagaStep.objects.filter(saga_id=saga_id, index=index).values_list("name", flat=True)
    names = list(name[:1])
    if member is not None and names:
        row = SagaMember.objects.filter(saga_id=saga_id, stage=index, position=member)
        group = names[0]
        names += [f"{group}.{n}" for n in row.values_list("name", flat=True)[:1]]
        names.append(f"{group}[{member}]")
    return names


STEP_POINTS = (
    FaultPoint.BEFORE_ACTION,
    FaultPoint.AFTER_ACTION,
    FaultPoint.AFTER_COMMIT,
    FaultPoint.AFTER_FINAL_FAILURE,
)
COMPENSATION_POINTS = (FaultPoint.BEFORE_COMPENSATION, FaultPoint.AFTER_COMMIT)
