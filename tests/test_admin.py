"""The saga admin: list and detail pages, and the operator actions behind their confirmation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from datetime import UTC
from decimal import Decimal

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.core.management import call_command
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape
from django.utils.text import Truncator
from pytest_django.asserts import assertHTMLEqual

from inventory.models import Product, Reservation
from orders.models import Order
from orders.sagas import ORDER_FULFILMENT
from orders.services import order_submit
from payments.gateway import gateway_recover
from payments.models import GatewayCharge, Payment
from sagas.admin import ReadOnlyAdminMixin
from sagas.admin.saga import id_range
from sagas.models import EventKind, Saga, SagaEvent, SagaStep
from sagas.templatetags import saga_admin
from sagas.testing.models import Fault, FaultEffect, FaultPoint
from shipping.models import Shipment
from tests.conftest import ADDRESS, wait_final
from tests.factories import ProductFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])

CHANGELIST = reverse("admin:sagas_saga_changelist")
CONFIRMATION = "admin/sagas/saga/action_confirmation.html"
STEP_NAMES = [step.name for step in ORDER_FULFILMENT.steps]
STAGES = len(STEP_NAMES)  # the steps, and the wait for a 3-D Secure confirmation


def detail_url(saga: Saga) -> str:
    return reverse("admin:sagas_saga_change", args=[saga.pk])


def submit(product, *, token: str = "tok_ok", country: str = "GB") -> Saga:
    saga, _ = order_submit(
        customer=None,
        items=[{"sku": product.sku, "quantity": 1}],
        shipping_address={**ADDRESS, "country": country},
        payment_token=token,
    )
    return saga


def build_saga(status: str, step_statuses: list[str]) -> Saga:
    """Saga rows as the engine leaves them, without running anything (no workers needed)."""
    now = timezone.now()
    failed = next((i for i, s in enumerate(step_statuses) if s != "completed"), 0)
    saga = Saga.objects.create(
        name=ORDER_FULFILMENT.name,
        status=status,
        input={"order_id": str(uuid.uuid4())},
        current_step=failed,
        finished_at=now if status in ("completed", "compensated") else None,
    )
    SagaStep.objects.bulk_create(
        SagaStep(
            saga=saga,
            index=index,
            name=step.name,
            status=step_status,
            definition=step.snapshot(),
            attempts=0 if step_status == "pending" else 1,
            started_at=None if step_status == "pending" else now,
            finished_at=None if step_status == "pending" else now,
        )
        for index, (step, step_status) in enumerate(
            zip(ORDER_FULFILMENT.steps, step_statuses, strict=True)
        )
    )
    SagaEvent.objects.create(saga=saga, kind=EventKind.SAGA_STARTED, created_at=now)
    return saga


def build_paused() -> Saga:
    return build_saga("failed", ["completed", "failed", *["pending"] * (STAGES - 2)])


def build_completed() -> Saga:
    return build_saga("completed", ["completed"] * STAGES)


def action_post(action: str, *sagas: Saga, confirm: bool = False, **extra: str) -> dict:
    """The form data of the list's action form (or, with confirm, of the confirmation page)."""
    data: dict = {"action": action, "_selected_action": [str(s.pk) for s in sagas], **extra}
    if confirm:
        data["post"] = "yes"
    else:
        data["index"] = "0"
    return data


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def shown_ids(response) -> set:
    return {saga.pk for saga in response.context["cl"].result_list}


