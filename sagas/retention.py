"""Retention: delete finished sagas, with their steps and events, in short batches.

Only `completed` and `compensated` sagas are ever deleted: never one in flight, nor a `failed`
one, which waits for an operator. Each batch is a transaction of its own: it claims up to
`batch_size` of the oldest finished sagas of a status (by `saga_status_finished_idx`, with
`FOR UPDATE SKIP LOCKED`, so several purges never wait on each other), deletes their events
and steps by saga id, then the sagas, and commits. No lock is held longer than one batch and
no statement touches more than one batch's sagas. Rows of other apps that point to a saga
follow their `on_delete` (an order's link to its saga is set to NULL).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Count, Exists, OuterRef, QuerySet
from django.utils import timezone

from .models import FINAL_STATUSES, OperatorRequest, Saga, SagaEvent, SagaStatus, SagaStep

PURGEABLE: tuple[str, ...] = tuple(FINAL_STATUSES)
BATCH_SIZE = 1000


@dataclass
class PurgeReport:
    """What a purge deleted (or, dry, would delete): sagas by status, and the rows with them."""

    cutoff: datetime
    statuses: tuple[str, ...]
    dry_run: bool = False
    sagas: Counter[str] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)  # by model label, the sagas' included
    batches: int = 0
    seconds: float = 0.0
    finished: bool = True  # False: stopped at max_batches with more to delete

    @property
    def total(self) -> int:
        return sum(self.sagas.values())

    def summary(self) -> str:
        """One line for a log."""
        by_status = ", ".join(f"{self.sagas[s]:,} {s}" for s in self.statuses)
        cutoff = f"{self.cutoff:%Y-%m-%d %H:%M:%S %Z}"
        what = f"{self.total:,} saga(s) ({by_status}) that finished before {cutoff}"
        if self.dry_run:
            return f"Dry run: {what} would be purged with their steps and events; nothing deleted."
        steps, events = self.rows[SagaStep._meta.label], self.rows[SagaEvent._meta.label]
        others = sum(self.rows.values()) - steps - events - self.total
        rest = f", {others:,} other row(s)" if others else ""
        more = "" if self.finished else "; more remain for the next run"
        return (
            f"Purged {what}, with {steps:,} step(s) and {events:,} event(s){rest}, "
            f"in {self.batches:,} batch(es), {self.seconds:.1f} s{more}."
        )


def parse_statuses(text: str) -> tuple[str, ...]:
    """`completed,compensated` as statuses that may be purged; a ValueError says why not."""
    statuses = tuple(dict.fromkeys(s.strip().lower() for s in text.split(",") if s.strip()))
    if not statuses:
        raise ValueError(f"no status given: choose from {', '.join(PURGEABLE)}")
    for status in statuses:
        if status == SagaStatus.FAILED:
            raise ValueError("failed sagas wait for an operator and are never purged")
        if status in SagaStatus.values and status not in PURGEABLE:
            raise ValueError(f"{status} sagas are in flight and are never purged")
        if status not in PURGEABLE:
            raise ValueError(f"unknown status {status!r}: choose from {', '.join(PURGEABLE)}")
    return statuses


def purge(
    *,
    older_than: timedelta,
    statuses: Iterable[str] = PURGEABLE,
    batch_size: int = BATCH_SIZE,
    dry_run: bool = False,
    max_batches: int | None = None,
    progress: Callable[[PurgeReport], None] | None = None,
) -> PurgeReport:
    """Delete the sagas of `statuses` that finished more than `older_than` ago, with their
    steps and events, `batch_size` sagas a transaction; `dry_run` counts them instead.
    `progress` is called after each batch. Safe to run on several machines at once."""
    statuses = tuple(statuses)
    if not set(statuses) <= set(PURGEABLE):
        raise ValueError(f"only {', '.join(PURGEABLE)} sagas may be purged, not {statuses}")
    if batch_size < 1:
        raise ValueError("the batch size must be at least 1")
    report = PurgeReport(cutoff=timezone.now() - older_than, statuses=statuses, dry_run=dry_run)
    started = time.monotonic()
    if dry_run:
        report.sagas.update(count(report.cutoff, statuses))
    for status in () if dry_run else statuses:
        while max_batches is None or report.batches < max_batches:
            deleted = _purge_batch(status, report.cutoff, batch_size)
            if not deleted:
                break
            report.batches += 1
            report.sagas[status] += deleted.get(Saga._meta.label, 0)
            report.rows.update(deleted)
            if progress is not None:
                progress(report)
        else:
            report.finished = False
            break
    if not dry_run and report.finished:
        # The keys of operators' requests (`OperatorRequest`): they serve a request sent again
        # within minutes, and go with the sagas of their age.
        _, deleted = OperatorRequest.objects.filter(created_at__lt=report.cutoff).delete()
        report.rows.update(deleted)
    report.seconds = time.monotonic() - started
    return report


def _unfinished_parent() -> QuerySet[Saga]:
    """A child saga is kept while its parent is unfinished: the parent may still compensate
    it. (A subquery, not a join: the claim locks the sagas it deletes, not their parents.)"""
    return Saga.objects.filter(pk=OuterRef("parent_id")).exclude(status__in=FINAL_STATUSES)


def count(cutoff: datetime, statuses: Iterable[str]) -> dict[str, int]:
    """Sagas of each status that finished before `cutoff` (by the index, no table scan)."""
    rows = (
        Saga.objects.filter(status__in=tuple(statuses), finished_at__lt=cutoff)
        .filter(~Exists(_unfinished_parent()))
        .order_by()
        .values("status")
        .annotate(n=Count("pk"))
    )
    return {row["status"]: row["n"] for row in rows}


def _purge_batch(status: str, cutoff: datetime, batch_size: int) -> dict[str, int]:
    """One transaction: claim a batch of the oldest finished sagas, delete them and theirs."""
    with transaction.atomic():
        ids = list(
            Saga.objects.select_for_update(skip_locked=True)
            .filter(status=status, finished_at__lt=cutoff)
            .filter(~Exists(_unfinished_parent()))
            .order_by("finished_at")
            .values_list("pk", flat=True)[:batch_size]
        )
        if not ids:
            return {}
        # Django's collector deletes the events and steps (and any other rows that cascade)
        # by saga id first, sets NULL where a row asks for it, then deletes the sagas.
        _, deleted = Saga.objects.filter(pk__in=ids).only("pk").delete()
    return deleted
