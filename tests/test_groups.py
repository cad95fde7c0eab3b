"""Parallel groups: members run at the same time as tasks of their own, each holding its own
row's lock; the join is the engine's, in PostgreSQL; a member's final failure stops new
members, lets those in flight finish, then compensates the completed members last first and
the stages before the group after them.

Real workers run the members (`saga_db`: two nodes of two processes); the sweeper runs here,
as beat would run it. Every member takes one unit of stock and gives it back when compensated
(tests/groupdefs.py): the stock counts each member's effect and its undoing exactly.
"""

from __future__ import annotations

import itertools
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.utils import timezone

from inventory.models import Product
from sagas import engine, services
from sagas.definitions import Group, SagaDefinition, Step
from sagas.engine import dispatch, sweeper
from sagas.exceptions import DefinitionError
from sagas.models import EventKind, Saga, SagaEvent, SagaMember, SagaStep
from tests.conftest import attempt_in_process, lose_messages, wait_final, wait_for
from tests.factories import ProductFactory
from tests.groupdefs import first, give, take

pytestmark = pytest.mark.django_db(transaction=True)

STOCK = 10


def products(*names: str) -> dict[str, str]:
    return {name: ProductFactory(stock_on_hand=STOCK).sku for name in names}


def stock(sku: str) -> int:
    return Product.objects.get(sku=sku).stock_on_hand


def start(name: str = "group_listed", **input):
    saga, _ = services.saga_start(name=name, input=input)
    return saga


def members(saga) -> dict[str, SagaMember]:
    return {m.name: m for m in SagaMember.objects.filter(saga=saga).order_by("position")}


