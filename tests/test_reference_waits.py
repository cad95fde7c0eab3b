"""The reference saga's waits, end to end: a 3-D Secure card waits for the simulated gateway's
webhook, which really posts to the saga's signed URL over HTTP; an abandoned one is compensated
when its wait times out; an order above ORDERS_REVIEW_ABOVE waits for an operator's approval.

A worker of the module's own runs on the project's settings, as `make run`'s does, with
SAGAS_BASE_URL on a live server (`manage.py runserver`); the sweeper runs here, as beat would.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings as django_settings

from inventory.models import Product, Reservation
from orders.models import Order
from orders.sagas import order_fulfilment
from orders.services import order_submit
from payments.models import GatewayCharge, Payment
from sagas.definitions import register
from sagas.engine import sweeper
from sagas.models import EventKind, Saga, SagaEvent, SagaSignal, SagaStep
from sagas.services import saga_approve, saga_reject
from sagas.testing import CeleryWorker
from shipping.models import Shipment
from tests.conftest import (
    ADDRESS,
    ARTIFACTS,
    QUEUE,
    running_server,
    wait_final,
    wait_for,
    worker_env,
    worker_options,
)
from tests.factories import ProductFactory

pytestmark = [
    pytest.mark.system,
    pytest.mark.django_db(transaction=True, databases=["default", "gateway"]),
]

INITIAL_STOCK = 10
SERVER_LOG = ARTIFACTS / "reference-waits-server.log"


@pytest.fixture(scope="module")
def shop(django_db_setup) -> Iterator[tuple[str, CeleryWorker]]:
    """The web server the gateway's webhooks reach, and a worker whose signed URLs are on it."""
    queue = f"{QUEUE}-reference-waits"
    # What the server sends (the rest of a saga, once its wait ended) goes to this worker.
    server_env = {**worker_env(), "CELERY_TASK_DEFAULT_QUEUE": queue}
    with running_server(server_env, SERVER_LOG) as base:
        options = worker_options(
            nodes=1,
            concurrency=2,
            name="reference-waits",
            env={
                # The project's own settings, as `make run`'s worker has them, on the test
                # databases, with the signed URLs on the live server.
                "DJANGO_SETTINGS_MODULE": "sagaproject.settings",
                "SAGAS_FAULT_INJECTION": "1",
                "SAGAS_MODULES": "",
                "SAGAS_BASE_URL": base,
                "SAGAS_RELAY_AFTER": "1",
                "ORDERS_STEP_TIME_LIMIT": "15",
                "GATEWAY_CONFIRM_DELAY": "1",
            },
        )
        with CeleryWorker(**{**options, "queue": queue}) as worker:
            yield base, worker


@pytest.fixture
def worker(shop) -> Iterator[CeleryWorker]:
    """The module's worker; this test's messages go to it, and it is idle before the flush."""
    _, worker = shop
    with worker.routed():
        yield worker
        worker.wait_idle(timeout=60)


def submit(
    product: Product, *, quantity: int = 1, token: str = "tok_ok", country: str = "GB"
) -> Saga:
    saga, _ = order_submit(
        customer=None,
        items=[{"sku": product.sku, "quantity": quantity}],
        shipping_address={**ADDRESS, "country": country},
        payment_token=token,
    )
    return saga