def test_list_and_detail_pages_for_each_outcome(saga_db, admin_client):
    product = ProductFactory(stock_on_hand=10, price=Decimal("12.50"))
    completed = submit(product)
    compensated = submit(product, country="AQ")
    paused = submit(product, token="tok_timeout")
    for saga in (completed, compensated, paused):
        wait_final(saga.pk)
    paused.refresh_from_db()
    assert paused.status == "failed"

    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    assert shown_ids(response) == {completed.pk, compensated.pk, paused.pk}
    content = response.content.decode()
    for status in ("completed", "compensated", "failed"):
        assert f"saga-status-{status}" in content
    assert f"{STAGES} of {STAGES}" in content  # the completed saga's progress
    assert f"1 of {STAGES}" in content  # the paused one: create_order done, charge_payment failed

    failed_only = admin_client.get(CHANGELIST, {"status__exact": "failed"})
    assert shown_ids(failed_only) == {paused.pk}
    by_order = admin_client.get(CHANGELIST, {"q": compensated.input["order_id"]})
    assert shown_ids(by_order) == {compensated.pk}
    by_saga = admin_client.get(CHANGELIST, {"q": str(completed.pk)[:13]})
    assert shown_ids(by_saga) == {completed.pk}

    for saga in (completed, compensated, paused):
        page = admin_client.get(detail_url(saga))
        assert page.status_code == 200
        html = page.content.decode()
        assert "saga-diagram" in html
        assert all(name in html for name in STEP_NAMES)
        assert "Saga started" in html  # the timeline
        order_url = reverse("admin:orders_order_change", args=[saga.input["order_id"]])
        assert order_url in html  # linked through SAGAS_ADMIN_LINKS
        assert ("Payment " in html) is (saga != paused)

    completed_html = admin_client.get(detail_url(completed)).content.decode()
    assert "Reservations (1)" in completed_html
    assert "Shipment " in completed_html
    compensated_html = admin_client.get(detail_url(compensated)).content.decode()
    # The diagram's compensation row: three steps undone, in reverse order.
    assert compensated_html.count("saga-node saga-node-compensated") == 3
    assert compensated_html.count('<span class="saga-fact">undone ') == 3
    assert "unsupported_destination" in compensated_html

    # Buttons for the actions on an unfinished saga; resolve only for a failed compensation.
    paused_page = admin_client.get(detail_url(paused))
    buttons = [button.name for button in paused_page.context["saga_operator_actions"]]
    assert buttons == ["retry_sagas", "compensate_sagas"]
    # A final saga: its reconciliation check, run now (the order saga has one).
    final = admin_client.get(detail_url(completed)).context["saga_operator_actions"]
    assert [button.name for button in final] == ["reconcile_sagas"]

    # The domain objects' own pages, which the links lead to, and which link back.
    order = Order.objects.get(pk=completed.input["order_id"])
    order_page = admin_client.get(reverse("admin:orders_order_change", args=[order.pk]))
    assert detail_url(completed) in order_page.content.decode()
    payment = Payment.objects.get(order_id=order.pk)
    reservation = Reservation.objects.get(order_id=order.pk)
    shipment = Shipment.objects.get(order_id=order.pk)
    order_url = reverse("admin:orders_order_change", args=[order.pk])
    linking_to_the_order = (
        reverse("admin:payments_payment_change", args=[payment.pk]),
        reverse("admin:inventory_reservation_changelist") + f"?order_id={order.pk}",
        reverse("admin:inventory_reservation_change", args=[reservation.pk]),
        reverse("admin:shipping_shipment_change", args=[shipment.pk]),
    )
    for url in linking_to_the_order:
        page = admin_client.get(url)
        assert page.status_code == 200, url
        assert order_url in page.content.decode(), url
    for url in (
        reverse("admin:orders_order_changelist"),
        reverse("admin:payments_payment_changelist"),
        reverse("admin:payments_gatewaycharge_changelist") + f"?q={completed.pk}",
        reverse("admin:payments_gatewayattempt_changelist"),
        reverse("admin:inventory_product_changelist"),
        reverse("admin:inventory_product_change", args=[product.pk]),
        reverse("admin:shipping_shipment_changelist"),
    ):
        assert admin_client.get(url).status_code == 200, url


def test_the_list_costs_the_same_queries_for_1_and_20_sagas(admin_client):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.get(CHANGELIST)
        assert response.status_code == 200
        return len(captured.captured_queries)

    build_paused()
    admin_client.get(CHANGELIST)  # the session's first request loads the user
    one = queries()
    for index in range(19):
        build_paused() if index % 2 else build_completed()
    twenty = queries()
    assert one == twenty, f"1 saga: {one} queries, 20 sagas: {twenty}"
    assert admin_client.get(CHANGELIST).content.decode().count('name="_selected_action"') == 20


