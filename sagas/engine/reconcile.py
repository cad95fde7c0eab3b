"""Reconciliation: a final saga checked against the outside world.

No engine can stop an external system from acting after a saga decided (a charge that lands
after the step that asked for it timed out and the saga compensated). A definition's
`reconcile` check (`sagas.definitions.SagaDefinition`) says what must be true of the world
once a saga is final; this module runs it and records what it finds:

- **When.** The sweeper runs it (`sweep`) on the sagas that finished at least
  `SAGAS_RECONCILE_AFTER` ago and at most `SAGAS_RECONCILE_WINDOW` ago, each again every
  `SAGAS_RECONCILE_EVERY`, at most `SAGAS_RECONCILE_BATCH` per sweep, none begun once the
  sweep's `SAGAS_RECONCILE_BUDGET` is spent; an operator runs it on one
  saga, or on every saga a filter matches (a bulk action). Only on a **final** saga (completed
  or compensated), and on a child only once its parent is final too (until then its parent
  may still compensate it): never on a saga in flight.
- **What it does.** Under the saga's lock (nothing else changes a final saga but an operator's
  repair, or a parent turning its child back), it runs the check. Discrepancies flag the
  saga (`Saga.reconciliation`, `discrepant`, with `Saga.discrepancies`) and go on its
  timeline (`discrepancy_found`, when they differ from those already recorded); a check that
  agrees again clears the flag (`discrepancy_cleared`); a check that raises is recorded
  (`reconcile_failed`, the exception's class and a log reference) and runs again at its next
  turn. **A final status never changes.**
- **Repairs.** A discrepancy may offer a repair (`Repair`): running the compensation of one of
  the saga's steps again. An operator chooses it after a preview (`plan_repair`); it runs in a
  worker (`run_repair`), goes on the timeline (`repair_ran` or `repair_failed`: who, which
  step, the result), and the check runs again at once.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import DatabaseError, transaction
from django.db.models import Q
from django.utils import timezone

from .. import conf
from ..definitions import (
    Discrepancy,
    ReconcileContext,
    get_definition,
    import_callable,
    registered,
)
from ..exceptions import CodeMissing, DefinitionError, InvalidTransition, SagaBusy
from ..models import (
    FINAL_STATUSES,
    EventKind,
    OperatorAction,
    Reconciliation,
    Saga,
)
from . import dispatch
from .unit import (
    Unit,
    class_path,
    compensation_time_limit,
    lock,
    resolve,
    safe_error,
    staff_detail,
)

logger = logging.getLogger("sagas")

# Seconds an operator's request (or the sweeper) waits for a saga's lock before it gives up.
LOCK_WAIT = 5.0
# The sweeper does not wait for a saga whose lock is held (an operator's repair runs).
SWEEP_LOCK_WAIT = 0.1


@dataclass(frozen=True)
class Checked:
    """What a run of the check found: `status` is `agrees`, `discrepant`, or `failed` (the
    check raised); `skipped` with `reason` when it could not run (the saga is not final, its
    definition has no check)."""

    status: str
    discrepancies: tuple[dict[str, Any], ...] = ()
    reason: str = ""


def check_of(name: str) -> str | None:
    """The import path of the check of the definition `name`, if it has one."""
    try:
        return get_definition(name).reconcile  # type: ignore[return-value]
    except DefinitionError:
        return None


def why_not(unit: Unit) -> str:
    """Why the saga's check cannot run now ("" when it can)."""
    saga = unit.saga
    if saga.status not in FINAL_STATUSES:
        return f"Only a final saga is reconciled (it is {saga.status})."
    if check_of(saga.name) is None:
        return f"The definition {saga.name} has no reconciliation check."
    if saga.parent_id is not None:
        parent = Saga.objects.filter(pk=saga.parent_id).values_list("status", flat=True).first()
        if parent is not None and parent not in FINAL_STATUSES:
            return "Its parent saga is not final: it may still compensate this child."
    return ""


def run_check(
    saga_id: UUID | str, *, wait: float | None = LOCK_WAIT, by: dict[str, Any] | None = None
) -> Checked:
    """Run the saga's check now, under its lock, and record what it finds. Raises `SagaBusy`
    if the lock is not free within `wait` seconds."""
    with transaction.atomic():
        return check_locked(lock(saga_id, wait=wait), by=by)