def status(saga: Saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def stage(saga: Saga, name: str) -> SagaStep:
    return SagaStep.objects.get(saga=saga, name=name)


def kinds(saga: Saga, step_name: str) -> list[str]:
    events = SagaEvent.objects.filter(saga=saga, step_name=step_name).order_by("id")
    return list(events.values_list("kind", flat=True))


def waiting_at(saga: Saga, name: str) -> None:
    wait_for(
        lambda: status(saga) == "waiting" and stage(saga, name).status == "waiting",
        timeout=30,
        what=f"the saga to wait at {name}",
    )


def the_books_balance(saga: Saga) -> None:
    """Stock is never lost or made up; a completed order is confirmed, charged its total once,
    its stock reserved and shipped; a compensated one is cancelled, every charge refunded, its
    stock back on hand and nothing shipped."""
    order_id = saga.input["order_id"]
    (line,) = saga.input["items"]
    charges = GatewayCharge.objects.filter(idempotency_key=f"{saga.pk}:charge_payment")
    held = sum(c.amount for c in charges if c.status == "charged")
    on_hand = Product.objects.get(sku=line["sku"]).stock_on_hand
    reserved = sum(
        r.quantity for r in Reservation.objects.filter(order_id=order_id, status="active")
    )
    shipped = Shipment.objects.filter(order_id=order_id, status="scheduled").count()
    paid = Payment.objects.filter(order_id=order_id, status="charged").count()
    order = Order.objects.get(pk=order_id)
    assert on_hand + reserved == INITIAL_STOCK, f"stock: {on_hand} on hand, {reserved} reserved"
    if saga.status == "completed":
        assert order.status == "confirmed"
        assert (held, charges.count(), paid) == (Decimal(saga.input["total"]), 1, 1)
        assert (reserved, shipped) == (line["quantity"], 1)
    else:
        assert saga.status == "compensated"
        assert order.status == "cancelled"
        assert charges.count() == 1 and charges.get().status == "refunded"
        assert (held, paid, reserved, shipped) == (0, 0, 0, 0)


def sweep_until_final(saga: Saga) -> Saga:
    """Run the sweeper, as beat would, until the saga ends: it ends the waits that are due."""

    def swept() -> Saga | None:
        sweeper.sweep(stale_after=timedelta(minutes=1))
        found = Saga.objects.get(pk=saga.pk)
        return found if found.status in ("completed", "compensated", "failed") else None

    return wait_for(swept, timeout=30, what="the sweeper to end the saga", interval=0.5)


# -- 3-D Secure ---------------------------------------------------------------------------------


def test_a_3ds_card_waits_for_the_gateways_webhook_at_the_signed_url_then_completes(worker):
    product = ProductFactory(stock_on_hand=INITIAL_STOCK, price=Decimal("25.00"))
    saga = submit(product, quantity=2, token="tok_3ds")
    final = wait_final(saga.pk, timeout=60)

    assert (final.status, final.error_code) == ("completed", "")
    charge_id = stage(final, "charge_payment").output["charge_id"]
    confirmation = stage(final, "payment_confirmation")
    assert confirmation.output == {"type": "payment.confirmed", "charge_id": charge_id}
    assert EventKind.WAIT_STARTED in kinds(final, "payment_confirmation")
    [signal] = SagaSignal.objects.filter(saga=final)
    assert (signal.event, signal.status) == ("payment_confirmed", "consumed")
    # It came over HTTP, from the gateway's task, to the signed URL the charge handed it.
    posts = [line for line in SERVER_LOG.read_text().splitlines() if "/signals/" in line]
    assert any('"POST /api/sagas/signals/' in line and '" 20' in line for line in posts), posts
    the_books_balance(final)


def test_an_abandoned_3ds_card_is_compensated_once_its_wait_times_out(worker, settings):
    settings.ORDERS_CONFIRM_TIMEOUT = 1  # the definition this process submits with
    register(order_fulfilment())
    product = ProductFactory(stock_on_hand=INITIAL_STOCK)
    saga = submit(product, quantity=3, token="tok_3ds_abandoned")
    waiting_at(saga, "payment_confirmation")
    assert Product.objects.get(pk=product.pk).stock_on_hand == INITIAL_STOCK - 3  # held

    final = sweep_until_final(saga)
    assert (final.status, final.error_code) == ("compensated", "wait_timed_out")
    assert EventKind.WAIT_TIMED_OUT in kinds(final, "payment_confirmation")
    assert stage(final, "charge_payment").status == "compensated"
    assert stage(final, "reserve_inventory").status == "compensated"
    assert not SagaSignal.objects.filter(saga=final).exists()  # the customer never confirmed
    the_books_balance(final)


def test_a_confirmed_3ds_order_that_cannot_ship_is_refunded_and_its_stock_released(worker):
    product = ProductFactory(stock_on_hand=INITIAL_STOCK)
    final = wait_final(submit(product, quantity=2, token="tok_3ds", country="AQ").pk, timeout=60)
    assert (final.status, final.error_code) == ("compensated", "unsupported_destination")
    assert stage(final, "payment_confirmation").status == "completed"  # confirmed, then undone
    the_books_balance(final)


def test_other_cards_do_not_wait(worker):
    product = ProductFactory(stock_on_hand=INITIAL_STOCK)
    final = wait_final(submit(product).pk, timeout=60)
    assert final.status == "completed"
    assert kinds(final, "payment_confirmation") == [EventKind.WAIT_SKIPPED]
    assert stage(final, "payment_confirmation").output is None
    assert not SagaStep.objects.filter(saga=final, name="review").exists()  # no review set
    the_books_balance(final)


# -- review above ORDERS_REVIEW_ABOVE -----------------------------------------------------------


@pytest.fixture
def review_above_100(settings) -> None:
    settings.ORDERS_REVIEW_ABOVE = "100.00"
    register(order_fulfilment())


@pytest.mark.usefixtures("review_above_100")
def test_an_order_above_the_threshold_waits_for_review_and_approved_completes(worker):
    product = ProductFactory(stock_on_hand=INITIAL_STOCK, price=Decimal("60.00"))
    saga = submit(product, quantity=2)  # 120.00
    waiting_at(saga, "review")
    assert Shipment.objects.filter(order_id=saga.input["order_id"]).count() == 0

    outcome = saga_approve(saga_id=saga.pk, actor="operator", note="known customer")
    assert (outcome.status, outcome.stage) == ("consumed", "review")
    final = wait_final(saga.pk, timeout=60)
    assert final.status == "completed"
    assert stage(final, "review").output == {
        "decision": "approved",
        "by": "operator",
        "note": "known customer",
    }
    the_books_balance(final)


@pytest.mark.usefixtures("review_above_100")
def test_an_order_rejected_at_review_is_compensated(worker):
    product = ProductFactory(stock_on_hand=INITIAL_STOCK, price=Decimal("60.00"))
    saga = submit(product, quantity=2)
    waiting_at(saga, "review")

    assert saga_reject(saga_id=saga.pk, actor="operator", note="fraud suspected").status == (
        "consumed"
    )
    final = wait_final(saga.pk, timeout=60)
    assert (final.status, final.error_code) == ("compensated", "approval_rejected")
    assert stage(final, "schedule_shipment").status == "pending"
    the_books_balance(final)


@pytest.mark.usefixtures("review_above_100")
def test_an_order_at_or_below_the_threshold_does_not_wait_for_review(worker):
    product = ProductFactory(stock_on_hand=INITIAL_STOCK, price=Decimal("50.00"))
    final = wait_final(submit(product, quantity=2).pk, timeout=60)  # 100.00: not above
    assert final.status == "completed"
    assert final.input["review_above"] == "100.00"
    assert kinds(final, "review") == [EventKind.WAIT_SKIPPED]
    the_books_balance(final)


def test_the_review_is_off_by_default():
    assert django_settings.ORDERS_REVIEW_ABOVE is None
    assert "review" not in [stage.name for stage in order_fulfilment().steps]
