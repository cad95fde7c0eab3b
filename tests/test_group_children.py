"""A group's child members: a member that starts another registered saga, and waits for it
holding no worker. The child completed: the member completes with its outputs; compensated:
the member fails for good with its error, and its group with it (beyond a map's tolerance).
When the group compensates, a completed child is compensated, and one in flight is aborted at
once, then compensated in its member's turn.

Real workers run the sagas (`saga_db`); the sweeper runs here, as beat would. Every effect
takes a unit of stock and its compensation gives it back (tests/childdefs.py): `take` of
`sku`, the member `reserve` of `member_sku`, the child's `book` of `child_sku`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from inventory.models import Product
from sagas import services
from sagas.definitions import Child, Group, SagaDefinition, Step
from sagas.engine import groups, sweeper
from sagas.exceptions import DefinitionError
from sagas.models import EventKind, Saga, SagaEvent, SagaMember, SagaStep
from sagas.testing import FailureMatrix
from tests.childdefs import reserve, take_parent, undo
from tests.conftest import attempt_in_process, lose_messages, wait_final, wait_for
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db(transaction=True)

STOCK = 10


def start(name: str = "parent_group_child", **input):
    skus = {key: ProductFactory(stock_on_hand=STOCK).sku for key in ("sku", "member_sku")}
    skus["child_sku"] = ProductFactory(stock_on_hand=STOCK).sku
    saga, _ = services.saga_start(name=name, input={**skus, **input})
    return saga


def stock(saga) -> tuple[int, int, int]:
    """What `take`, `reserve` and the children hold: 0 each when all is undone."""
    keys = ("sku", "member_sku", "child_sku")
    return tuple(STOCK - Product.objects.get(sku=saga.input[k]).stock_on_hand for k in keys)


def members(saga) -> dict[str, str]:
    return dict(SagaMember.objects.filter(saga=saga).values_list("name", "status"))


def status(saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def undone(saga) -> list[str]:
    events = SagaEvent.objects.filter(saga=saga, kind=EventKind.STEP_COMPENSATED)
    return [e.step_name for e in events.order_by("id") if e.step_name != "fulfil"]


def test_a_group_takes_children_as_members_and_a_map_over_children():
    group = Group("g", members=[Step("a", reserve, undo), Child("c", saga="child_shipping")])
    assert [type(m).__name__ for m in group.members] == ["Step", "Child"]
    assert group.snapshot()["members"][1]["kind"] == "child"
    with pytest.raises(DefinitionError, match="steps or children"):
        Group("g", members=["not a stage"])  # type: ignore[list-item]
    with pytest.raises(DefinitionError, match="is its own child"):
        SagaDefinition(
            "selfish",
            [Group("g", members=[Child("c", saga="selfish")]), Step("a", take_parent, undo)],
        )


def test_a_child_member_completes_with_its_childs_outputs(saga_db, admin_client):
    saga = wait_final(start().pk)

    assert saga.status == "completed"
    child = Saga.objects.get(parent=saga)
    assert (child.status, child.parent_stage, child.parent_member) == ("completed", 1, 1)
    assert members(saga) == {"reserve": "completed", "ship": "completed"}
    group = SagaStep.objects.get(saga=saga, name="fulfil")
    assert group.output["ship"]["label"] == {"label": "L-dhl"}
    assert SagaStep.objects.get(saga=saga, name="last").output == {"shipped_with": "L-dhl"}
    assert stock(saga) == (1, 1, 1)
    started = SagaEvent.objects.get(saga=saga, kind=EventKind.CHILD_STARTED)
    assert (started.step_name, started.detail["child"]) == ("fulfil.ship", str(child.pk))

    body = admin_client.get(f"/api/sagas/{saga.pk}/").json()
    assert [(c["id"], c["stage"], c["member"]) for c in body["children"]] == [(str(child.pk), 1, 1)]
    page = admin_client.get(f"/admin/sagas/saga/{saga.pk}/change/").content.decode()
    assert f"/admin/sagas/saga/{child.pk}/change/" in page
    child_page = admin_client.get(f"/admin/sagas/saga/{child.pk}/change/").content.decode()
    assert "its member fulfil.ship" in child_page


def test_a_completed_child_member_is_compensated_when_a_later_step_fails(saga_db):
    saga = wait_final(start(last="decline").pk, timeout=40)

    assert (saga.status, saga.error_code) == ("compensated", "declined_last")
    child = Saga.objects.get(parent=saga)
    assert child.status == "compensated"
    assert SagaEvent.objects.get(saga=child, kind=EventKind.COMPENSATION_STARTED).detail[
        "parent"
    ] == str(saga.pk)
    # Reverse definition order: the child member, then the step member, then the step before.
    assert undone(saga) == ["fulfil.ship", "fulfil.reserve", "take"]
    assert stock(saga) == (0, 0, 0)


def test_a_failed_step_member_compensates_its_groups_completed_child(saga_db):
    saga = wait_final(start("parent_group_child_together", reserve="decline").pk, timeout=40)

    assert (saga.status, saga.error_code) == ("compensated", "out_of_stock")
    assert Saga.objects.get(parent=saga).status == "compensated"
    assert members(saga) == {"reserve": "failed", "ship": "compensated"}
    assert stock(saga) == (0, 0, 0)


def test_a_compensated_child_fails_its_member_and_the_group(saga_db):
    saga = wait_final(start(child="decline").pk, timeout=40)

    assert (saga.status, saga.error_code) == ("compensated", "no_carrier")
    assert Saga.objects.get(parent=saga).status == "compensated"
    ship = SagaMember.objects.get(saga=saga, name="ship")
    assert (ship.status, ship.error_code) == ("failed", "no_carrier")
    assert members(saga)["reserve"] == "compensated"
    assert undone(saga) == ["fulfil.reserve", "take"]
    assert stock(saga) == (0, 0, 0)


def test_a_member_failing_while_its_sibling_child_runs_aborts_that_child(saga_db, tmp_path):
    gate = tmp_path / "gate"
    saga = start(reserve="after_child_started", child="gate", gate=str(gate))
    child = wait_for(lambda: Saga.objects.filter(parent=saga).first(), what="the child")
    wait_for(lambda: status(saga) == "compensating", what="the member's failure")
    gate.touch()  # the child's step, held so far, ends: the child is then aborted
    saga = wait_final(saga.pk, timeout=40)

    assert saga.status == "compensated"
    child.refresh_from_db()
    # Aborted in flight (its step released it before it completed), or, its step having held
    # it until the child completed, turned back completed: compensated by its parent either way.
    assert child.status == "compensated"
    assert child.error_code in ("parent_compensating", "")
    started = SagaEvent.objects.get(saga=child, kind=EventKind.COMPENSATION_STARTED)
    assert started.detail["parent"] == str(saga.pk)
    assert stock(saga) == (0, 0, 0)


def test_an_abort_of_the_parent_compensates_its_child_member_in_flight(saga_db, tmp_path):
    gate = tmp_path / "gate"
    saga = start(child="gate", gate=str(gate))
    wait_for(lambda: Path(f"{gate}.started").exists(), what="the child's step to start")
    wait_for(lambda: members(saga)["reserve"] == "completed", what="the step member")
    assert status(saga) == "running"

    plan = services.saga_plan(saga_id=saga.pk, action="compensate")
    assert plan.undo == ("fulfil.ship", "fulfil.reserve", "take")
    services.saga_compensate(saga_id=saga.pk, actor="ops")
    gate.touch()
    saga = wait_final(saga.pk, timeout=40)

    assert saga.status == "compensated"
    assert Saga.objects.get(parent=saga).status == "compensated"
    assert stock(saga) == (0, 0, 0)


def test_a_parent_waiting_for_its_busy_child_to_turn_back_is_not_stalled(saga_db, tmp_path):
    gate = tmp_path / "gate"
    saga = start(child="gate", gate=str(gate))
    wait_for(lambda: Path(f"{gate}.started").exists(), what="the child's step to start")
    services.saga_compensate(saga_id=saga.pk, actor="ops")
    # The group settled; the child's step holds the child, so its abort waits for that step.
    wait_for(lambda: members(saga)["ship"] == "compensating", what="the group to settle")
    assert Saga.objects.get(parent=saga).status == "running"

    report = sweeper.sweep(stale_after=timedelta(0))

    assert str(saga.pk) not in report.recovered
    assert Saga.objects.get(pk=saga.pk).recovery_attempts == 0
    gate.touch()
    saga = wait_final(saga.pk, timeout=40)
    assert saga.status == "compensated"
    assert Saga.objects.get(parent=saga).status == "compensated"
    assert stock(saga) == (0, 0, 0)


def test_a_group_whose_child_member_runs_cannot_be_skipped(saga_db, tmp_path):
    gate, stuck = tmp_path / "gate", tmp_path / "stuck"
    stuck.touch()
    saga = start(
        "parent_group_child_pausing", child="gate", gate=str(gate), reserve_stuck=str(stuck)
    )
    wait_for(lambda: status(saga) == "failed", what="reserve to pause the saga")
    assert members(saga) == {"reserve": "failed", "ship": "running"}

    plan = services.saga_plan(saga_id=saga.pk, action="skip", index=1)
    assert not plan.allowed
    assert "fulfil.ship" in plan.reason
    skip_member = services.saga_plan(saga_id=saga.pk, action="skip", index=1, member=0)
    assert skip_member.allowed  # the failed member can be: the group then waits for the child

    services.saga_skip(saga_id=saga.pk, index=1, member=0, output={"by": "hand"}, actor="ops")
    gate.touch()
    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    assert members(saga) == {"reserve": "completed", "ship": "completed"}


def test_a_lost_message_of_a_child_members_end_is_made_up_by_the_sweeper(saga_db, monkeypatch):
    monkeypatch.setattr("sagas.engine.dispatch.send_child_ended", lambda *args: None)
    lose_messages(monkeypatch)  # the parent's and the child's run here, as a worker would
    saga = start()
    assert attempt_in_process(saga.pk, 0) == "done"  # begins the group: starts the child
    child = Saga.objects.get(parent=saga)
    epoch = Saga.objects.values_list("epoch", flat=True).get(pk=saga.pk)
    assert groups.member_attempt(str(saga.pk), 1, 0, epoch=epoch).kind == "done"
    # Waiting for its child in flight is no stall: nothing is sent again, nothing counted.
    report = sweeper.sweep(stale_after=timedelta(0))
    assert (report.recovered, Saga.objects.get(pk=saga.pk).recovery_attempts) == ([], 0)
    assert [attempt_in_process(child.pk, i) for i in range(2)] == ["done", "done"]
    assert members(saga) == {"reserve": "completed", "ship": "running"}  # its end's message lost
    monkeypatch.undo()

    assert sweeper.sweep(stale_after=timedelta(minutes=1)).children_ended == 1
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert members(saga) == {"reserve": "completed", "ship": "completed"}


def test_a_child_member_that_cannot_begin_pauses_and_a_retry_starts_it(saga_db, tmp_path):
    broken = tmp_path / "broken"
    broken.touch()
    saga = start("parent_group_child_broken", broken=str(broken))
    wait_for(lambda: status(saga) == "failed", what="the saga to pause")
    saga.refresh_from_db()
    assert saga.error_code == "child_not_begun"
    assert "KeyError" in saga.error_message and "Traceback" not in saga.error_message
    assert not Saga.objects.filter(parent=saga).exists()

    broken.unlink()  # the fix, deployed
    services.saga_retry(saga_id=saga.pk, actor="ops")
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert Saga.objects.get(parent=saga).status == "completed"
    assert stock(saga) == (1, 1, 1)


def test_a_map_over_children_compensates_the_completed_ones_when_one_fails(saga_db):
    saga = wait_final(start("parent_map_children_0", parcels=[1, 2, 3], bad_parcel=2).pk, 60)

    assert (saga.status, saga.error_code) == ("compensated", "no_carrier")
    children = Saga.objects.filter(parent=saga).order_by("parent_member")
    assert [(c.parent_member, c.status) for c in children] == [
        (0, "compensated"),
        (1, "compensated"),
        (2, "compensated"),
    ]
    assert stock(saga)[2] == 0


def test_a_map_over_children_tolerates_a_failed_child(saga_db):
    saga = wait_final(start("parent_map_children_1", parcels=[1, 2, 3], bad_parcel=2).pk, 60)

    assert saga.status == "completed"
    assert SagaStep.objects.get(saga=saga, name="last").output == {
        "labels": ["L-dhl", None, "L-dhl"]
    }
    assert members(saga) == {"1": "completed", "2": "failed", "3": "completed"}
    assert stock(saga)[2] == 2


# -- the failure matrix -------------------------------------------------------------------------


def group_child_input() -> dict:
    skus = {key: ProductFactory(stock_on_hand=STOCK).sku for key in ("sku", "member_sku")}
    return {**skus, "child_sku": ProductFactory(stock_on_hand=STOCK).sku}


def every_unit_back_or_held(saga: Saga) -> None:
    """Each product is out of stock by one exactly while what took it holds it."""
    held = ("completed", "compensating", "compensation_failed")
    holders = {
        "sku": SagaStep.objects.get(saga=saga, name="take").status,
        "member_sku": SagaMember.objects.filter(saga=saga, name="reserve")
        .values_list("status", flat=True)
        .first(),
    }
    child = Saga.objects.filter(parent=saga).order_by("-created_at").first()
    holders["child_sku"] = child.steps.get(name="book").status if child else "pending"
    for key, status in holders.items():
        on_hand = Product.objects.get(sku=saga.input[key]).stock_on_hand
        assert on_hand == STOCK - (status in held), f"{key}: {on_hand} in stock ({status})"


GROUP_CHILD = FailureMatrix(
    "parent_group_child", make_input=group_child_input, invariant=every_unit_back_or_held
)


def test_the_matrix_makes_a_case_of_a_child_members_child_failing():
    assert {
        "fulfil.reserve fails for good",
        "fulfil.ship: its child saga fails (book fails for good)",
        "last fails for good",  # the group's completed child is compensated with its parent
    } <= {case.id for case in GROUP_CHILD.cases()}


@GROUP_CHILD.parametrize()
def test_a_group_with_a_child_member_passes_its_matrix(saga_db, case):
    case.run(saga_db).assert_guarantees()