def check_locked(unit: Unit, *, by: dict[str, Any] | None = None) -> Checked:
    """`run_check` on a locked saga, in the caller's transaction."""
    reason = why_not(unit)
    if reason:
        return Checked("skipped", reason=reason)
    saga, by = unit.saga, by or {}
    now = timezone.now()
    before, recorded = (
        Saga.objects.filter(pk=saga.pk).values_list("reconciliation", "discrepancies").get()
    )
    try:
        # In a savepoint: a check whose query fails leaves this transaction usable, to record
        # that it failed.
        with transaction.atomic():
            check = import_callable(str(check_of(saga.name)))
            found = _discrepancies(check(context(unit)))
    except Exception as exc:  # the project's check: its bug, or a system it cannot reach
        reference = f"{saga.pk}/reconcile/{secrets.token_hex(4)}"
        logger.warning(
            "saga %s: its reconciliation check failed: %s [%s]",
            saga.pk,
            type(exc).__name__,
            reference,
            exc_info=not isinstance(exc, CodeMissing),
        )
        detail = {"exception": class_path(type(exc)), "reference": reference, **by}
        unit.event(EventKind.RECONCILE_FAILED, None, detail)
        unit.save_events()
        Saga.objects.filter(pk=saga.pk).update(reconciled_at=now)  # again at its next turn
        return Checked("failed")
    status = Reconciliation.DISCREPANT if found else Reconciliation.AGREES
    if found and list(found) != (recorded or []):
        unit.event(EventKind.DISCREPANCY_FOUND, None, {"discrepancies": list(found), **by})
    elif not found and before == Reconciliation.DISCREPANT:
        unit.event(EventKind.DISCREPANCY_CLEARED, None, by)
    if unit.events:
        unit.save_events()
    Saga.objects.filter(pk=saga.pk).update(
        reconciliation=status, reconciled_at=now, discrepancies=list(found) or None
    )
    return Checked(str(status), found)


def context(unit: Unit) -> ReconcileContext:
    """What a check receives: the final saga, as its rows hold it."""
    saga = unit.saga
    return ReconcileContext(
        saga_id=saga.pk,
        name=saga.name,
        status=saga.status,
        input=saga.input,
        outputs={s.name: s.output for s in unit.steps},
        statuses={s.name: s.status for s in unit.steps},
        error_code=saga.error_code,
    )


# The most discrepancies a saga records (the rest are counted in one more): they are stored on
# its row and its timeline, and shown on its pages.
MAX_DISCREPANCIES = 20


def _discrepancies(found: Iterable[Any] | None) -> tuple[dict[str, Any], ...]:
    """The check's answer as stored: each a `Discrepancy` (or the check is broken), at most
    `MAX_DISCREPANCIES` of them, and JSON."""
    answer = list(found or ())
    for item in answer:
        if not isinstance(item, Discrepancy):
            raise TypeError(f"a reconciliation check returns Discrepancy, not {type(item)}")
    stored = [item.as_dict() for item in answer[:MAX_DISCREPANCIES]]
    if len(answer) > MAX_DISCREPANCIES:
        more = len(answer) - MAX_DISCREPANCIES
        stored.append({"code": "more", "message": f"{more} more discrepancies not recorded."})
    json.dumps(stored)  # a check's own mistake (bytes, an object) fails the check, not the sweep
    return tuple(stored)


# -- the sweeper's pass -----------------------------------------------------------------------


@dataclass
class SweepReport:
    checked: int = 0
    discrepant: int = 0
    failed: int = 0


def due(now: datetime, batch_size: int) -> list[UUID]:
    """The final sagas whose check is due, the never-checked first: finished between
    `SAGAS_RECONCILE_WINDOW` and `SAGAS_RECONCILE_AFTER` ago, not checked within
    `SAGAS_RECONCILE_EVERY`, of a definition with a check, and not a child of an unfinished
    parent."""
    window = conf.reconcile_window()
    names = [name for name, definition in registered().items() if definition.reconcile]
    if window is None or not names:
        return []
    sagas = Saga.objects.filter(
        status__in=FINAL_STATUSES,
        name__in=names,
        finished_at__gte=now - window,
        finished_at__lte=now - conf.reconcile_after(),
    ).filter(
        Q(reconciled_at__isnull=True) | Q(reconciled_at__lt=now - conf.reconcile_every()),
        Q(parent__isnull=True) | Q(parent__status__in=FINAL_STATUSES),
    )
    never = list(
        sagas.filter(reconciled_at__isnull=True)
        .order_by("finished_at")
        .values_list("pk", flat=True)[:batch_size]
    )
    if len(never) >= batch_size:
        return never
    again = (
        sagas.filter(reconciled_at__isnull=False)
        .order_by("reconciled_at")
        .values_list("pk", flat=True)
    )
    return never + list(again[: batch_size - len(never)])


