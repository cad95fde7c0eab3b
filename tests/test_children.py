"""Child sagas: a stage starts another registered saga in its own transaction and waits for it
holding no worker; the child completed, the parent goes on with its outputs; compensated, the
stage fails with its error. A completed child is compensated when its parent compensates (the
only way a completed saga changes), and a parent's abort or deadline compensates a child in
flight.

Real workers run both sagas (`saga_db`); the sweeper runs here, as beat would run it. The
parent and its child each take one unit of stock and give it back when compensated
(tests/childdefs.py).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.core import checks
from django.utils import timezone

from inventory.models import Product
from sagas import retention, services
from sagas.definitions import Child, SagaDefinition, Step, register
from sagas.engine import sweeper
from sagas.exceptions import DefinitionError
from sagas.models import EventKind, Saga, SagaEvent, SagaStep
from tests.childdefs import take_parent, undo
from tests.conftest import attempt_in_process, lose_messages, wait_final, wait_for
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db(transaction=True)

STOCK = 10


def start(name: str = "parent_order", **input):
    skus = {"sku": ProductFactory(stock_on_hand=STOCK).sku}
    skus["child_sku"] = ProductFactory(stock_on_hand=STOCK).sku
    saga, _ = services.saga_start(name=name, input={**skus, **input})
    return saga


def stock(saga, key: str) -> int:
    return Product.objects.get(sku=saga.input[key]).stock_on_hand


def child_of(saga) -> Saga:
    return wait_for(
        lambda: Saga.objects.filter(parent=saga).order_by("-created_at").first(),
        what="the child to start",
    )


def status(saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def kinds(saga) -> list[str]:
    return list(SagaEvent.objects.filter(saga=saga).order_by("id").values_list("kind", flat=True))


def sweep() -> sweeper.SweepReport:
    return sweeper.sweep(stale_after=timedelta(minutes=1))


# -- the definition ---------------------------------------------------------------------------


def test_a_child_must_be_registered_without_a_cycle_and_not_last():
    with pytest.raises(DefinitionError, match="its last stage is a step"):
        SagaDefinition("ends_with_a_child", [Step("a", take_parent), Child("c", saga="x")])
    with pytest.raises(DefinitionError, match="is its own child"):
        SagaDefinition("loop", [Child("c", saga="loop"), Step("a", take_parent)])
    register(SagaDefinition("ping", [Child("c", saga="pong"), Step("a", take_parent, undo)]))
    found = [m for m in checks.run_checks() if m.id == "sagas.E005"]
    assert any("'pong', which is not registered" in m.msg for m in found)
    register(SagaDefinition("pong", [Child("c", saga="ping"), Step("a", take_parent, undo)]))
    found = [m for m in checks.run_checks() if m.id == "sagas.E005"]
    assert any("cycle (ping -> pong -> ping)" in m.msg for m in found)


# -- forward ------------------------------------------------------------------------------------


def test_the_parent_goes_on_with_its_completed_childs_outputs(saga_db, admin_client):
    saga = start()
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    child = Saga.objects.get(parent=saga)
    assert (child.name, child.status, child.parent_stage) == ("child_shipping", "completed", 1)
    stage = SagaStep.objects.get(saga=saga, name="shipping")
    assert stage.output["label"] == {"label": "L-dhl"}
    assert SagaStep.objects.get(saga=saga, name="last").output == {"shipped_with": "L-dhl"}
    assert stock(saga, "sku") == stock(saga, "child_sku") == STOCK - 1
    assert EventKind.CHILD_STARTED in kinds(saga)

    body = admin_client.get(f"/api/sagas/{saga.pk}/").json()
    assert body["parent"] is None
    assert [(c["id"], c["stage"], c["status"]) for c in body["children"]] == [
        (str(child.pk), 1, "completed")
    ]
    assert body["steps"][1]["kind"] == "child"
    assert admin_client.get(f"/api/sagas/{child.pk}/").json()["parent"] == str(saga.pk)
    page = admin_client.get(f"/admin/sagas/saga/{saga.pk}/change/").content.decode()
    assert f"/admin/sagas/saga/{child.pk}/change/" in page
    child_page = admin_client.get(f"/admin/sagas/saga/{child.pk}/change/").content.decode()
    assert f"/admin/sagas/saga/{saga.pk}/change/" in child_page


def test_a_compensated_child_fails_the_stage_and_the_parent_compensates(saga_db):
    saga = wait_final(start(child="decline").pk)

    assert saga.status == "compensated"
    assert saga.error_code == "no_carrier"
    child = Saga.objects.get(parent=saga)
    assert child.status == "compensated"
    stage = SagaStep.objects.get(saga=saga, name="shipping")
    assert (stage.status, stage.error_code) == ("failed", "no_carrier")
    assert stock(saga, "sku") == stock(saga, "child_sku") == STOCK


def test_a_completed_child_is_compensated_when_its_parent_compensates(saga_db):
    saga = wait_final(start(last="decline").pk, timeout=40)

    assert saga.status == "compensated"
    child = Saga.objects.get(parent=saga)
    assert child.status == "compensated"
    # The child's own timeline: it completed, then its parent turned it back.
    child_kinds = kinds(child)
    assert child_kinds.index(EventKind.SAGA_COMPLETED) < child_kinds.index(
        EventKind.COMPENSATION_STARTED
    )
    started = SagaEvent.objects.get(saga=child, kind=EventKind.COMPENSATION_STARTED)
    assert started.detail["parent"] == str(saga.pk)
    assert child_kinds.count(EventKind.STEP_COMPENSATED) == 2  # each of its steps, once
    # The parent's order (its last step failed, so undid nothing): the child, then the step
    # before it.
    undone = SagaEvent.objects.filter(saga=saga, kind=EventKind.STEP_COMPENSATED).order_by("id")
    assert [e.step_name for e in undone] == ["shipping", "take"]
    assert stock(saga, "sku") == stock(saga, "child_sku") == STOCK


def test_an_abort_of_the_parent_compensates_its_child_in_flight(saga_db, tmp_path):
    gate = tmp_path / "gate"
    saga = start(child="gate", gate=str(gate))
    wait_for(lambda: Path(f"{gate}.started").exists(), what="the child's step to start")
    assert status(saga) == "waiting"

    plan = services.saga_plan(saga_id=saga.pk, action="compensate")
    assert plan.undo == ("shipping", "take")
    services.saga_compensate(saga_id=saga.pk, actor="ops")
    gate.touch()
    saga = wait_final(saga.pk, timeout=40)

    assert saga.status == "compensated"
    child = Saga.objects.get(parent=saga)
    assert child.status == "compensated"
    assert stock(saga, "sku") == stock(saga, "child_sku") == STOCK


def test_a_parents_deadline_passing_while_its_child_runs_compensates_both(saga_db, tmp_path):
    gate = tmp_path / "gate"
    saga = start("parent_with_deadline", child="gate", gate=str(gate))
    wait_for(lambda: Path(f"{gate}.started").exists(), what="the child's step to start")
    wait_for(lambda: Saga.objects.get(pk=saga.pk).deadline_at <= timezone.now(), timeout=5)

    assert str(saga.pk) in sweep().deadline_compensated
    gate.touch()
    saga = wait_final(saga.pk, timeout=40)

    assert (saga.status, saga.error_code) == ("compensated", "deadline_passed")
    assert Saga.objects.get(parent=saga).status == "compensated"
    assert stock(saga, "sku") == stock(saga, "child_sku") == STOCK


def test_a_paused_child_keeps_its_parent_waiting_until_an_operator_settles_it(saga_db, tmp_path):
    stuck = tmp_path / "down"
    stuck.touch()
    saga = start(child="stuck", stuck=str(stuck))
    child = child_of(saga)
    wait_for(lambda: status(child) == "failed", what="the child to pause")
    assert status(saga) == "waiting"

    stuck.unlink()
    services.saga_retry(saga_id=child.pk, actor="ops")
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert stock(saga, "child_sku") == STOCK - 1


def test_a_lost_message_of_the_childs_end_is_made_up_by_the_sweeper(saga_db, monkeypatch):
    monkeypatch.setattr("sagas.engine.dispatch.send_child_ended", lambda *args: None)
    lose_messages(monkeypatch)
    saga = start()
    assert attempt_in_process(saga.pk, 0) == "done"  # starts the child; its chain is lost
    child = Saga.objects.get(parent=saga)
    assert [attempt_in_process(child.pk, i) for i in range(2)] == ["done", "done"]
    assert status(child) == "completed"
    assert status(saga) == "waiting"  # its end's message was lost
    monkeypatch.undo()

    assert sweep().children_ended == 1
    saga = wait_final(saga.pk)

    assert saga.status == "completed"


def test_retention_keeps_a_finished_child_while_its_parent_is_unfinished(saga_db, tmp_path):
    stuck = tmp_path / "down"
    saga = start(last="decline", child="stuck", stuck=str(stuck))
    child = child_of(saga)
    wait_for(lambda: status(child) == "completed", what="the child to complete")
    # The parent is still compensating or about to: say it paused for an operator.
    wait_final(saga.pk, timeout=40)
    Saga.objects.filter(pk=saga.pk).update(status="failed", finished_at=None)
    Saga.objects.filter(pk=child.pk).update(finished_at=timezone.now() - timedelta(days=60))

    report = retention.purge(older_than=timedelta(days=30), batch_size=100)

    assert report.total == 0
    assert Saga.objects.filter(pk=child.pk).exists()


def test_a_childs_compensation_that_stops_stops_its_parents_until_both_are_retried(
    saga_db, tmp_path
):
    stuck = tmp_path / "desk-down"
    stuck.touch()
    saga = start("parent_fragile", last="decline", undo_stuck=str(stuck))
    child = child_of(saga)
    wait_for(lambda: status(saga) == "failed", timeout=40, what="the parent to stop")

    saga.refresh_from_db()
    stage = SagaStep.objects.get(saga=saga, name="shipping")
    assert (stage.status, stage.error_code) == ("compensation_failed", "child_compensation_failed")
    assert (status(child), Saga.objects.get(pk=child.pk).error_code) == (
        "failed",
        "compensation_failed",
    )
    assert SagaStep.objects.get(saga=saga, name="take").status == "completed"  # not yet undone

    stuck.unlink()
    services.saga_retry(saga_id=child.pk, actor="ops")
    wait_for(lambda: status(child) == "compensated", what="the child to be compensated")
    services.saga_retry(saga_id=saga.pk, actor="ops")
    saga = wait_final(saga.pk, timeout=40)

    assert saga.status == "compensated"
    assert stock(saga, "sku") == stock(saga, "child_sku") == STOCK


def test_a_retry_of_a_parent_paused_at_its_child_stage_starts_a_new_child(saga_db):
    from sagas.models import SagaStep as Stage

    saga = start()
    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    # Say the child could not begin (a deploy that lost its definition), and the parent paused.
    Saga.objects.filter(pk=saga.pk).update(status="failed", finished_at=None, current_step=1)
    Stage.objects.filter(saga=saga, name="shipping").update(status="failed")
    Stage.objects.filter(saga=saga, name="last").update(status="pending", output=None)

    services.saga_retry(saga_id=saga.pk, actor="ops")
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    children = Saga.objects.filter(parent=saga).order_by("created_at")
    assert [c.idempotency_key.rsplit(":", 1)[-1] for c in children] == ["1", "2"]
