"""Business keys: a definition names the object a saga is about; the admin and the API find an
object's sagas by it; a definition may allow one saga in flight per key."""

from __future__ import annotations

import io
import uuid

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from rest_framework.test import APIClient

from orders.services import order_submit
from sagas.definitions import KEY_MAX_LENGTH, SagaDefinition, Step, register
from sagas.exceptions import DefinitionError, SagaKeyError, SagaKeyInFlight
from sagas.models import Saga
from sagas.services import saga_start
from tests.conftest import ADDRESS, lose_messages
from tests.factories import OrderFactory, ProductFactory, UserFactory
from tests.sagadefs import record, undo

CHANGELIST = reverse("admin:sagas_saga_changelist")
STEPS = [Step("only", record, undo)]

register(SagaDefinition("keyed_one_at_a_time", STEPS, key="account.id", one_in_flight_per_key=True))
register(SagaDefinition("keyed_many_at_a_time", STEPS, key=lambda input: input["account"]["id"]))


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def submit(customer=None) -> Saga:
    product = ProductFactory()
    saga, _ = order_submit(
        customer=customer,
        items=[{"sku": product.sku, "quantity": 1}],
        shipping_address=ADDRESS,
        payment_token="tok_ok",
    )
    return saga


def test_a_definition_takes_the_key_from_the_input_by_a_path_or_a_function():
    by_path = SagaDefinition("by_path", STEPS, key="account.id")
    assert by_path.key_of({"account": {"id": 42}}) == "42"
    order_id = uuid.uuid4()
    assert SagaDefinition("uuid", STEPS, key="order").key_of({"order": order_id}) == str(order_id)
    by_function = SagaDefinition("by_function", STEPS, key=lambda input: input.get("email"))
    assert by_function.key_of({"email": "ada@example.com"}) == "ada@example.com"
    assert by_function.key_of({}) is None  # a function may say "no key"
    assert SagaDefinition("unkeyed", STEPS).key_of({"id": 1}) is None

    for bad_input, problem in [
        ({"account": {}}, "the input has no 'account.id'"),
        ({"account": 3}, "the input has no 'account.id'"),
        ({"account": {"id": None}}, "not NoneType"),
        ({"account": {"id": [1]}}, "not list"),
        ({"account": {"id": True}}, "not bool"),
        ({"account": {"id": ""}}, f"1 to {KEY_MAX_LENGTH} characters"),
        ({"account": {"id": "x" * (KEY_MAX_LENGTH + 1)}}, f"1 to {KEY_MAX_LENGTH} characters"),
    ]:
        with pytest.raises(SagaKeyError, match=problem):
            by_path.key_of(bad_input)

    with pytest.raises(DefinitionError, match="one_in_flight_per_key needs a key"):
        SagaDefinition("no_key", STEPS, one_in_flight_per_key=True)
    with pytest.raises(DefinitionError, match="is not a path"):
        SagaDefinition("bad_path", STEPS, key="account..id")


def test_a_saga_stores_its_key_in_the_statement_that_starts_it(db):
    with CaptureQueriesContext(connection) as queries:
        saga = submit()
    # The statement stores the definition version too (`WITH dv AS (INSERT ...`), then the saga.
    inserts = [q["sql"] for q in queries if q["sql"].lstrip().startswith("WITH dv AS (INSERT")]
    assert len(inserts) == 1 and "business_key" in inserts[0]
    assert Saga.objects.get(pk=saga.pk).business_key == saga.input["order_id"]
    unkeyed, _ = saga_start(name="snapshot_demo", input={})
    assert Saga.objects.get(pk=unkeyed.pk).business_key is None


@pytest.mark.django_db(transaction=True)  # the start commits on its own, as in production
def test_one_saga_in_flight_per_key(monkeypatch):
    lose_messages(monkeypatch)
    account = {"account": {"id": 7}}
    first, created = saga_start(name="keyed_one_at_a_time", input=account, idempotency_key="k1")
    assert created and first.business_key == "7"

    with pytest.raises(SagaKeyInFlight, match=r"keyed_one_at_a_time with the key '7'") as caught:
        saga_start(name="keyed_one_at_a_time", input=account)
    assert caught.value.saga_id == first.pk
    assert Saga.objects.count() == 1
    # A repeated start (its idempotency key) is still the first saga, not an error.
    assert saga_start(name="keyed_one_at_a_time", input=account, idempotency_key="k1") == (
        first,
        False,
    )
    # Other keys, and other definitions with the same key, are not held up.
    saga_start(name="keyed_one_at_a_time", input={"account": {"id": 8}})
    saga_start(name="keyed_many_at_a_time", input=account)
    saga_start(name="keyed_many_at_a_time", input=account)

    # Within a caller's transaction, that transaction goes on.
    with transaction.atomic():
        with pytest.raises(SagaKeyInFlight):
            saga_start(name="keyed_one_at_a_time", input=account)
        assert Saga.objects.filter(business_key="7").count() == 3

    # A failed saga waits for an operator: still in flight. A finished one is not.
    Saga.objects.filter(pk=first.pk).update(status="failed")
    with pytest.raises(SagaKeyInFlight):
        saga_start(name="keyed_one_at_a_time", input=account)
    Saga.objects.filter(pk=first.pk).update(status="compensated")
    again, created = saga_start(name="keyed_one_at_a_time", input=account)
    assert created and again.pk != first.pk

    with pytest.raises(SagaKeyError, match=r"the input has no 'account\.id'"):
        saga_start(name="keyed_one_at_a_time", input={})


