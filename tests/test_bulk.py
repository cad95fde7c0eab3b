"""Bulk actions: retry or compensate every saga that matches a filter, after a preview, in the
background in batches; in the API and the admin, with the single actions' permissions."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from sagas import services
from sagas.bulk import BulkFilter, batches
from sagas.models import BulkAction, EventKind, Saga, SagaEvent
from tests.conftest import lose_messages
from tests.factories import saga_rows


def run_to_the_end(bulk_action: BulkAction) -> BulkAction:
    """The bulk action's batches, run here as a worker would, one after the other."""
    while batches.run_batch(bulk_action.pk):
        pass
    bulk_action.refresh_from_db()
    return bulk_action


@contextmanager
def locked_elsewhere(saga: Saga) -> Iterator[None]:
    """The saga's row locked by another connection, as by a step that is running."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                Saga.objects.select_for_update().get(pk=saga.pk)
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join()


# -- the preview, then what happens -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_sagas_that_changed_since_the_preview_are_skipped_and_reported(monkeypatch):
    lose_messages(monkeypatch)  # no worker: the batches run here, and the sagas stay put
    sent: list[int] = []
    monkeypatch.setattr("sagas.dispatch.send_bulk_batch", sent.append)
    monkeypatch.setattr("sagas.engine.operator.LOCK_WAIT", 0.3)
    compensated, busy, gone, failed_otherwise, *unchanged = [saga_rows() for _ in range(6)]
    bulk_filter = BulkFilter(name="three_steps", error_code="boom")

    preview = services.bulk_action_preview(action="retry", bulk_filter=bulk_filter)
    assert (preview.count, preview.allowed) == (6, 6)
    bulk_action = services.bulk_action_start(
        action="retry", bulk_filter=bulk_filter, actor="alice", expected_count=6
    )
    assert sent == [bulk_action.pk]  # its first batch, after the commit
    # That message lost: the sweeper sends the batch again.
    assert batches.resume_stalled(stale_after=timedelta(0)) == [bulk_action.pk]
    assert sent == [bulk_action.pk, bulk_action.pk]

    # Meanwhile another operator aborts one saga, one is deleted, one was retried and failed
    # with another error, and a step of one is running (its row locked).
    services.saga_compensate(saga_id=compensated.pk, actor="bob")
    gone_id = gone.pk
    gone.delete()
    Saga.objects.filter(pk=failed_otherwise.pk).update(error_code="card_declined")
    with locked_elsewhere(busy):
        bulk_action = run_to_the_end(bulk_action)

    assert bulk_action.status == "completed" and bulk_action.finished_at is not None
    counts = (bulk_action.total, bulk_action.done, bulk_action.skipped, bulk_action.failed)
    assert counts == (6, 2, 4, 0)
    skipped = dict(bulk_action.items.filter(outcome="skipped").values_list("saga_id", "reason"))
    assert skipped == {
        compensated.pk: "Only a failed saga can be retried (it is compensating).",
        busy.pk: "The saga is busy (a step is running); try again shortly.",
        gone_id: "The saga no longer exists.",
        failed_otherwise.pk: "The saga no longer matches the filter.",
    }
    for saga in unchanged:
        assert Saga.objects.get(pk=saga.pk).status == "running"
        retried = SagaEvent.objects.get(saga=saga, kind=EventKind.OPERATOR_RETRY)
        assert (retried.detail["actor"], retried.detail["bulk_action"]) == ("alice", bulk_action.pk)
    for saga in (compensated, busy, failed_otherwise):
        assert not SagaEvent.objects.filter(saga=saga, kind=EventKind.OPERATOR_RETRY).exists()

    # A batch delivered again acts on nothing twice.
    assert batches.run_batch(bulk_action.pk) is False
    assert SagaEvent.objects.filter(kind=EventKind.OPERATOR_RETRY).count() == 2


# -- the filter and the admin ---------------------------------------------------------------------


def test_each_field_of_the_filter(db):
    first = saga_rows(stopped_at=0, error_code="declined")
    second = saga_rows(stopped_at=1)
    completed = saga_rows(status="completed")
    other = saga_rows("six_steps", stopped_at=1)
    a_day_ago = timezone.now() - timedelta(days=1)
    Saga.objects.filter(pk=first.pk).update(created_at=a_day_ago, updated_at=a_day_ago)

    def matched(**fields: Any) -> set:
        return set(BulkFilter(**fields).sagas().values_list("pk", flat=True))

    everything = {first.pk, second.pk, completed.pk, other.pk}
    assert matched() == everything
    assert matched(status="failed") == everything - {completed.pk}
    assert matched(name="six_steps") == {other.pk}
    assert matched(error_code="declined") == {first.pk}
    assert matched(failed_step="second") == {second.pk}
    assert matched(failed_step="step_1") == {other.pk}
    an_hour_ago = timezone.now() - timedelta(hours=1)
    assert matched(created_before=an_hour_ago) == {first.pk}
    assert matched(created_from=an_hour_ago) == everything - {first.pk}
    assert matched(updated_from=a_day_ago, updated_before=an_hour_ago) == {first.pk}
    recorded = BulkFilter(status="failed", created_from=an_hour_ago)
    assert BulkFilter.from_json(recorded.as_json()) == recorded