def status(saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def timeline(saga) -> list[tuple[str, str]]:
    events = SagaEvent.objects.filter(saga=saga).order_by("id")
    return [(e.kind, e.step_name) for e in events]


def compensated_in_order(saga) -> list[str]:
    events = SagaEvent.objects.filter(saga=saga, kind=EventKind.STEP_COMPENSATED).order_by("id")
    return [e.detail.get("member", e.step_name) for e in events if "members" not in e.detail]


def sweep() -> sweeper.SweepReport:
    return sweeper.sweep(stale_after=timedelta(milliseconds=1))


# -- the definition ---------------------------------------------------------------------------


def test_a_group_is_defined_with_steps_and_refuses_what_it_cannot_run():
    with pytest.raises(DefinitionError, match="pivot inside a group"):
        Group("g", members=[Step("a", take, give, pivot=True)])
    with pytest.raises(DefinitionError, match="no members"):
        Group("g")
    with pytest.raises(DefinitionError, match="items and a step"):
        Group("g", step=Step("a", take, give))
    with pytest.raises(DefinitionError, match="duplicate member names"):
        Group("g", members=[Step("a", take, give), Step("a", take, give)])
    with pytest.raises(DefinitionError, match="its last stage is a step"):
        SagaDefinition("ends_in_a_group", [Step("s", first), Group("g", members=[Step("a", take)])])


# -- running ----------------------------------------------------------------------------------


def test_members_run_at_the_same_time_and_the_saga_goes_on_with_their_outputs(saga_db):
    skus = products("a", "b", "c")
    saga = start(skus=skus, behave={"a": 1.5, "b": 1.5, "c": 1.5})

    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "completed"
    assert all(stock(sku) == STOCK - 1 for sku in skus.values())
    done = members(saga)
    assert {m.status for m in done.values()} == {"completed"}
    # At the same time: each member started before the others finished.
    spans = [(m.output["started"], m.output["finished"]) for m in done.values()]
    overlapping = sum(
        1 for i, a in enumerate(spans) for b in spans[i + 1 :] if a[0] < b[1] and b[0] < a[1]
    )
    assert overlapping >= 2, spans
    group = SagaStep.objects.get(saga=saga, name="parallel")
    assert set(group.output) == {"a", "b", "c"}
    assert group.output["a"]["key"] == f"{saga.pk}:parallel:a"
    last = SagaStep.objects.get(saga=saga, name="last")
    assert last.output["saw"]["b"]["sku"] == skus["b"]
    # One completion per member, then the group's, once.
    kinds = timeline(saga)
    assert kinds.count((EventKind.STEP_COMPLETED, "parallel")) == 1
    assert {n for k, n in kinds if k == EventKind.STEP_COMPLETED} >= {
        "parallel.a",
        "parallel.b",
        "parallel.c",
    }


def test_a_concurrency_of_one_runs_the_members_one_after_the_other(saga_db):
    skus = products("a", "b", "c")
    saga = start("group_listed_one_at_a_time", skus=skus, behave={"a": 0.5, "b": 0.5, "c": 0.5})

    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "completed"
    spans = sorted((m.output["started"], m.output["finished"]) for m in members(saga).values())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans


def test_a_group_may_be_the_first_stage(saga_db):
    skus = products("a", "c")
    saga = wait_final(start("group_first", skus=skus).pk)
    assert saga.status == "completed"
    assert [stock(s) for s in skus.values()] == [STOCK - 1, STOCK - 1]


def test_a_map_runs_one_member_per_item_named_by_it_and_outputs_a_list_in_order(saga_db):
    skus = list(products("x", "y", "z").values())
    saga = wait_final(start("group_map", lines=skus).pk)

    assert saga.status == "completed"
    assert [m.name for m in members(saga).values()] == skus
    assert all(stock(sku) == STOCK - 1 for sku in skus)
    output = SagaStep.objects.get(saga=saga, name="lines").output
    assert [o["sku"] for o in output] == skus
    assert output[1]["key"] == f"{saga.pk}:lines:{skus[1]}"


def test_an_empty_map_completes_the_group_at_once(saga_db):
    saga = wait_final(start("group_map", lines=[]).pk)
    assert saga.status == "completed"
    assert SagaStep.objects.get(saga=saga, name="lines").output == []
    assert not SagaMember.objects.filter(saga=saga).exists()


def test_more_items_than_the_maximum_fan_out_pause_the_saga_clearly(saga_db):
    skus = [ProductFactory(stock_on_hand=STOCK).sku for _ in range(6)]
    saga = start("group_map", lines=skus)

    wait_for(lambda: status(saga) == "failed", what="the saga to pause")

    saga.refresh_from_db()
    assert saga.error_code == "group_fan_out_exceeded"
    assert "6 items, more than its maximum of 5" in saga.error_message
    assert not SagaMember.objects.filter(saga=saga).exists()
    assert all(stock(s) == STOCK for s in skus)
    # Its first step is not undone: the pause waits for an operator.
    assert SagaStep.objects.get(saga=saga, name="first").status == "completed"


def test_a_map_tolerates_as_many_failed_items_as_it_says(saga_db):
    skus = list(products("x", "y", "z").values())
    saga = wait_final(start("group_map_tolerant", lines=skus, behave={skus[1]: "decline"}).pk)

    assert saga.status == "completed"
    output = SagaStep.objects.get(saga=saga, name="lines").output
    assert output[1] is None and output[0]["sku"] == skus[0]
    assert [stock(s) for s in skus] == [STOCK - 1, STOCK, STOCK - 1]


def test_one_more_failure_than_tolerated_compensates(saga_db):
    skus = list(products("w", "x", "y", "z").values())
    behave = {skus[1]: "decline", skus[2]: "decline"}
    saga = wait_final(start("group_map_tolerant", lines=skus, behave=behave).pk)

    assert saga.status == "compensated"
    assert [stock(s) for s in skus] == [STOCK] * 4


# -- a member fails --------------------------------------------------------------------------


def test_a_member_failing_lets_those_in_flight_finish_then_undoes_them_last_first(
    saga_db, tmp_path
):
    skus = products("a", "b", "c")
    gate = tmp_path / "gate"
    behave = {"a": "gate", "b": "gate_decline", "c": "gate"}
    saga = start(skus=skus, behave=behave, gate=str(gate))
    for name in "abc":
        wait_for(lambda n=name: Path(f"{gate}.{n}.started").exists(), what=f"{name} to start")
    Path(f"{gate}.b").touch()  # b fails for good while a and c run
    wait_for(lambda: status(saga) == "compensating", what="the saga to turn back")
    Path(f"{gate}.a").touch()
    Path(f"{gate}.c").touch()

    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    assert saga.error_code == "declined"
    assert all(stock(sku) == STOCK for sku in skus.values())
    done = members(saga)
    assert done["a"].status == done["c"].status == "compensated"
    assert done["b"].status == "failed"
    # The members in reverse order, then the stage before the group.
    assert compensated_in_order(saga) == ["c", "a", "first"]
    # Each undone once.
    kinds = timeline(saga)
    assert kinds.count((EventKind.STEP_COMPENSATED, "parallel.a")) == 1
    assert kinds.count((EventKind.STEP_COMPENSATED, "parallel.c")) == 1


def test_a_failure_after_the_group_undoes_every_member_then_the_earlier_stages(saga_db):
    skus = products("a", "b", "c")
    saga = wait_final(start(skus=skus, last="decline").pk)

    assert saga.status == "compensated"
    assert compensated_in_order(saga) == ["c", "b", "a", "first"]
    assert all(stock(sku) == STOCK for sku in skus.values())
    assert SagaStep.objects.get(saga=saga, name="parallel").status == "compensated"


def test_no_member_starts_after_the_saga_turned_back(saga_db):
    skus = products("a", "b", "c")
    saga = wait_final(start("group_listed_one_at_a_time", skus=skus, behave={"a": "decline"}).pk)

    assert saga.status == "compensated"
    done = members(saga)
    assert done["a"].status == "failed"
    assert done["b"].status == done["c"].status == "pending"
    assert done["b"].attempts == done["c"].attempts == 0
    assert all(stock(sku) == STOCK for sku in skus.values())


# -- operators ---------------------------------------------------------------------------------


def paused_at_b(tmp_path: Path) -> tuple[Saga, dict[str, str], Path]:
    """A saga paused in its group: b's service is down (while the file `stuck` exists) and its
    attempts ran out; a and c completed. Returns it, the members' products and that file."""
    skus = products("a", "b", "c")
    stuck = tmp_path / "down"
    stuck.touch()
    saga = start(skus=skus, behave={"b": "stuck"}, stuck=str(stuck))
    wait_for(lambda: status(saga) == "failed", what="the saga to pause")
    wait_for(
        lambda: members(saga)["a"].status == members(saga)["c"].status == "completed",
        what="the other members to finish",
    )
    return saga, skus, stuck


def test_a_retry_of_a_saga_paused_in_a_group_runs_only_the_members_that_did_not_complete(
    saga_db, tmp_path
):
    saga, skus, stuck = paused_at_b(tmp_path)
    plan = services.saga_plan(saga_id=saga.pk, action="retry")
    assert plan.run == ("parallel.b", "last")

    stuck.unlink()
    services.saga_retry(saga_id=saga.pk, actor="ops")
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    done = members(saga)
    assert done["a"].attempts == done["c"].attempts == 1
    assert done["b"].output["attempt"] == 1  # a new budget
    assert all(stock(sku) == STOCK - 1 for sku in skus.values())


def test_an_abort_while_members_run_waits_for_them_then_undoes_what_completed(saga_db, tmp_path):
    skus = products("a", "b", "c")
    gate = tmp_path / "gate"
    saga = start(skus=skus, behave={"a": "gate", "b": "gate"}, gate=str(gate))
    wait_for(lambda: Path(f"{gate}.a.started").exists(), what="member a to start")
    wait_for(lambda: Path(f"{gate}.b.started").exists(), what="member b to start")
    wait_for(lambda: members(saga)["c"].status == "completed", what="member c to complete")

    plan = services.saga_plan(saga_id=saga.pk, action="compensate")
    assert plan.undo == (
        "parallel.c",
        "parallel.b (if it completes)",
        "parallel.a (if it completes)",
        "first",
    )
    services.saga_compensate(saga_id=saga.pk, actor="ops")
    Path(f"{gate}.a").touch()
    Path(f"{gate}.b").touch()
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    done = members(saga)
    assert {m.status for m in done.values()} == {"compensated"}
    assert compensated_in_order(saga) == ["c", "b", "a", "first"]
    assert all(stock(sku) == STOCK for sku in skus.values())


def test_a_deadline_passing_while_members_run_compensates_them(saga_db, tmp_path):
    skus = products("a", "b", "c")
    gate = tmp_path / "gate"
    saga = start("group_with_deadline", skus=skus, behave={"b": "gate"}, gate=str(gate))
    wait_for(lambda: Path(f"{gate}.b.started").exists(), what="member b to start")
    wait_for(lambda: Saga.objects.get(pk=saga.pk).deadline_at <= timezone.now(), timeout=5)

    report = sweeper.sweep(stale_after=timedelta(minutes=1))
    assert str(saga.pk) in report.deadline_compensated
    Path(f"{gate}.b").touch()
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    assert saga.error_code == "deadline_passed"
    assert all(stock(sku) == STOCK for sku in skus.values())


# -- lost, repeated and racing messages --------------------------------------------------------


def test_a_duplicate_member_message_runs_the_member_once(saga_db):
    skus = products("a", "b", "c")
    saga = start(skus=skus, behave={"a": 0.5, "b": 0.5, "c": 0.5})
    epoch = Saga.objects.get(pk=saga.pk).epoch
    wait_for(lambda: members(saga), what="the members to be made")
    # The same message again, twice, while the first may still run.
    for _ in range(2):
        dispatch.send_members(str(saga.pk), epoch, 1, [(0, 60), (1, 60), (2, 60)], 0.0)

    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert all(stock(sku) == STOCK - 1 for sku in skus.values())
    assert all(m.attempts == 1 for m in members(saga).values())


def run_here(saga, member: int) -> str:
    """One attempt of the group's `member` (stage 1), run here as a worker would."""
    return engine.step_attempt(str(saga.pk), 1, epoch=0, member=member).kind


def test_lost_member_messages_are_sent_again_by_the_sweeper(saga_db, monkeypatch):
    skus = products("a", "b", "c")
    lose_messages(monkeypatch)
    saga = start(skus=skus)
    assert attempt_in_process(saga.pk, 0) == "done"  # begins the group; its members' are lost
    assert {m.status for m in members(saga).values()} == {"running"}
    assert run_here(saga, 0) == "done"
    monkeypatch.undo()

    sweep()
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert all(stock(sku) == STOCK - 1 for sku in skus.values())
    assert members(saga)["a"].attempts == 1


def test_the_send_after_the_last_members_commit_lost_is_made_up_by_the_sweeper(
    saga_db, monkeypatch
):
    skus = products("a", "b", "c")
    lose_messages(monkeypatch)
    saga = start(skus=skus)
    attempt_in_process(saga.pk, 0)
    assert [run_here(saga, i) for i in range(3)] == ["done"] * 3  # the last joins: lost
    assert SagaStep.objects.get(saga=saga, name="parallel").status == "completed"
    assert status(saga) == "running"
    monkeypatch.undo()

    sweep()
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert SagaStep.objects.get(saga=saga, name="last").attempts == 1


def test_the_members_sent_by_a_recovery_while_others_run_join_once(saga_db):
    skus = products("a", "b", "c")
    saga = start(skus=skus, behave={"a": 1.0, "b": 1.0, "c": 1.0})
    wait_for(lambda: members(saga), what="the members to be made")
    for _ in range(3):
        sweep()  # sends every member not completed again, and raises the epoch

    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert all(stock(sku) == STOCK - 1 for sku in skus.values())
    kinds = timeline(saga)
    assert kinds.count((EventKind.STEP_COMPLETED, "parallel")) == 1
    assert kinds.count((EventKind.STEP_COMPLETED, "last")) == 1


def test_two_members_completing_together_join_once(saga_db, tmp_path):
    """The last two members commit at the same moment: one of them completes the group."""
    skus = products("a", "b", "c")
    gate = tmp_path / "gate"
    saga = start(skus=skus, behave={"a": "gate", "b": "gate"}, gate=str(gate))
    wait_for(lambda: Path(f"{gate}.a.started").exists(), what="member a to start")
    wait_for(lambda: Path(f"{gate}.b.started").exists(), what="member b to start")
    wait_for(lambda: members(saga)["c"].status == "completed", what="member c")
    opened = [threading.Thread(target=Path(f"{gate}.{m}").touch) for m in "ab"]
    for thread in opened:
        thread.start()

    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    kinds = timeline(saga)
    assert kinds.count((EventKind.STEP_COMPLETED, "parallel")) == 1
    assert kinds.count((EventKind.STEP_COMPLETED, "last")) == 1


def test_a_member_holds_its_own_row_not_the_sagas_while_it_runs(saga_db, tmp_path):
    """An operator's preview, another member's record and a signal need the saga's lock: a
    member's attempt does not hold it."""
    skus = products("a", "b", "c")
    gate = tmp_path / "gate"
    saga = start(skus=skus, behave={"a": "gate"}, gate=str(gate))
    wait_for(lambda: Path(f"{gate}.a.started").exists(), what="member a to start")
    wait_for(lambda: members(saga)["c"].status == "completed", what="member c to complete")

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = '500ms'")
        cursor.execute("SELECT 1 FROM sagas_saga WHERE id = %s FOR NO KEY UPDATE", [saga.pk])
    Path(f"{gate}.a").touch()
    assert wait_final(saga.pk).status == "completed"


# -- the admin and the API show the members ----------------------------------------------------


def test_the_api_and_the_admin_show_each_member(saga_db, admin_client):
    from django.urls import reverse

    skus = products("a", "b", "c")
    saga = wait_final(start(skus=skus, behave={"b": "decline"}).pk)
    assert saga.status == "compensated"

    body = admin_client.get(f"/api/sagas/{saga.pk}/").json()
    group = body["steps"][1]
    assert group["kind"] == "group" and group["name"] == "parallel"
    statuses = [(m["name"], m["status"]) for m in group["members"]]
    assert [name for name, _ in statuses] == ["a", "b", "c"]
    assert statuses[1] == ("b", "failed")
    # The others completed before b failed (then undone), or never started.
    assert {statuses[0][1], statuses[2][1]} <= {"compensated", "pending"}
    assert group["members"][1]["error"] == {"code": "declined", "message": "Declined."}
    assert body["steps"][0]["members"] is None

    page = admin_client.get(reverse("admin:sagas_saga_change", args=[saga.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "Group members" in html
    assert 'class="saga-node-members"' in html
    assert html.count('class="saga-member ') == 3
    listing = admin_client.get(reverse("admin:sagas_saga_changelist")).content.decode()
    # Its progress counts the members: first, a, b, c, last.
    undone = 1 + sum(1 for _, status in statuses if status == "compensated")
    assert f"0 of 5, {undone} undone" in listing


def test_an_operator_marks_a_failed_member_as_done_and_the_group_goes_on(
    saga_db, admin_client, tmp_path
):
    saga, skus, _ = paused_at_b(tmp_path)
    plan = admin_client.get(f"/api/sagas/{saga.pk}/plan/?action=skip&index=1&member=1").json()
    assert plan["allowed"] is True
    assert plan["run"] == ["last"]
    refused = admin_client.get(f"/api/sagas/{saga.pk}/plan/?action=skip&index=1&member=0")
    assert refused.json()["allowed"] is False  # a completed member

    done = {"sku": skus["b"], "by_hand": True}
    response = admin_client.post(
        f"/api/sagas/{saga.pk}/steps/1/skip/",
        {"output": done, "note": "reserved by phone", "member": 1},
        content_type="application/json",
    )
    assert response.status_code == 202, response.content  # accepted: the saga goes on
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert members(saga)["b"].output == done
    assert SagaStep.objects.get(saga=saga, name="last").output["saw"]["b"] == done
    skipped = SagaEvent.objects.get(saga=saga, kind=EventKind.OPERATOR_SKIP)
    assert (skipped.step_name, skipped.detail["member"]) == ("parallel.b", "b")
    assert skipped.detail["note"] == "reserved by phone"


def test_the_admin_marks_a_failed_member_as_done_after_a_preview(saga_db, admin_client, tmp_path):
    """The saga page offers each failed member that may be marked as done; its page takes the
    output and a note, previews what runs next, and marks it once per confirmation. Staff
    without the permission get neither the button nor the page."""
    from django.urls import reverse

    from tests.test_admin_waits import logged_in, staff_with

    saga, _, _ = paused_at_b(tmp_path)
    url = reverse("admin:sagas_saga_skip_member", args=[saga.pk, 1, 1])
    page = admin_client.get(reverse("admin:sagas_saga_change", args=[saga.pk]))
    assert page.context["saga_skip_members"] == [("parallel.b", url)]
    assert "Mark parallel.b as done&hellip;" in page.content.decode()
    viewer = logged_in(staff_with("view_saga"))
    viewer_page = viewer.get(reverse("admin:sagas_saga_change", args=[saga.pk]))
    assert not viewer_page.context.get("saga_skip_members")
    assert viewer.get(url).status_code in (403, 404)

    form = admin_client.get(url)
    assert "The member <strong>parallel.b</strong> (failed)" in form.content.decode()
    output = '{"sku": "by-phone"}'
    preview = admin_client.post(url, {"output": output, "note": "by phone", "_preview": "1"})
    html = preview.content.decode()
    assert "<code>parallel.b</code>" in html and "Yes, mark it as done" in html
    assert status(saga) == "failed"  # a preview changes nothing
    once = preview.context["once"]
    confirmation = {"output": output, "note": "by phone", "post": "yes", "_once": once}
    assert admin_client.post(url, confirmation).status_code == 302
    assert admin_client.post(url, confirmation).status_code == 302  # sent twice: acts once

    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    assert members(saga)["b"].output == {"sku": "by-phone"}
    [skipped] = SagaEvent.objects.filter(saga=saga, kind=EventKind.OPERATOR_SKIP)
    assert (skipped.step_name, skipped.detail["note"]) == ("parallel.b", "by phone")


def test_a_start_whose_group_could_not_begin_after_the_commit_is_left_to_the_sweeper(
    saga_db, monkeypatch, caplog
):
    """The group of a saga's first stage begins once its start commits, in a transaction of
    its own; that failing (the database, at that moment) is logged, not raised to the caller
    of a start that committed, and the sweeper begins it later."""
    skus = products("a", "c")

    def unavailable(saga_id):
        raise RuntimeError("the database went away")

    monkeypatch.setattr("sagas.engine.waits.begin", unavailable)
    saga = start("group_first", skus=skus)  # no error: the start committed
    assert status(saga) == "pending"
    assert "the database went away" in caplog.text or "RuntimeError" in caplog.text
    monkeypatch.undo()

    sweep()
    assert wait_final(saga.pk).status == "completed"
