"""A bug or a deploy never undoes paid work: the safe defaults, and the truth for operators.

One real-worker test per case of the issue: (1) a callable renamed or moved by a deploy pauses
its saga, and retry runs it once the path is mapped; (2) an unexpected exception pauses by
default, and the step's policy can say otherwise; (4) what operators are told: an error raised
outside the attempt, a halted compensation, the full error for staff, a busy saga, the cause of
a retried backward saga. (3), the system checks, is tests/test_checks.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from django.db import transaction
from django.urls import reverse
from rest_framework.test import APIClient

from sagas.definitions import RetryPolicy, SagaDefinition, Step, register
from sagas.models import EventKind, Saga, SagaEvent
from sagas.services import saga_retry, saga_start, saga_step_resolve
from sagas.testing.models import Fault, FaultEffect, FaultPoint
from sagas.testing.worker import CeleryWorker
from tests.conftest import (
    ARTIFACTS,
    QUEUE,
    attempt_in_process,
    lose_messages,
    wait_final,
    wait_for,
    worker_options,
)
from tests.factories import UserFactory
from tests.test_failure_paths import stall, sweep

pytestmark = pytest.mark.django_db(transaction=True)

FAST = RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1)
RECORD, UNDO = "tests.sagadefs.record", "tests.sagadefs.undo"


def statuses(saga: Saga) -> list[str]:
    return list(saga.steps.order_by("index").values_list("status", flat=True))


def kinds(saga: Saga) -> list[str]:
    return list(saga.events.order_by("id").values_list("kind", flat=True))


def define(name: str, *steps: Step, **options) -> str:
    register(SagaDefinition(name=name, steps=list(steps), **options))
    return name


# -- 1. a deploy that moves code pauses, never compensates -----------------------------------

TRAVEL_V1 = """
def book_hotel(ctx):
    return {"hotel": "booked by book_hotel"}


def cancel_hotel(ctx):
    return None