# The admin's links to a saga's objects read the payment gateway's database too.
@pytest.mark.django_db(databases=["default", "gateway"])
def test_the_admin_finds_the_sagas_of_a_key(admin_client):
    saga, other = submit(), submit()
    order_id = saga.input["order_id"]

    page = admin_client.get(CHANGELIST, {"q": order_id})
    assert [s.pk for s in page.context["cl"].result_list] == [saga.pk]
    assert page.context["cl"].search_help_text.endswith(", or by key.")
    assert order_id in page.content.decode()  # the list's key column
    assert admin_client.get(CHANGELIST, {"q": order_id[:13]}).context["cl"].result_count == 0

    page = admin_client.get(CHANGELIST, {"business_key": order_id})
    assert [s.pk for s in page.context["cl"].result_list] == [saga.pk]
    detail = admin_client.get(reverse("admin:sagas_saga_change", args=[saga.pk]))
    assert order_id in detail.content.decode()
    assert other.input["order_id"] not in detail.content.decode()


@pytest.mark.django_db(databases=["default", "gateway"])
def test_the_order_admin_shows_the_sagas_of_the_order(admin_client):
    saga = submit()
    order = OrderFactory(id=saga.input["order_id"], saga=saga)
    page = admin_client.get(reverse("admin:orders_order_change", args=[order.pk])).content.decode()
    assert "sagas of this order" in page.lower()
    assert reverse("admin:sagas_saga_change", args=[saga.pk]) in page
    assert f"{CHANGELIST}?business_key={order.pk}" in page

    lone = OrderFactory()
    page = admin_client.get(reverse("admin:orders_order_change", args=[lone.pk])).content.decode()
    assert "sagas of this order" in page.lower()
    assert f"?business_key={lone.pk}" not in page


def test_the_api_filters_sagas_by_key(db):
    owner, stranger = UserFactory(), UserFactory()
    saga, _ = submit(owner), submit(owner)
    order_id = saga.input["order_id"]
    staff = APIClient()
    staff.force_authenticate(UserFactory(is_staff=True))

    found = staff.get("/api/sagas/", {"key": order_id}).json()
    assert [s["id"] for s in found["results"]] == [str(saga.pk)]
    assert found["results"][0]["key"] == order_id
    assert staff.get("/api/sagas/", {"key": order_id[:13]}).json()["count"] == 0
    assert staff.get(f"/api/sagas/{saga.pk}/").json()["key"] == order_id

    # A user's own sagas only, as without the filter.
    for user, count in ((owner, 1), (stranger, 0)):
        client = APIClient()
        client.force_authenticate(user)
        assert client.get("/api/sagas/", {"key": order_id}).json()["count"] == count


@pytest.mark.django_db(transaction=True)
def test_turning_one_in_flight_per_key_on_covers_the_sagas_already_in_flight(monkeypatch):
    """Issue 17, case 6: sagas that started before a deploy set `one_in_flight_per_key` are
    outside its unique index. `sagas.W009` finds them; `sagas_one_in_flight` brings them under
    it, but for a key that already has two in flight, which it reports for an operator."""
    from django.core import checks
    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.db.models.expressions import RawSQL

    lose_messages(monkeypatch)
    name = "one_per_account"

    def started_before_the_option(account: int) -> Saga:
        saga, _ = saga_start(name=name, input={"account": {"id": account}})
        without = RawSQL("options - 'one_in_flight_per_key'", [])
        Saga.objects.filter(pk=saga.pk).update(options=without)
        return saga

    first, second = started_before_the_option(1), started_before_the_option(1)
    alone = started_before_the_option(2)

    def warnings() -> list[str]:
        found = checks.run_checks(databases=["default"], tags=[checks.Tags.database])
        return [message.msg for message in found if message.id == "sagas.W009"]

    assert warnings() == [
        f"3 unfinished sagas of {name} started before one_in_flight_per_key was set: its "
        "unique index leaves them out, and a second saga for one of their keys could start."
    ]
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 keys have more than one saga in flight"):
        call_command("sagas_one_in_flight", name, stdout=out)
    assert out.getvalue().splitlines() == [
        f"1 unfinished sagas of {name} brought under the index.",
        f"key '1': 2 sagas in flight: {first.pk}, {second.pk}",
    ]
    with pytest.raises(SagaKeyInFlight) as caught:
        saga_start(name=name, input={"account": {"id": 2}})
    assert caught.value.saga_id == alone.pk

    Saga.objects.filter(pk=second.pk).update(status="compensated")  # an operator settled it
    out = io.StringIO()
    call_command("sagas_one_in_flight", name, stdout=out)
    assert out.getvalue() == f"1 unfinished sagas of {name} brought under the index.\n"
    assert warnings() == []
    with pytest.raises(SagaKeyInFlight):
        saga_start(name=name, input={"account": {"id": 1}})

    with pytest.raises(CommandError, match="does not set one_in_flight_per_key"):
        call_command("sagas_one_in_flight", "three_steps")
    with pytest.raises(CommandError, match="no saga definition named 'nope'"):
        call_command("sagas_one_in_flight", "nope")