def sweep(*, now: datetime | None = None, batch_size: int | None = None) -> SweepReport:
    """Run the checks that are due (`due`), each in its own transaction; a saga whose lock is
    held is left for the next sweep, and a check that raises is recorded and never stops the
    others."""
    report = SweepReport()
    now = now or timezone.now()
    # The pace: a batch per sweep, and within it, no check begun past the budget (a check is
    # the project's code: a slow one must not make the whole sweep slow).
    until = time.monotonic() + conf.reconcile_budget().total_seconds()
    for saga_id in due(now, batch_size or conf.reconcile_batch_size()):
        if time.monotonic() > until:
            break
        try:
            checked = run_check(saga_id, wait=SWEEP_LOCK_WAIT, by={"by": "sweeper"})
        except SagaBusy:
            continue
        except Saga.DoesNotExist:
            continue  # purged meanwhile
        except DatabaseError as exc:  # the saga's own record could not be written: the next
            logger.warning("saga %s: its reconciliation was not recorded: %s", saga_id, exc)
            continue
        report.checked += checked.status != "skipped"
        report.discrepant += checked.status == Reconciliation.DISCREPANT
        report.failed += checked.status == "failed"
    return report


# -- repairs ------------------------------------------------------------------------------------


def offered(unit: Unit, index: int) -> dict[str, Any] | None:
    """The repair of step `index` that the saga's recorded discrepancies offer, if one does."""
    step = unit.steps[index]
    recorded = Saga.objects.filter(pk=unit.saga.pk).values_list("discrepancies", flat=True).get()
    for found in recorded or []:
        repair = found.get("repair") or {}
        if repair.get("step") == step.name:
            return {**found, "repair": repair}
    return None


def repair_plan(unit: Unit, index: int) -> tuple[bool, str]:
    """Whether the compensation of step `index` may run again as a repair, and why (not)."""
    if not 0 <= index < len(unit.steps):
        return False, "No such step."
    step = unit.steps[index]
    if unit.saga.status not in FINAL_STATUSES:
        return False, f"Only a final saga is repaired (it is {unit.saga.status})."
    if "kind" in step.definition or not step.definition.get("compensation"):
        return False, f"{step.name} has no compensation to run again."
    found = offered(unit, index)
    if found is None:
        return False, f"No discrepancy of the last check offers a repair of {step.name}."
    function = str(step.definition["compensation"]).rsplit(".", 1)[-1]
    note = found["repair"].get("note") or ""
    reason = (
        f"Run the compensation of {step.name} ({function}) again, for {found['code']}: "
        f"{found['message']}{' ' + note if note else ''} The saga stays {unit.saga.status}; "
        "the repair and its result go on its timeline, then the check runs again."
    )
    return True, reason


def step_name(saga_id: UUID | str, index: int) -> str:
    """The name of the saga's step `index`."""
    return Saga.objects.get(pk=saga_id).steps.get(index=index).name


def request_repair(saga_id: UUID | str, index: int, *, actor: str) -> str:
    """An operator's repair: checked under the saga's lock, then run by a worker once this
    commits (`run_repair`); returns its plan's reason. Raises `InvalidTransition` when no
    discrepancy offers it."""
    with transaction.atomic():
        unit = lock(saga_id, wait=LOCK_WAIT)
        allowed, reason = repair_plan(unit, index)
        if not allowed:
            raise InvalidTransition(reason)
        step = unit.steps[index]
        limit = compensation_time_limit(step)
        saga = str(unit.saga.pk)
        # On the timeline now: a repair whose worker dies (killed at its time limit) leaves
        # this, with no `repair_ran` after it.
        unit.event(EventKind.REPAIR_REQUESTED, step, {"actor": actor, "step": step.name})
        unit.save_events()
        transaction.on_commit(lambda: dispatch.send_repair(saga, index, actor, limit))
    return reason


def run_repair(saga_id: UUID | str, index: int, *, actor: str) -> str:
    """Run step `index`'s compensation again (a repair an operator chose), record it, and run
    the check again: in one transaction under the saga's lock. Returns what happened
    ("ran", "failed", or "not offered": the discrepancy was gone, a repeated message)."""
    with transaction.atomic():
        unit = lock(saga_id)
        allowed, _ = repair_plan(unit, index)
        if not allowed:
            return "not offered"
        step = unit.steps[index]
        by = {"actor": actor, "step": step.name}
        ctx = unit.context(step, compensation=True)
        try:
            with transaction.atomic(), unit.attempt(step, compensation=True):
                resolve(str(step.definition["compensation"]))(ctx)
        except Exception as exc:
            error = safe_error(exc, time_limit=compensation_time_limit(step))
            reference = f"{unit.saga.pk}/{step.name}/repair/{secrets.token_hex(4)}"
            logger.warning(
                "saga %s: the repair of %s failed: %s [%s]",
                unit.saga.pk,
                step.name,
                type(exc).__name__,
                reference,
                exc_info=exc,
            )
            detail = {**by, **error.as_dict(), **staff_detail(exc, reference)}
            unit.event(EventKind.REPAIR_FAILED, step, detail)
            unit.save_events()
            return "failed"
        unit.event(EventKind.REPAIR_RAN, step, by)
        unit.save_events()
        unit.events = []  # told once this commits; the check records its own
        check_locked(unit, by={"actor": actor, "after": OperatorAction.REPAIR.value})
    return "ran"