"""
# The deploy renames the action; its compensation stays.
TRAVEL_V2 = TRAVEL_V1.replace("def book_hotel", "def reserve_hotel").replace(
    "booked by book_hotel", "booked by reserve_hotel"
)


def travel_worker(code: Path, queue: str, renamed: dict[str, str] | None = None) -> CeleryWorker:
    """A worker of its own that imports the `travel` package from `code`, as deployed."""
    options = worker_options(
        nodes=1,
        concurrency=1,
        name="deploy",
        env={
            "PYTHONPATH": str(code),
            "CELERY_TASK_DEFAULT_QUEUE": queue,
            "TEST_SAGAS_RENAMED_CALLABLES": json.dumps(renamed or {}),
        },
    )
    return CeleryWorker(**{**options, "queue": queue})


@pytest.mark.system
def test_a_step_renamed_by_a_deploy_pauses_its_saga_and_runs_once_mapped(
    transactional_db, tmp_path
):
    package = tmp_path / "code" / "travel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "steps.py").write_text(TRAVEL_V1)
    name = define(
        "trip",
        Step("flight", RECORD, UNDO, retry=FAST),
        Step("hotel", "travel.steps.book_hotel", "travel.steps.cancel_hotel", on_exhausted="pause"),
        Step("car", RECORD, UNDO, retry=FAST),
    )
    queue = f"{QUEUE}-deploy"
    worker = travel_worker(tmp_path / "code", queue)
    with worker, worker.routed():
        with transaction.atomic():
            saga, _ = saga_start(name=name, input={})
            # The hotel's service is down: the saga pauses there, as its policy says.
            Fault.objects.create(
                saga=saga,
                step_name="hotel",
                point=FaultPoint.BEFORE_ACTION,
                effect=FaultEffect.TRANSIENT_ERROR,
            )
        assert wait_final(saga.pk).status == "failed"
        Fault.objects.all().delete()

    # The deploy: `book_hotel` is now `reserve_hotel`; the worker restarts with the new code.
    (package / "steps.py").write_text(TRAVEL_V2)
    with travel_worker(tmp_path / "code", queue) as worker, worker.routed():
        saga_retry(saga_id=saga.pk, actor="operator")
        wait_for(
            lambda: (
                Saga.objects.get(pk=saga.pk).status == "failed"
                and SagaEvent.objects.filter(saga=saga, kind=EventKind.SAGA_PAUSED).count() == 2
            ),
            what="the retried saga to pause again",
        )
    saga.refresh_from_db()
    assert saga.error_code == "code_missing"
    assert "travel.steps.book_hotel" in saga.error_message
    assert statuses(saga) == ["completed", "failed", "pending"]
    assert EventKind.COMPENSATION_STARTED not in kinds(saga)

    # Mapped to its new name, the same worker code runs it: the trip completes, undone nothing.
    renamed = {"travel.steps.book_hotel": "travel.steps.reserve_hotel"}
    with travel_worker(tmp_path / "code", queue, renamed) as worker, worker.routed():
        saga_retry(saga_id=saga.pk, actor="operator")
        saga = wait_final(saga.pk)
        assert saga.status == "completed"
    assert saga.steps.get(name="hotel").output == {"hotel": "booked by reserve_hotel"}
    assert EventKind.STEP_COMPENSATED not in kinds(saga)


def test_an_on_complete_moved_by_a_deploy_pauses_before_the_last_step_instead_of_refunding(
    saga_db,
):
    name = define(
        "moved_on_complete",
        Step("charge", RECORD, UNDO, retry=FAST),
        Step("ship", RECORD, UNDO, retry=FAST),
        on_complete="tests.sagadefs.confirm_moved_elsewhere",
    )
    saga, _ = saga_start(name=name, input={})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "code_missing")
    assert "tests.sagadefs.confirm_moved_elsewhere" in saga.error_message
    # The last step's action did not run: nothing it did is left half-confirmed.
    assert statuses(saga) == ["completed", "failed"]
    assert EventKind.COMPENSATION_STARTED not in kinds(saga)


def test_a_compensation_moved_by_a_deploy_pauses_the_compensation_at_once(saga_db):
    name = define(
        "moved_compensation",
        Step("first", RECORD, "tests.sagadefs.undo_moved_elsewhere", retry=FAST),
        Step("second", "tests.sagadefs.decline", UNDO),
    )
    saga, _ = saga_start(name=name, input={})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    first = saga.steps.get(name="first")
    assert (first.status, first.error_code) == ("compensation_failed", "code_missing")
    assert "tests.sagadefs.undo_moved_elsewhere" in first.error_message
    assert first.compensation_attempts == 1  # not retried: only a deploy brings it back


# -- 2. a bug pauses; the step's policy may say compensate or retry -------------------------------


def test_a_bug_in_the_third_step_pauses_the_saga_and_undoes_nothing(saga_db):
    name = define(
        "bug_in_third",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", RECORD, UNDO, retry=FAST),
        Step("third", "tests.sagadefs.has_a_bug", UNDO, retry=FAST),
    )
    saga, _ = saga_start(name=name, input={})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "unexpected_error")
    assert saga.error_message == "Unexpected error (KeyError)."
    assert statuses(saga) == ["completed", "completed", "failed"]
    assert saga.steps.get(name="third").attempts == 1  # not retried: a bug does not heal
    assert EventKind.COMPENSATION_STARTED not in kinds(saga)
    paused = saga.events.get(kind=EventKind.SAGA_PAUSED)
    assert paused.detail["reason"] == "unexpected error"


@pytest.mark.parametrize(
    ("policy", "status", "attempts", "third"),
    [
        ("compensate", "compensated", 1, "failed"),
        ("retry", "failed", 2, "failed"),  # retried as transient, then on_exhausted: pause
    ],
)
def test_the_step_policy_for_unexpected_errors(saga_db, policy, status, attempts, third):
    name = define(
        f"bug_then_{policy}",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", RECORD, UNDO, retry=FAST),
        Step(
            "third",
            "tests.sagadefs.has_a_bug",
            UNDO,
            retry=FAST,
            on_unexpected_error=policy,
            on_exhausted="pause",
        ),
    )
    saga, _ = saga_start(name=name, input={})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == (status, "unexpected_error")
    assert saga.steps.get(name="third").attempts == attempts
    expected = ["compensated", "compensated", third] if policy == "compensate" else None
    assert statuses(saga) == (expected or ["completed", "completed", "failed"])


def test_the_definition_sets_the_policy_of_its_steps(saga_db):
    name = define(
        "bug_compensates_by_definition",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", "tests.sagadefs.has_a_bug", UNDO, retry=FAST),
        on_unexpected_error="compensate",
    )
    saga, _ = saga_start(name=name, input={})
    assert wait_final(saga.pk).status == "compensated"


def test_a_declared_business_error_still_compensates(saga_db):
    saga, _ = saga_start(name="declines_second", input={})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "declined")


# -- 4. the truth for operators ---------------------------------------------------------------


def test_a_task_that_fails_outside_its_attempt_is_recorded_as_such_never_as_a_time_limit(
    saga_db, monkeypatch
):
    """A deploy changed a task's arguments: its messages in flight fail before the attempt."""
    from sagas import tasks
    from sagas.engine import dispatch

    signature = dispatch._signature

    def from_another_version(*args, **kwargs):
        sig = signature(*args, **kwargs)
        sig.kwargs["added_by_a_later_version"] = True
        return sig

    monkeypatch.setattr(dispatch, "_signature", from_another_version)
    # The sender is of the other version: it does not check the arguments against this one's.
    monkeypatch.setattr(tasks.run_step, "typing", False)
    name = define("outside_attempt", Step("first", RECORD, UNDO, retry=FAST))
    saga, _ = saga_start(name=name, input={})
    saga = wait_final(saga.pk)
    monkeypatch.undo()
    first = saga.steps.get()
    assert (saga.status, saga.error_code) == ("failed", "task_failed")
    assert "TypeError" in saga.error_message and "time limit" not in saga.error_message
    assert (first.status, first.error_code) == ("failed", "task_failed")
    assert not saga.events.filter(detail__code="time_limit").exists()

    saga_retry(saga_id=saga.pk, actor="operator")
    assert wait_final(saga.pk).status == "completed"