def test_retry_confirms_first_then_the_paused_saga_completes(saga_db, admin_client, admin_user):
    product = ProductFactory(stock_on_hand=10)
    paused = wait_final(submit(product, token="tok_timeout").pk)
    completed = build_completed()
    assert paused.status == "failed"
    gateway_recover()

    page = admin_client.post(CHANGELIST, action_post("retry_sagas", paused, completed))
    assert page.status_code == 200
    assert CONFIRMATION in [t.name for t in page.templates]
    plans = {preview.saga.pk: preview.plan for preview in page.context["previews"]}
    assert plans[paused.pk].allowed
    assert plans[paused.pk].run == (
        "charge_payment",
        "reserve_inventory",
        "payment_confirmation",
        "schedule_shipment",
    )
    assert not plans[completed.pk].allowed
    html = page.content.decode()
    assert "Skipped:" in html and "Yes, retry" in html
    # Nothing happened yet.
    assert Saga.objects.get(pk=paused.pk).status == "failed"
    assert not SagaEvent.objects.filter(saga=paused, kind=EventKind.OPERATOR_RETRY).exists()

    done = admin_client.post(
        CHANGELIST, action_post("retry_sagas", paused, completed, confirm=True)
    )
    assert done.status_code == 302
    shown = messages_of(done)
    assert "Retried 1 saga." in shown
    assert any(str(completed.pk) in m and "Only a failed saga" in m for m in shown)

    saga = wait_final(paused.pk)
    assert saga.status == "completed"
    assert Order.objects.get(pk=saga.input["order_id"]).status == "confirmed"
    retry_event = SagaEvent.objects.get(saga=saga, kind=EventKind.OPERATOR_RETRY)
    assert retry_event.detail["actor"] == admin_user.get_username()
    assert LogEntry.objects.filter(object_id=str(saga.pk)).exists()
    assert Saga.objects.get(pk=completed.pk).status == "completed"


def test_compensate_from_the_detail_page_aborts_a_paused_saga(saga_db, admin_client):
    product = ProductFactory(stock_on_hand=10)
    paused = wait_final(submit(product, token="tok_timeout").pk)

    # The detail page's button posts exactly this, and gets the same confirmation page.
    assert 'value="compensate_sagas"' in admin_client.get(detail_url(paused)).content.decode()
    button = action_post("compensate_sagas", paused, _return_to_detail="1")
    page = admin_client.post(CHANGELIST, button)
    assert page.status_code == 200
    (preview,) = page.context["previews"]
    # charge_payment may have half-happened, so it is compensated too.
    assert preview.plan.allowed
    assert preview.plan.undo == ("charge_payment", "create_order")
    assert Saga.objects.get(pk=paused.pk).status == "failed"

    confirm = action_post("compensate_sagas", paused, confirm=True, _return_to_detail="1")
    done = admin_client.post(CHANGELIST, confirm)
    assert done.status_code == 302 and done["Location"] == detail_url(paused)
    assert "Compensating 1 saga." in messages_of(done)

    saga = wait_final(paused.pk)
    assert saga.status == "compensated"
    assert Order.objects.get(pk=saga.input["order_id"]).status == "cancelled"
    assert admin_client.get(detail_url(saga)).status_code == 200


def test_resolve_marks_the_failed_compensation_handled(saga_db, admin_client):
    product = ProductFactory(stock_on_hand=10)
    Fault.objects.create(
        step_name="charge_payment",
        point=FaultPoint.BEFORE_COMPENSATION,
        effect=FaultEffect.TRANSIENT_ERROR,
    )
    stuck = wait_final(submit(product, country="AQ").pk, timeout=60)
    assert stuck.status == "failed"
    assert SagaStep.objects.get(saga=stuck, name="charge_payment").status == "compensation_failed"
    html = admin_client.get(detail_url(stuck)).content.decode()
    assert "undo failed after" in html and "saga-status-compensation_failed" in html
    assert 'value="resolve_sagas"' in html  # the detail page's button

    page = admin_client.post(CHANGELIST, action_post("resolve_sagas", stuck))
    (preview,) = page.context["previews"]
    assert preview.plan.allowed
    assert preview.plan.reason == "Mark charge_payment as compensated by hand."
    assert preview.plan.undo == ("create_order",)

    done = admin_client.post(CHANGELIST, action_post("resolve_sagas", stuck, confirm=True))
    assert "Resolved 1 saga." in messages_of(done)
    saga = wait_final(stuck.pk)
    assert saga.status == "compensated"
    assert SagaEvent.objects.filter(saga=saga, kind=EventKind.OPERATOR_RESOLVE).exists()
    # Resolved by hand: the gateway was not asked to refund.
    charge = GatewayCharge.objects.get(idempotency_key=f"{saga.pk}:charge_payment")
    assert charge.status == "charged"


