"""The order fulfilment saga end to end, on real workers, PostgreSQL and Redis."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connection

from inventory.models import Reservation
from orders.models import Order
from orders.sagas import ORDER_FULFILMENT
from orders.services import order_submit
from payments.gateway import gateway_recover
from payments.models import GatewayCharge, Payment
from sagas import dispatch, engine
from sagas.models import EventKind, Saga, SagaEvent, SagaStep
from sagas.services import saga_compensate, saga_retry, saga_start, saga_step_resolve
from sagas.testing.models import Fault, FaultEffect, FaultPoint
from shipping.models import Shipment
from tests.conftest import ADDRESS, attempt_in_process, lose_messages, wait_final, wait_for
from tests.factories import ProductFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])

STEP_NAMES = [step.name for step in ORDER_FULFILMENT.steps]


def submit(product, *, quantity=1, token="tok_ok", country="GB", key=None, user=None):
    saga, _ = order_submit(
        customer=user,
        items=[{"sku": product.sku, "quantity": quantity}],
        shipping_address={**ADDRESS, "country": country},
        payment_token=token,
        idempotency_key=key,
    )
    return saga


def order_of(saga: Saga) -> Order | None:
    return Order.objects.filter(pk=saga.input["order_id"]).first()


def charges_for(saga: Saga):
    return GatewayCharge.objects.filter(idempotency_key=f"{saga.pk}:charge_payment")


def step_statuses(saga: Saga) -> list[str]:
    return list(
        SagaStep.objects.filter(saga=saga).order_by("index").values_list("status", flat=True)
    )


def compensation_order(saga: Saga) -> list[str]:
    return list(
        saga.events.filter(kind=EventKind.STEP_COMPENSATED)
        .order_by("id")
        .values_list("step_name", flat=True)
    )


def test_happy_path(saga_db):
    product = ProductFactory(stock_on_hand=10, price=Decimal("12.50"))
    saga = wait_final(submit(product, quantity=2).pk)

    assert saga.status == "completed"
    assert step_statuses(saga) == ["completed"] * 4
    order = order_of(saga)
    assert order is not None and order.status == "confirmed"
    assert order.total == Decimal("25.00")
    assert charges_for(saga).count() == 1
    assert charges_for(saga).get().amount == Decimal("25.00")
    assert Payment.objects.get(order_id=order.pk).status == "charged"
    product.refresh_from_db()
    assert product.stock_on_hand == 8
    assert Shipment.objects.get(order_id=order.pk).status == "scheduled"
    kinds = list(saga.events.order_by("id").values_list("kind", "step_name"))
    assert kinds == [
        (EventKind.SAGA_STARTED, ""),
        *[(EventKind.STEP_COMPLETED, name) for name in STEP_NAMES],
        (EventKind.SAGA_COMPLETED, ""),
    ]


@pytest.mark.parametrize("failing", range(len(ORDER_FULFILMENT.steps)), ids=STEP_NAMES)
def test_failure_matrix(saga_db, failing):
    """A business failure at step k compensates exactly the steps before k, in reverse."""
    product = ProductFactory(stock_on_hand=10)
    step = ORDER_FULFILMENT.steps[failing]
    Fault.objects.create(
        step_name=step.name, point=FaultPoint.BEFORE_ACTION, effect=FaultEffect.BUSINESS_ERROR
    )
    saga = wait_final(submit(product, quantity=3).pk)

    assert saga.status == "compensated"
    expected_undone = [s.name for s in ORDER_FULFILMENT.steps[:failing]][::-1]
    if step.compensate_failed_step:
        expected_undone.insert(0, step.name)
    assert compensation_order(saga) == expected_undone
    statuses = step_statuses(saga)
    assert statuses[:failing] == ["compensated"] * failing
    assert statuses[failing] == ("compensated" if step.compensate_failed_step else "failed")
    assert statuses[failing + 1 :] == ["pending"] * (len(STEP_NAMES) - failing - 1)
    failed = SagaStep.objects.get(saga=saga, index=failing)
    assert failed.error_code == "injected_business_error"
    assert saga.error_code == "injected_business_error"

    order = order_of(saga)
    assert order is None if failing == 0 else order.status == "cancelled"
    charged = sum(c.amount for c in charges_for(saga).filter(status="charged"))
    assert charged == 0  # every charge was refunded
    assert Payment.objects.filter(order_id=saga.input["order_id"], status="charged").count() == 0
    product.refresh_from_db()
    assert product.stock_on_hand == 10
    assert not Reservation.objects.filter(order_id=saga.input["order_id"], status="active")
    assert not Shipment.objects.filter(order_id=saga.input["order_id"], status="scheduled")


@pytest.mark.parametrize(
    ("token", "country", "quantity", "failed_step", "code"),
    [
        ("tok_declined", "GB", 1, "charge_payment", "card_declined"),
        ("tok_insufficient_funds", "GB", 1, "charge_payment", "insufficient_funds"),
        ("tok_ok", "GB", 11, "reserve_inventory", "insufficient_stock"),
        ("tok_ok", "AQ", 1, "schedule_shipment", "unsupported_destination"),
    ],
)
def test_business_failures_of_the_domain(saga_db, token, country, quantity, failed_step, code):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, quantity=quantity, token=token, country=country).pk)
    assert saga.status == "compensated"
    assert saga.error_code == code
    flagged = next(s for s in ORDER_FULFILMENT.steps if s.name == failed_step)
    expected = "compensated" if flagged.compensate_failed_step else "failed"
    assert SagaStep.objects.get(saga=saga, name=failed_step).status == expected
    assert order_of(saga).status == "cancelled"
    product.refresh_from_db()
    assert product.stock_on_hand == 10


def test_amount_over_the_limit_is_declined(saga_db):
    product = ProductFactory(stock_on_hand=10, price=Decimal("6000.00"))
    saga = wait_final(submit(product, quantity=2).pk)
    assert saga.status == "compensated"
    assert saga.error_code == "amount_over_limit"
    assert charges_for(saga).filter(status="charged").count() == 0


def test_transient_failures_are_retried(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, token="tok_transient_2").pk)
    assert saga.status == "completed"
    payment_step = SagaStep.objects.get(saga=saga, name="charge_payment")
    assert payment_step.attempts == 3
    assert saga.events.filter(kind=EventKind.STEP_RETRYING).count() == 2
    assert charges_for(saga).count() == 1


def test_payment_out_of_retries_pauses_and_retry_completes(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, token="tok_timeout").pk)

    assert saga.status == "failed"
    assert saga.current_step == STEP_NAMES.index("charge_payment")
    assert SagaStep.objects.get(saga=saga, name="charge_payment").status == "failed"
    assert order_of(saga).status == "pending"  # paused, not cancelled
    assert not saga.events.filter(kind=EventKind.COMPENSATION_STARTED).exists()

    gateway_recover()
    saga_retry(saga_id=saga.pk, actor="test")
    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    assert order_of(saga).status == "confirmed"
    create = SagaStep.objects.get(saga=saga, name="create_order")
    assert create.attempts == 1
    assert saga.events.filter(kind=EventKind.STEP_COMPLETED, step_name="create_order").count() == 1
    assert charges_for(saga).count() == 1


def _failing_refund() -> Fault:
    return Fault.objects.create(
        step_name="charge_payment",
        point=FaultPoint.BEFORE_COMPENSATION,
        effect=FaultEffect.TRANSIENT_ERROR,
    )


def test_compensation_failure_then_retry_finishes_it(saga_db):
    product = ProductFactory(stock_on_hand=10)
    fault = _failing_refund()
    saga = wait_final(submit(product, country="AQ").pk, timeout=60)

    assert saga.status == "failed"
    assert saga.error_code == "compensation_failed"
    payment_step = SagaStep.objects.get(saga=saga, name="charge_payment")
    assert payment_step.status == "compensation_failed"
    # Still owed: the saga stopped before it, for an operator.
    assert SagaStep.objects.get(saga=saga, name="create_order").status == "compensating"
    assert order_of(saga).status == "pending"

    fault.delete()  # the fault is fixed
    saga_retry(saga_id=saga.pk, actor="test")
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert compensation_order(saga) == ["reserve_inventory", "charge_payment", "create_order"]
    assert charges_for(saga).get().status == "refunded"
    assert order_of(saga).status == "cancelled"


def test_resolve_marks_the_step_handled_and_continues(saga_db):
    product = ProductFactory(stock_on_hand=10)
    _failing_refund()
    saga = wait_final(submit(product, country="AQ").pk, timeout=60)
    assert saga.status == "failed"

    index = STEP_NAMES.index("charge_payment")
    saga_step_resolve(saga_id=saga.pk, index=index, actor="operator")
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert saga.events.filter(kind=EventKind.OPERATOR_RESOLVE, step_name="charge_payment").exists()
    assert order_of(saga).status == "cancelled"
    # Resolved by hand: the framework did not refund through the gateway.
    assert charges_for(saga).get().status == "charged"


def test_operator_compensate_aborts_a_paused_saga(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, token="tok_timeout").pk)
    assert saga.status == "failed"
    saga_compensate(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    # The failed payment step is compensated too (compensate_failed_step): nothing was charged.
    assert compensation_order(saga) == ["charge_payment", "create_order"]
    assert order_of(saga).status == "cancelled"


def test_duplicate_step_messages_have_one_effect(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = submit(product)
    # Deliver every step a second time, racing the first chain (same epoch: a redelivery).
    dispatch.send_steps(str(saga.pk), saga.epoch, [(i, 60) for i in range(len(STEP_NAMES))], 0)
    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    wait_for(
        lambda: saga.events.filter(kind=EventKind.DUPLICATE_IGNORED).count() == len(STEP_NAMES),
        what="every duplicate to be delivered",
    )
    assert saga.events.filter(kind=EventKind.STEP_COMPLETED).count() == len(STEP_NAMES)
    assert Order.objects.filter(pk=saga.input["order_id"]).count() == 1
    assert charges_for(saga).count() == 1
    assert Payment.objects.filter(order_id=saga.input["order_id"]).count() == 1
    product.refresh_from_db()
    assert product.stock_on_hand == 9
    assert Shipment.objects.filter(order_id=saga.input["order_id"]).count() == 1


def test_error_callback_thrice_sends_one_compensation(saga_db, monkeypatch):
    product = ProductFactory(stock_on_hand=10)
    # Drive the forward steps by hand, so the failure is ours to report.
    lose_messages(monkeypatch)
    saga = submit(product, country="AQ")
    for index in range(3):
        assert attempt_in_process(saga.pk, index) == "done"
    assert attempt_in_process(saga.pk, 3) == "fail"  # unsupported destination
    monkeypatch.undo()
    epoch = Saga.objects.get(pk=saga.pk).epoch

    def callback() -> None:
        engine.step_chain_failed(str(saga.pk), epoch)
        connection.close()

    threads = [threading.Thread(target=callback) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    callback()  # and once more, after the fact

    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert Saga.objects.get(pk=saga.pk).epoch == epoch + 1  # one chain of compensations
    assert saga.events.filter(kind=EventKind.COMPENSATION_STARTED).count() == 1
    assert compensation_order(saga) == ["reserve_inventory", "charge_payment", "create_order"]
    assert not saga.events.filter(kind=EventKind.DUPLICATE_IGNORED).exists()
    assert charges_for(saga).get().status == "refunded"
    product.refresh_from_db()
    assert product.stock_on_hand == 10


def test_start_with_the_same_idempotency_key_gives_one_saga(saga_db):
    product = ProductFactory(stock_on_hand=10)
    user = UserFactory()
    results: list[Saga] = []

    def place() -> None:
        results.append(submit(product, key="order-123", user=user))
        connection.close()

    threads = [threading.Thread(target=place) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({saga.pk for saga in results}) == 1
    assert Saga.objects.count() == 1
    saga = wait_final(results[0].pk)
    assert saga.status == "completed"
    assert Order.objects.count() == 1


def test_same_key_and_name_through_the_framework(saga_db):
    first, created = saga_start(name="snapshot_demo", input={}, idempotency_key="k1")
    again, created_again = saga_start(name="snapshot_demo", input={}, idempotency_key="k1")
    assert created and not created_again and first.pk == again.pk


def test_lost_gateway_response_charges_once(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, token="tok_lost_response").pk)
    assert saga.status == "completed"
    assert charges_for(saga).count() == 1
    assert SagaStep.objects.get(saga=saga, name="charge_payment").attempts == 2


def test_crash_after_the_external_call_before_commit_charges_once(saga_db):
    """The gateway charged, then the step's transaction failed: the retry must not charge."""
    product = ProductFactory(stock_on_hand=10)
    Fault.objects.create(
        step_name="charge_payment",
        point=FaultPoint.AFTER_ACTION,
        effect=FaultEffect.TRANSIENT_ERROR,
        remaining=1,
    )
    saga = wait_final(submit(product).pk)
    assert saga.status == "completed"
    assert charges_for(saga).count() == 1
    assert Payment.objects.filter(order_id=saga.input["order_id"]).count() == 1
    assert SagaStep.objects.get(saga=saga, name="charge_payment").attempts == 2


def test_no_oversell_under_concurrency(saga_db):
    stock = 5
    product = ProductFactory(stock_on_hand=stock)
    sagas = [submit(product) for _ in range(3 * stock)]
    finals = [wait_final(saga.pk, timeout=90) for saga in sagas]

    statuses = sorted(saga.status for saga in finals)
    assert statuses.count("completed") == stock
    assert statuses.count("compensated") == 2 * stock
    assert Order.objects.filter(status="confirmed").count() == stock
    product.refresh_from_db()
    assert product.stock_on_hand == 0
    assert Reservation.objects.filter(status="active").count() == stock
    # Steps ran on whichever worker process was free: more than one took part.
    workers = {
        detail["worker"]
        for detail in SagaEvent.objects.filter(kind=EventKind.STEP_COMPLETED).values_list(
            "detail", flat=True
        )
    }
    assert len(workers) >= 2