def test_the_error_callback_reads_its_chain_from_the_failed_task():
    """Celery copies a chain's error callback into each of its tasks, so it names nothing: the
    saga, the epoch and the engine's callback come from the failed task's id and name."""
    from sagas.engine import dispatch

    saga = "0b0f3c1e-8a3e-4d4b-9f55-1c2d3e4f5a6b"
    assert dispatch.failed_chain(f"{saga}:3:1", dispatch.RUN_STEP) == (
        saga,
        3,
        dispatch.ON_STEP_FAILURE,
    )
    assert dispatch.failed_chain(f"{saga}:3:2.4", dispatch.COMPENSATE_STEP) == (
        saga,
        3,
        dispatch.ON_COMPENSATION_FAILURE,
    )
    assert dispatch.failed_chain(f"{saga}:3:1", "tasks.another") is None
    assert dispatch.failed_chain(f"{saga}:3:1", None) is None
    assert dispatch.failed_chain("a-task-of-celery's-own-id", dispatch.RUN_STEP) is None
    assert dispatch.failed_chain(f"{saga}:x:1", dispatch.RUN_STEP) is None


def test_a_chain_sent_before_a_deploy_still_reaches_its_error_callback(saga_db, monkeypatch):
    """Chains an earlier release sent, still in the broker across the deploy, name their saga,
    epoch and callback in the error callback's keyword arguments: it is sent all the same, and
    the declined saga compensates."""
    from celery import chain, current_app

    from sagas.engine import dispatch

    monkeypatch.setattr(dispatch, "send_steps", lambda *args, **kwargs: None)
    name = define(
        "chain_of_an_earlier_release",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", "tests.sagadefs.decline", UNDO),
    )
    saga, _ = saga_start(name=name, input={})
    saga_id, epoch = str(saga.pk), saga.epoch
    signatures = [dispatch._signature(dispatch.RUN_STEP, saga_id, i, epoch, 30) for i in (0, 1)]
    errback = current_app.signature(
        dispatch.CHAIN_FAILED,
        kwargs={"saga_id": saga_id, "epoch": epoch, "callback": dispatch.ON_STEP_FAILURE},
    )
    chain(*signatures).on_error(errback).apply_async()
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "declined")
    assert statuses(saga) == ["compensated", "failed"]