def test_actions_need_their_permissions(client):
    paused = build_paused()
    operator = UserFactory(is_staff=True)
    operator.user_permissions.add(Permission.objects.get(codename="view_saga"))
    client.force_login(operator)

    page = client.get(CHANGELIST)
    assert page.status_code == 200
    assert "retry_sagas" not in page.content.decode()
    assert client.get(detail_url(paused)).context["saga_operator_actions"] == []
    # With no action it may take, the list ignores the posted one and shows itself again.
    for confirm in (False, True):
        refused = client.post(CHANGELIST, action_post("retry_sagas", paused, confirm=confirm))
        assert refused.status_code == 200
        assert CONFIRMATION not in [t.name for t in refused.templates]
    assert Saga.objects.get(pk=paused.pk).status == "failed"
    assert not SagaEvent.objects.filter(saga=paused, kind=EventKind.OPERATOR_RETRY).exists()

    operator.user_permissions.add(Permission.objects.get(codename="retry_saga"))
    page = client.get(CHANGELIST)
    choices = dict(page.context["action_form"].fields["action"].choices)
    assert "retry_sagas" in choices
    assert "compensate_sagas" not in choices and "resolve_sagas" not in choices
    buttons = client.get(detail_url(paused)).context["saga_operator_actions"]
    assert [button.name for button in buttons] == ["retry_sagas"]
    confirmation = client.post(CHANGELIST, action_post("retry_sagas", paused))
    assert confirmation.status_code == 200 and confirmation.context["allowed_count"] == 1
    refused = client.post(CHANGELIST, action_post("compensate_sagas", paused, confirm=True))
    assert "No action selected." in messages_of(refused)
    assert Saga.objects.get(pk=paused.pk).status == "failed"


def test_sagas_are_read_only_and_only_finished_ones_deletable(admin_client):
    paused, completed = build_paused(), build_completed()
    assert admin_client.get(reverse("admin:sagas_saga_add")).status_code == 403
    assert admin_client.get(detail_url(paused)).context["has_change_permission"] is False
    delete = "admin:sagas_saga_delete"
    assert admin_client.get(reverse(delete, args=[paused.pk])).status_code == 403
    assert admin_client.get(reverse(delete, args=[completed.pk])).status_code == 200


def test_editing_a_product_never_writes_the_stock(admin_client):
    product = ProductFactory(stock_on_hand=10, price=Decimal("10.00"))
    url = reverse("admin:inventory_product_change", args=[product.pk])
    assert "stock_on_hand" not in admin_client.get(url).context["adminform"].form.fields
    Product.objects.filter(pk=product.pk).update(stock_on_hand=7)  # an order reserved 3
    response = admin_client.post(url, {"sku": product.sku, "name": "Renamed", "price": "11.00"})
    assert response.status_code == 302
    product.refresh_from_db()
    assert (product.name, product.price, product.stock_on_hand) == ("Renamed", Decimal("11.00"), 7)


def test_fault_admin(admin_client):
    Fault.objects.create(step_name="charge_payment", point="before_action", effect="crash")
    assert admin_client.get(reverse("admin:sagas_testing_fault_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:sagas_testing_fault_add")).status_code == 200