def test_a_halted_compensation_leaves_the_steps_it_never_reached_as_they_were(saga_db):
    name = define(
        "halts_compensation",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", RECORD, "tests.sagadefs.fails_to_undo", compensation_retry=FAST),
        Step("third", "tests.sagadefs.decline", UNDO),
    )
    saga, _ = saga_start(name=name, input={})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    assert statuses(saga) == ["completed", "compensation_failed", "failed"]
    first = saga.steps.get(name="first")
    assert (first.error_code, first.error_message) == ("", "")

    # The operator refunds by hand; the compensation goes on; the saga says why it was undone.
    saga_step_resolve(saga_id=saga.pk, index=1, actor="operator")
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "declined")
    assert statuses(saga) == ["compensated", "compensated", "failed"]


def test_a_retried_step_keeps_no_stale_error(saga_db, monkeypatch):
    with transaction.atomic():
        saga, _ = saga_start(name="deadline_demo", input={})
        Fault.objects.create(
            saga=saga,
            step_name="second",
            point=FaultPoint.BEFORE_ACTION,
            effect=FaultEffect.TRANSIENT_ERROR,
        )
    assert wait_final(saga.pk).status == "failed"
    lose_messages(monkeypatch)
    saga_retry(saga_id=saga.pk, actor="operator")
    second = saga.steps.get(name="second")
    assert (second.status, second.error_code, second.error_message) == ("pending", "", "")
    monkeypatch.undo()
    Fault.objects.all().delete()
    stall(saga)
    # The sweeper skips a saga whose row someone holds a moment (SKIP LOCKED): the failed
    # chain's late error callback may, right now. Beat would sweep again; so does this.
    wait_for(lambda: str(saga.pk) in sweep().recovered, timeout=10, what="the sweeper")
    assert wait_final(saga.pk).status == "completed"