def test_the_fault_model_is_only_where_the_test_kit_is_installed():
    """The project installs `sagas.testing` only with SAGAS_FAULT_INJECTION: no faults model,
    table or admin in production."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "sagaproject.settings"}
    env.pop("SAGAS_FAULT_INJECTION", None)
    script = (
        "import django; django.setup(); from django.apps import apps; "
        "from django.contrib import admin; "
        "print(apps.is_installed('sagas.testing'), "
        "any(m._meta.app_label == 'sagas_testing' for m in admin.site._registry))"
    )
    for value, expected in ((None, "False False"), ("1", "True True")):
        if value:
            env["SAGAS_FAULT_INJECTION"] = value
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert result.stdout.split("\n")[-2] == expected


def test_no_missing_migrations():
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def test_the_search_looks_in_the_business_data_the_project_names(admin_client, settings):
    paused, completed = build_paused(), build_completed()
    order_id = paused.input["order_id"]

    # Without the setting (as in the reference project), a saga's id and name, and its key
    # whole (tests/test_business_keys.py).
    assert not hasattr(settings, "SAGAS_ADMIN_SEARCH_FIELDS")
    page = admin_client.get(CHANGELIST, {"q": order_id[:13]})
    assert shown_ids(page) == set()
    assert list(page.context["cl"].search_fields) == ["id", "name"]
    assert page.context["cl"].search_help_text == (
        "Search by saga id (or its beginning), name (or a part of one), or by key."
    )
    # Each through an index, on a table of millions: no LIKE over every saga.
    with CaptureQueriesContext(connection) as queries:
        by_id = admin_client.get(CHANGELIST, {"q": str(paused.pk)[:13]})
    assert shown_ids(by_id) == {paused.pk}
    assert not [q["sql"] for q in queries.captured_queries if "LIKE" in q["sql"].upper()]
    assert shown_ids(admin_client.get(CHANGELIST, {"q": str(paused.pk).upper()})) == {paused.pk}
    assert shown_ids(admin_client.get(CHANGELIST, {"q": str(paused.pk)[9:20]})) == set()
    by_name = admin_client.get(CHANGELIST, {"q": ORDER_FULFILMENT.name})
    assert shown_ids(by_name) == {paused.pk, completed.pk}
    assert shown_ids(admin_client.get(CHANGELIST, {"q": "FULFIL"})) == {paused.pk, completed.pk}

    # A project names more lookups of the saga, such as a part of its input.
    settings.SAGAS_ADMIN_SEARCH_FIELDS = ["input__order_id"]
    page = admin_client.get(CHANGELIST, {"q": order_id[:13]})
    assert shown_ids(page) == {paused.pk}
    assert page.context["cl"].search_help_text == (
        "Search by saga id (or its beginning), name or order id (or a part of one), or by key."
    )

    # Any lookup of the saga will do.
    Saga.objects.filter(pk=completed.pk).update(idempotency_key="checkout-42")
    settings.SAGAS_ADMIN_SEARCH_FIELDS = ["idempotency_key"]
    page = admin_client.get(CHANGELIST, {"q": "checkout-4"})
    assert shown_ids(page) == {completed.pk}
    assert "idempotency key" in page.context["cl"].search_help_text


def test_a_short_number_searches_the_business_data_not_the_saga_ids(admin_client):
    """An order number is no saga id's beginning: the ids are searched from the 8 hex digits
    the list shows (dashes where the id has them), the key whole at any length."""
    by_id = Saga.objects.create(
        id=uuid.UUID("14000000-0000-4000-8000-000000000000"), name="other_saga", input={}
    )
    by_key = build_completed()
    Saga.objects.filter(pk=by_key.pk).update(business_key="14")

    assert id_range("14") is None and id_range("1400000") is None  # 2 and 7 digits
    assert shown_ids(admin_client.get(CHANGELIST, {"q": "14"})) == {by_key.pk}
    assert shown_ids(admin_client.get(CHANGELIST, {"q": "1400000"})) == set()
    for beginning in ("14000000", "14000000-00", "14000000-0000-4"):
        assert shown_ids(admin_client.get(CHANGELIST, {"q": beginning})) == {by_id.pk}
    assert id_range("1400-0000") is None  # a dash where the id has none


def test_rows_that_only_code_writes_are_read_only_in_the_admin(admin_client, admin_user):
    request = RequestFactory().get("/admin/")
    request.user = admin_user
    read_only = {
        "orders.order",
        "payments.payment",
        "payments.gatewaycharge",
        "payments.gatewayattempt",
        "payments.gatewayoutage",
        "inventory.reservation",
        "shipping.shipment",
    }
    for model, model_admin in admin.site._registry.items():
        label = model._meta.label_lower
        if label not in read_only:
            continue
        assert isinstance(model_admin, ReadOnlyAdminMixin), label
        assert admin_client.get(reverse(f"admin:{label.replace('.', '_')}_add")).status_code == 403
        assert not model_admin.has_change_permission(request)
        assert not model_admin.has_delete_permission(request)
        assert model_admin.has_view_permission(request)
        read_only.remove(label)
    assert read_only == set()
    # Inlines too: an order's lines, and a saga's steps and events.
    for parent in (Order, Saga):
        inlines = admin.site._registry[parent].get_inline_instances(request)
        assert inlines, parent
        for inline in inlines:
            assert isinstance(inline, ReadOnlyAdminMixin), inline
            assert not inline.has_add_permission(request, None)
            assert not inline.has_change_permission(request, None)
            assert not inline.has_delete_permission(request, None)
            assert inline.has_view_permission(request, None)


def test_the_saga_list_counts_no_further_than_past_its_page(
    db, admin_client, settings, monkeypatch
):
    """On a table of millions of sagas the list counts what it shows, not the table: up to
    SAGAS_LIST_COUNT_LIMIT sagas past the page; past them it says "more than"."""
    from tests.factories import saga_rows

    settings.SAGAS_LIST_COUNT_LIMIT = 3
    monkeypatch.setattr(admin.site._registry[Saga], "list_per_page", 2)
    for _ in range(8):
        saga_rows("three_steps", status="completed")
    with CaptureQueriesContext(connection) as queries:
        first = admin_client.get(CHANGELIST)
    assert first.context["cl"].result_count == 5
    assert b"more than 5 sagas" in first.content
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 6" in sql for sql in counts), counts
    last = admin_client.get(CHANGELIST, {"p": 4})
    assert last.context["cl"].result_count == 8 and len(shown_ids(last)) == 2
    assert b"8 sagas" in last.content and b"more than" not in last.content


def test_the_date_drill_down_and_the_name_filter_list_what_django_would(db, admin_client):
    """The list's drill-down probes each period through the index, and its name filter reads
    the index name by name: the same choices as Django's `SELECT DISTINCT`s."""
    from datetime import datetime

    from sagas.admin.saga import distinct_names
    from sagas.templatetags.saga_admin import ProbedDates
    from tests.factories import saga_rows

    moments = [(2024, 12, 31, 23, 30), (2025, 3, 1, 0, 5), (2025, 3, 15, 12), (2026, 11, 2, 8)]
    for index, moment in enumerate(moments):
        saga = saga_rows("three_steps", status="completed")
        name = ("three_steps", "other_saga")[index % 2]
        created = datetime(*moment, tzinfo=UTC)
        Saga.objects.filter(pk=saga.pk).update(created_at=created, name=name)
    lists = [
        Saga.objects.all(),
        Saga.objects.filter(created_at__year=2025),
        Saga.objects.filter(created_at__year=2025, created_at__month=3),
        Saga.objects.filter(status="failed"),
    ]
    for queryset in lists:
        for kind in ("year", "month", "day")[: 2 if queryset is lists[0] else 3]:
            probed = ProbedDates(queryset).datetimes("created_at", kind)
            assert probed == list(queryset.datetimes("created_at", kind)), (queryset, kind)
    assert distinct_names() == ["other_saga", "three_steps"]

    page = admin_client.get(CHANGELIST)
    assert b"created_at__year=2025" in page.content and b"name=other_saga" in page.content
    march = admin_client.get(CHANGELIST, {"created_at__year": 2025, "created_at__month": 3})
    assert b"created_at__day=15" in march.content