def test_a_backward_saga_retried_after_recovery_gave_up_keeps_its_cause(saga_db, monkeypatch):
    lose_messages(monkeypatch)
    saga, _ = saga_start(name="declines_second", input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    assert attempt_in_process(saga.pk, 1) == "fail"  # declined; the error callback is lost
    stall(saga)
    sweep(max_recoveries=0)
    saga.refresh_from_db()
    assert (saga.status, saga.error_code) == ("failed", "recovery_exhausted")

    monkeypatch.undo()
    saga_retry(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "declined")


def test_staff_find_the_full_error_and_clients_only_the_safe_one(saga_db, settings):
    name = define(
        "bugs_for_staff",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", "tests.sagadefs.leaks_a_secret", UNDO, retry=FAST),
    )
    owner = UserFactory()
    saga, _ = saga_start(name=name, input={}, created_by=owner)
    saga = wait_final(saga.pk)
    failed = saga.events.get(kind=EventKind.STEP_FAILED)
    reference = f"{saga.pk}/second/1"
    assert failed.detail["exception"] == "builtins.RuntimeError"
    assert failed.detail["reference"] == reference
    assert "hunter2" not in json.dumps(list(saga.events.values_list("detail", flat=True)))
    assert "hunter2" not in saga.error_message + saga.steps.get(name="second").error_message
    # The worker's log has the traceback under the same reference.
    logs = "".join(path.read_text() for path in ARTIFACTS.glob("worker-*.log"))
    at = logs.index(reference)
    assert "Traceback" in logs[at : at + 4000] and "RuntimeError" in logs[at : at + 4000]

    client = APIClient()
    client.force_authenticate(owner)
    body = client.get(f"/api/sagas/{saga.pk}/").json()
    text = json.dumps(body)
    assert "builtins.RuntimeError" not in text and reference not in text
    assert body["error"] == {
        "code": "unexpected_error",
        "message": "Unexpected error (RuntimeError).",
    }


def test_a_message_a_project_lists_as_safe_is_shown_to_staff(saga_db):
    name = define(
        "safe_message",
        Step("first", "tests.sagadefs.raises_a_safe_message", UNDO, retry=FAST),
    )
    saga, _ = saga_start(name=name, input={})
    saga = wait_final(saga.pk)
    failed = saga.events.get(kind=EventKind.STEP_FAILED)
    # tests/settings.py lists tests.sagadefs.BadGatewayResponse in SAGAS_SHOWN_EXCEPTIONS.
    assert failed.detail["exception_message"] == "the gateway answered 502 Bad Gateway"


def test_no_operator_page_or_endpoint_answers_500_while_a_step_holds_the_saga(
    saga_db, admin_client, admin_user, tmp_path, monkeypatch
):
    monkeypatch.setattr("sagas.engine.operator.LOCK_WAIT", 0.5)  # each busy answer, sooner
    name = define(
        "held",
        Step("gated", "tests.sagadefs.wait_at_gate", UNDO, retry=FAST, time_limit=300),
        Step("after", RECORD, UNDO, retry=FAST),
    )
    gate = tmp_path / "gate"
    saga, _ = saga_start(name=name, input={"gate": str(gate), "hold": 240})
    wait_for(lambda: Path(f"{gate}.started").exists(), what="the step to start")
    api = APIClient()
    api.force_authenticate(admin_user)
    changelist = "/admin/sagas/saga/"
    detail = f"/admin/sagas/saga/{saga.pk}/change/"
    answers = {}
    started = time.monotonic()
    try:
        answers["admin list"] = admin_client.get(changelist).status_code
        answers["admin detail"] = admin_client.get(detail).status_code
        for action in ("retry_sagas", "compensate_sagas", "resolve_sagas"):
            form = {"action": action, "_selected_action": [str(saga.pk)], "index": "0"}
            page = admin_client.post(changelist, form)
            answers[f"admin {action} confirmation"] = page.status_code
            if page.status_code == 200:
                assert "busy" in page.content.decode()
            answers[f"admin {action}"] = admin_client.post(
                changelist, {**form, "post": "yes"}
            ).status_code
        answers["admin bulk page"] = admin_client.get(reverse("admin:sagas_saga_bulk")).status_code
        answers["api detail"] = api.get(f"/api/sagas/{saga.pk}/").status_code
        for action in ("retry", "compensate"):
            plan = api.get(f"/api/sagas/{saga.pk}/plan/?action={action}")
            answers[f"api plan {action}"] = plan.status_code
            answers[f"api {action}"] = api.post(f"/api/sagas/{saga.pk}/{action}/").status_code
        answers["api plan resolve"] = api.get(
            f"/api/sagas/{saga.pk}/plan/?action=resolve&index=0"
        ).status_code
        answers["api resolve"] = api.post(f"/api/sagas/{saga.pk}/steps/0/resolve/").status_code
        answers["api bulk preview"] = api.post(
            "/api/sagas/bulk/preview/",
            {"action": "compensate", "filter": {"status": "running"}},
            format="json",
        ).status_code
    finally:
        gate.touch()
    assert all(code < 500 for code in answers.values()), answers
    assert answers["api plan compensate"] == 409 and answers["api compensate"] == 409
    assert time.monotonic() - started < 120
    assert wait_final(saga.pk).status == "completed"