def test_an_action_on_all_of_a_long_list_points_to_the_bulk_action(db, admin_client, settings):
    """ "Select all" past the list's count limit: no page of a million plans, a pointer to the
    bulk action instead. Below the limit, the confirmation page as before."""
    from tests.factories import saga_rows

    settings.SAGAS_LIST_COUNT_LIMIT = 3
    sagas = [saga_rows("three_steps") for _ in range(4)]
    form = action_post("retry_sagas", sagas[0], select_across="1")
    response = admin_client.post(CHANGELIST, form)
    assert response.status_code == 302
    assert any("More than 3 sagas match" in m for m in messages_of(response))

    settings.SAGAS_LIST_COUNT_LIMIT = 4
    confirmation = admin_client.post(CHANGELIST, form)
    assert confirmation.status_code == 200
    assert len(confirmation.context["previews"]) == 4


def breadcrumbs(response) -> str:
    """What a page shows in the <nav> Django's admin/base.html puts its breadcrumbs in."""
    assert response.status_code == 200
    (crumbs,) = re.findall(
        r'<nav aria-label="Breadcrumbs">(.*?)</nav>', response.content.decode(), flags=re.S
    )
    return crumbs


def test_the_action_pages_breadcrumbs_are_marked_up_as_djangos_own(admin_client, monkeypatch):
    """The confirmation and bulk pages write their breadcrumbs as Django's own change form does
    on the running Django (its stylesheet styles only that markup), to their own last crumb."""
    saga = build_paused()
    djangos = breadcrumbs(admin_client.get(detail_url(saga)))  # Django's admin/change_form.html
    title = escape(Truncator(str(saga)).words(18))
    assert djangos.count(title) == 1, djangos
    confirmation = admin_client.post(CHANGELIST, action_post("retry_sagas", saga))
    pages = {
        confirmation.context["operator_action"].verb: confirmation,
        "Retry or compensate in bulk": admin_client.get(reverse("admin:sagas_saga_bulk")),
    }
    for here, page in pages.items():
        assertHTMLEqual(breadcrumbs(page), djangos.replace(title, escape(here)))

    # On Django 6.1 and later, as its change_form.html writes them: a list, the page last.
    links = re.findall(r"<a href=[^>]*>[^<]*</a>", djangos)
    assert len(links) == 3, djangos  # home, the app, the saga list
    monkeypatch.setattr(saga_admin, "BREADCRUMBS_AS_LIST", True)
    listed = "".join(f"<li>{link}</li>" for link in links)
    expected = f'<ol class="breadcrumbs">{listed}<li aria-current="page">Retry</li></ol>'
    page = admin_client.post(CHANGELIST, action_post("retry_sagas", saga))
    assertHTMLEqual(breadcrumbs(page), expected)


def test_step_diagram_lays_out_steps_forward_and_their_compensations_backward():
    """The diagram's grid from unsaved rows: a step failed after two completed, both undone;
    names and errors are escaped by the template."""
    from sagas.admin.diagram import diagram_cells, step_diagram

    now = timezone.now()
    steps = [
        SagaStep(
            index=0,
            name="reserve <b>",
            status="compensated",
            attempts=1,
            started_at=now,
            finished_at=now,
            compensated_at=now,
        ),
        SagaStep(
            index=1,
            name="charge",
            status="compensated",
            attempts=2,
            started_at=now,
            finished_at=now,
            compensated_at=now,
        ),
        SagaStep(
            index=2,
            name="ship",
            status="failed",
            attempts=3,
            started_at=now,
            finished_at=now,
            error_code="<unsupported>",
            error_message="no route",
        ),
        SagaStep(index=3, name="notify", status="pending"),
    ]
    cells = {(cell.row, cell.column): cell for cell in diagram_cells(steps)}
    assert [cells[1, c].node.number for c in (2, 4, 6, 8)] == [1, 2, 3, 4]
    assert [cells[1, c].arrow for c in (3, 5, 7)] == ["forward"] * 3
    assert [cells[2, c].node.name for c in (2, 4)] == ["reserve <b>", "charge"]
    assert cells[2, 3].arrow == cells[2, 5].arrow == "undo"  # from the failed step leftwards
    assert (2, 6) not in cells and (2, 8) not in cells

    html = step_diagram(steps)
    assert html.count("saga-node saga-node-compensated") == 2
    assert html.count("saga-node saga-node-completed") == 2  # drawn done, their undo below
    assert "reserve &lt;b&gt;" in html and "<b>" not in html
    assert '<span class="saga-node-error">&lt;unsupported&gt;</span>' in html
    assert (
        '<span class="saga-fact">Failed</span> · <span class="saga-fact">3 attempts</span>' in html
    )
    assert ">compensation</div>" in html
