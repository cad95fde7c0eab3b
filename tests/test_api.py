"""The REST API: authentication and visibility, input validation, idempotency, the operator
actions, the health check and the OpenAPI schema; sagas run on real workers where they run."""

from __future__ import annotations

import copy
import importlib
import io
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import cache
from django.core.management import call_command
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext, override_settings
from django.urls import clear_url_caches
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import ParseError
from rest_framework.test import APIClient

from orders.api import LimitedJSONParser, RequestTooLarge, sagas_of_order
from orders.models import Order
from orders.services import order_submit
from payments.gateway import gateway_recover
from sagas.api.parsers import MAX_JSON_DEPTH, BoundedJSONParser
from sagas.models import Saga, SagaStep
from tests.conftest import ADDRESS, wait_final
from tests.factories import (
    OrderFactory,
    OrderLineFactory,
    ProductFactory,
    UserFactory,
    make_operator,
)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """The factories hash a password per user: with the default hasher that takes seconds."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def payload(sku: str = "SKU-API", quantity: Any = 1, token: str = "tok_ok") -> dict[str, Any]:
    return {
        "items": [{"sku": sku, "quantity": quantity}],
        "shipping_address": dict(ADDRESS),
        "payment_token": token,
    }


def client_for(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def post_order(client: APIClient, body: Any, **headers: str):
    return client.post(
        "/api/orders/", data=json.dumps(body), content_type="application/json", **headers
    )


def submit_for(user, product, token: str = "tok_ok") -> Saga:
    saga, _ = order_submit(
        customer=user,
        items=[{"sku": product.sku, "quantity": 1}],
        shipping_address=ADDRESS,
        payment_token=token,
    )
    return saga


# -- authentication and visibility --------------------------------------------------------------


@pytest.fixture
def world(db):
    """Users A and B with an order and a saga each (not run: no workers), and a staff user."""
    product = ProductFactory(sku="SKU-API")
    user_a, user_b = UserFactory(), UserFactory()
    staff = make_operator()
    objects: dict[str, Any] = {
        "a": user_a,
        "b": user_b,
        "staff": staff,
        "staff_without_actions": UserFactory(is_staff=True),
        "product": product,
    }
    for name, user in (("a", user_a), ("b", user_b)):
        saga = submit_for(user, product)
        order = OrderFactory(id=saga.input["order_id"], customer=user, saga=saga)
        OrderLineFactory(order=order, sku=product.sku)
        objects[f"saga_{name}"], objects[f"order_{name}"] = saga, order
    return objects


def endpoints(w: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, method, path) of every endpoint, about user A's objects."""
    saga, order = w["saga_a"].pk, w["order_a"].pk
    return [
        ("orders", "get", "/api/orders/"),
        ("order", "get", f"/api/orders/{order}/"),
        ("submit", "post", "/api/orders/"),
        ("sagas", "get", "/api/sagas/"),
        ("saga", "get", f"/api/sagas/{saga}/"),
        ("retry", "post", f"/api/sagas/{saga}/retry/"),
        ("resolve", "post", f"/api/sagas/{saga}/steps/0/resolve/"),
        ("plan", "get", f"/api/sagas/{saga}/plan/?action=retry"),
        ("compensate", "post", f"/api/sagas/{saga}/compensate/"),
        ("products", "get", "/api/products/"),
        ("product", "get", f"/api/products/{w['product'].sku}/"),
        ("healthz", "get", "/healthz"),
        ("schema", "get", "/api/schema/"),
        ("docs", "get", "/api/docs/"),
    ]


# Expected status per role. User B sees none of A's objects; only staff with the action's
# permission act on sagas (as in the admin). The saga has not run (pending): retry and resolve
# are refused with 409, compensate is accepted.
MATRIX = {
    "anonymous": {
        "orders": 401, "order": 401, "submit": 401, "sagas": 401, "saga": 401, "retry": 401,
        "resolve": 401, "plan": 401, "compensate": 401, "products": 401, "product": 401,
        "healthz": 200, "schema": 200, "docs": 200,
    },
    "a": {
        "orders": 200, "order": 200, "submit": 202, "sagas": 200, "saga": 200, "retry": 403,
        "resolve": 403, "plan": 403, "compensate": 403, "products": 200, "product": 200,
        "healthz": 200, "schema": 200, "docs": 200,
    },
    "b": {
        "orders": 200, "order": 404, "submit": 202, "sagas": 200, "saga": 404, "retry": 403,
        "resolve": 403, "plan": 403, "compensate": 403, "products": 200, "product": 200,
        "healthz": 200, "schema": 200, "docs": 200,
    },
    "staff": {
        "orders": 200, "order": 200, "submit": 202, "sagas": 200, "saga": 200, "retry": 409,
        "resolve": 409, "plan": 200, "compensate": 202, "products": 200, "product": 200,
        "healthz": 200, "schema": 200, "docs": 200,
    },
    "staff_without_actions": {
        "orders": 200, "order": 200, "submit": 202, "sagas": 200, "saga": 200, "retry": 403,
        "resolve": 403, "plan": 200, "compensate": 403, "products": 200, "product": 200,
        "healthz": 200, "schema": 200, "docs": 200,
    },
}  # fmt: skip


@pytest.mark.parametrize("role", list(MATRIX))
def test_auth_matrix(world, role):
    client = client_for(None if role == "anonymous" else world[role])
    got = {}
    for label, method, path in endpoints(world):
        if method == "post":
            body = json.dumps(payload()) if label == "submit" else ""
            response = client.post(path, data=body, content_type="application/json")
        else:
            response = client.get(path)
        got[label] = response.status_code
    assert got == MATRIX[role]


def test_lists_show_only_own_objects_to_users_and_everything_to_staff(world):
    def ids(user, path):
        results = client_for(user).get(path).json()["results"]
        return {item["id"] for item in results}

    mine = {str(world["order_a"].pk)}
    assert ids(world["a"], "/api/orders/") == mine
    assert ids(world["a"], "/api/sagas/") == {str(world["saga_a"].pk)}
    both_orders = {str(world["order_a"].pk), str(world["order_b"].pk)}
    assert ids(world["staff"], "/api/orders/") == both_orders
    assert ids(world["staff"], "/api/sagas/") == {str(world["saga_a"].pk), str(world["saga_b"].pk)}


def test_token_authentication(world):
    anonymous = APIClient()
    wrong = anonymous.post(
        "/api/auth/token/", {"username": world["a"].username, "password": "nope"}, format="json"
    )
    assert wrong.status_code == 400
    assert "token" not in wrong.json()
    response = anonymous.post(
        "/api/auth/token/",
        {"username": world["a"].username, "password": "correct horse battery staple"},
        format="json",
    )
    assert response.status_code == 200
    token = response.json()["token"]
    assert token == Token.objects.get(user=world["a"]).key
    authed = APIClient(HTTP_AUTHORIZATION=f"Token {token}")
    assert authed.get("/api/orders/").status_code == 200
    bad = APIClient(HTTP_AUTHORIZATION="Token not-a-token")
    assert bad.get("/api/orders/").status_code == 401


def test_session_authentication(world):
    client = APIClient()
    client.force_login(world["a"])
    assert client.get("/api/sagas/").status_code == 200


def test_saga_filters_and_ordering(world):
    staff = client_for(world["staff"])
    Saga.objects.filter(pk=world["saga_b"].pk).update(status="failed")
    failed = staff.get("/api/sagas/?status=failed").json()
    assert [s["id"] for s in failed["results"]] == [str(world["saga_b"].pk)]
    assert staff.get("/api/sagas/?name=nothing-by-this-name").json()["count"] == 0
    assert staff.get("/api/sagas/?name=order_fulfilment").json()["count"] == 2
    assert staff.get("/api/sagas/?status=bogus").status_code == 400
    oldest_first = staff.get("/api/sagas/?ordering=created_at").json()["results"]
    assert [s["id"] for s in oldest_first] == [str(world["saga_a"].pk), str(world["saga_b"].pk)]
    page = staff.get("/api/sagas/?page_size=1").json()
    assert page["count"] == 2 and len(page["results"]) == 1 and page["next"]


def test_the_saga_list_counts_no_further_than_past_its_page(world, settings):
    """On a table of millions of sagas a list counts what it shows, not the table: `count` is
    exact up to SAGAS_LIST_COUNT_LIMIT sagas past the page asked for, then that bound."""
    from tests.factories import saga_rows

    settings.SAGAS_LIST_COUNT_LIMIT = 2
    for _ in range(4):
        saga_rows("three_steps", status="completed")  # 6 sagas with the world's two
    staff = client_for(world["staff"])
    with CaptureQueriesContext(connection) as queries:
        first = staff.get("/api/sagas/?page_size=1").json()
    assert (first["count"], len(first["results"]), first["previous"]) == (3, 1, None)
    assert first["next"].endswith("page=2&page_size=1")
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 4" in sql for sql in counts), counts
    third = staff.get("/api/sagas/?page_size=1&page=3").json()
    assert third["count"] == 5 and third["next"]
    last = staff.get("/api/sagas/?page_size=1&page=6").json()
    assert (last["count"], last["next"]) == (6, None)
    assert staff.get("/api/sagas/?page_size=1&page=7").status_code == 404
    assert staff.get("/api/sagas/?page_size=100&page=417316848291199320064").status_code == 404
    assert staff.get("/api/sagas/?page_size=5").json()["count"] == 6


def test_saga_detail_shape(world):
    body = client_for(world["a"]).get(f"/api/sagas/{world['saga_a'].pk}/").json()
    assert body["status"] == "running"  # created running: its first stage is a step
    assert body["error"] is None
    assert [s["name"] for s in body["steps"]] == [
        "create_order",
        "charge_payment",
        "reserve_inventory",
        "payment_confirmation",
        "schedule_shipment",
    ]
    assert set(body["steps"][0]) == {
        "index", "name", "kind", "status", "attempts", "error", "event", "members", "started_at",
        "due_at", "finished_at", "compensated_at",
    }  # fmt: skip
    assert (body["steps"][0]["kind"], body["steps"][0]["event"]) == ("step", None)
    assert body["steps"][0]["members"] is None  # a group's only
    assert [e["kind"] for e in body["events"]] == ["saga_started"]
    assert "input" not in body  # it carries the payment token


def test_plan_preview(world):
    staff = client_for(world["staff"])
    saga = world["saga_a"].pk
    plan = staff.get(f"/api/sagas/{saga}/plan/?action=compensate").json()
    assert plan["allowed"] is True and plan["action"] == "compensate"
    assert staff.get(f"/api/sagas/{saga}/plan/?action=resolve").status_code == 400
    assert staff.get(f"/api/sagas/{saga}/plan/?action=explode").status_code == 400
    resolve = staff.get(f"/api/sagas/{saga}/plan/?action=resolve&index=99").json()
    assert resolve["allowed"] is False


@pytest.mark.parametrize(
    ("status", "direction", "why"),
    [
        ("compensated", "backward", "A compensated saga cannot be compensated."),
        ("completed", "forward", "A completed saga cannot be compensated."),
        ("compensating", "backward", "The saga is already compensating."),
        ("failed", "backward", "The saga failed while compensating: retry resumes"),
    ],
)
def test_a_refused_compensation_says_why_in_the_sagas_own_words(world, status, direction, why):
    staff = client_for(world["staff"])
    saga = world["saga_a"]
    Saga.objects.filter(pk=saga.pk).update(status=status, direction=direction)
    plan = staff.get(f"/api/sagas/{saga.pk}/plan/?action=compensate").json()
    assert plan["allowed"] is False and plan["reason"].startswith(why)
    response = staff.post(f"/api/sagas/{saga.pk}/compensate/")
    assert response.status_code == 409 and why in json.dumps(response.json())


def test_unknown_ids_are_404(world):
    staff = client_for(world["staff"])
    for path in (
        "/api/orders/00000000-0000-0000-0000-000000000000/",
        "/api/orders/not-a-uuid/",
        "/api/sagas/00000000-0000-0000-0000-000000000000/",
        "/api/sagas/00000000-0000-0000-0000-000000000000/retry/",
        "/api/sagas/0000000000000000000000000000000z/",
        "/api/products/NO-SUCH-SKU/",
    ):
        method = staff.post if path.endswith("retry/") else staff.get
        response = method(path)
        assert response.status_code == 404, path
        # Ids that cannot be ids do not even match a route: Django's own 404 page answers.
        if "-0000-" in path or "SKU" in path:
            assert (
                response.json() == {"detail": "No Order matches the given query."}
                or (response.json()["detail"])
            )


# -- submitting an order: validation, idempotency, throttling ----------------------------------


@pytest.fixture
def customer(db):
    ProductFactory(sku="SKU-API", price=Decimal("12.50"))
    ProductFactory(sku="SKU-TWO", price=Decimal("3.00"))
    return UserFactory()


def test_submission_returns_the_pending_order_and_its_saga(customer):
    body = {
        **payload(quantity=2),
        "items": [*payload(quantity=2)["items"], {"sku": "SKU-TWO", "quantity": 1}],
    }
    response = post_order(client_for(customer), body)

    assert response.status_code == 202
    order = response.json()
    saga = Saga.objects.get()
    assert order["id"] == saga.input["order_id"]
    assert order["status"] == "pending"
    assert order["total"] == "28.00"
    assert order["currency"] == "EUR"
    assert order["lines"] == [
        {"sku": "SKU-API", "quantity": 2, "unit_price": "12.50", "line_total": "25.00"},
        {"sku": "SKU-TWO", "quantity": 1, "unit_price": "3.00", "line_total": "3.00"},
    ]
    assert order["saga"]["id"] == str(saga.pk)
    assert order["saga"]["status"] == "running"
    assert order["saga"]["url"].endswith(f"/api/sagas/{saga.pk}/")
    assert order["payment"] is None and order["shipment"] is None and order["reservations"] == []
    assert response["Location"].endswith(f"/api/orders/{order['id']}/")
    assert type(response["Location"]) is str  # as WSGI requires (wsgiref refuses a subclass)
    assert saga.created_by == customer
    # Before the first step has made the row, the order is already readable by its customer.
    assert not Order.objects.exists()
    detail = client_for(customer).get(f"/api/orders/{order['id']}/")
    assert detail.status_code == 200 and detail.json()["status"] == "pending"
    assert client_for(UserFactory()).get(f"/api/orders/{order['id']}/").status_code == 404


def with_item(**item: Any) -> dict[str, Any]:
    return {**payload(), "items": [{"sku": "SKU-API", "quantity": 1, **item}]}


def with_address(**fields: Any) -> dict[str, Any]:
    return {**payload(), "shipping_address": {**ADDRESS, **fields}}


def without(key: str) -> dict[str, Any]:
    body = payload()
    del body[key]
    return body


def without_address(key: str) -> dict[str, Any]:
    body = payload()
    del body["shipping_address"][key]
    return body


BAD_INPUT = {
    "unknown sku": (with_item(sku="NO-SUCH-SKU"), ["items", "0", "sku"]),
    "quantity 0": (with_item(quantity=0), ["items", "0", "quantity"]),
    "quantity negative": (with_item(quantity=-1), ["items", "0", "quantity"]),
    "quantity over the maximum": (with_item(quantity=101), ["items", "0", "quantity"]),
    "quantity as a string": (with_item(quantity="2"), ["items", "0", "quantity"]),
    "quantity as a float": (with_item(quantity=2.0), ["items", "0", "quantity"]),
    "quantity as a boolean": (with_item(quantity=True), ["items", "0", "quantity"]),
    "quantity huge": (with_item(quantity=10**30), ["items", "0", "quantity"]),
    "quantity null": (with_item(quantity=None), ["items", "0", "quantity"]),
    "sku as a number": (with_item(sku=123), ["items", "0", "sku"]),
    "sku missing": ({**payload(), "items": [{"quantity": 1}]}, ["items", "0", "sku"]),
    "item not an object": ({**payload(), "items": ["SKU-API"]}, ["items", "0"]),
    "unknown item field": (with_item(price="0.01"), ["items", "0", "price"]),
    "no items": ({**payload(), "items": []}, ["items"]),
    "items not a list": ({**payload(), "items": {"sku": "SKU-API"}}, ["items"]),
    "too many lines": (
        {**payload(), "items": [{"sku": f"S-{i}", "quantity": 1} for i in range(51)]},
        ["items"],
    ),
    "duplicate skus": (
        {**payload(), "items": [{"sku": "SKU-API", "quantity": 1}] * 2},
        ["items", "1", "sku"],
    ),
    "missing items": (without("items"), ["items"]),
    "missing address": (without("shipping_address"), ["shipping_address"]),
    "missing token": (without("payment_token"), ["payment_token"]),
    "blank token": ({**payload(), "payment_token": " "}, ["payment_token"]),
    "token as a number": ({**payload(), "payment_token": 42}, ["payment_token"]),
    "token too long": ({**payload(), "payment_token": "t" * 65}, ["payment_token"]),
    "token with a NUL": ({**payload(), "payment_token": "tok\x00ok"}, ["payment_token"]),
    "missing city": (without_address("city"), ["shipping_address", "city"]),
    "lowercase country": (with_address(country="gb"), ["shipping_address", "country"]),
    "three-letter country": (with_address(country="GBR"), ["shipping_address", "country"]),
    "digit in country": (with_address(country="G1"), ["shipping_address", "country"]),
    "country as a number": (with_address(country=12), ["shipping_address", "country"]),
    "country with a newline": (with_address(country="G\nB"), ["shipping_address", "country"]),
    "address not an object": ({**payload(), "shipping_address": "London"}, ["shipping_address"]),
    "unknown field": ({**payload(), "currency": "USD"}, ["currency"]),
    "body is a list": ([payload()], ["non_field_errors"]),
    "body is empty object": ({}, ["items"]),
}


def error_at(body: Any, path: list[str]) -> Any:
    for key in path:
        body = body[int(key)] if isinstance(body, list) else body[key]
    return body


@pytest.mark.parametrize(("body", "path"), list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_bad_input_is_a_400_with_field_errors_and_creates_nothing(customer, body, path):
    response = post_order(client_for(customer), body)
    assert response.status_code == 400, response.content
    assert error_at(response.json(), path)
    assert not Saga.objects.exists()
    assert not Order.objects.exists()


@pytest.mark.parametrize(
    ("data", "content_type", "expected"),
    [
        ("items=1", "application/x-www-form-urlencoded", 415),
        ("<order/>", "application/xml", 415),
        (json.dumps(payload()), "text/plain", 415),
        (json.dumps(payload()), "", 415),
        ('{"items": [', "application/json", 400),
        ('{"items": NaN}', "application/json", 400),
        (
            '{"items": [{"sku": "SKU-API", "quantity": 1' + "0" * 5000 + "}]}",
            "application/json",
            400,
        ),
        (b"\xff\xfe not utf-8", "application/json", 400),
    ],
    ids=["form", "xml", "text", "no content type", "malformed", "nan", "5000 digits", "not utf-8"],
)
def test_unparseable_bodies_are_refused(customer, data, content_type, expected):
    response = client_for(customer).generic(
        "POST", "/api/orders/", data=data, content_type=content_type
    )
    assert response.status_code == expected
    assert "detail" in response.json()
    assert not Saga.objects.exists()


# Bodies that made the JSON parser itself fail (a RecursionError was a 500), and bodies that
# parse to what no endpoint takes: each is a 4xx with a JSON error on every endpoint that reads
# JSON, and creates nothing. In the numbers' bodies, VALUE stands in a field the endpoint reads.
DEPTH = 5000
HOSTILE_BODIES = {
    "unclosed arrays": b"[" * DEPTH,
    "nested arrays": b"[" * DEPTH + b"]" * DEPTH,
    "nested objects": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    "nested in a field": b'{"items": ' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "1e400": b"VALUE=1e400",
    "-1e400": b"VALUE=-1e400",
    "10**400": b"VALUE=" + str(10**400).encode(),
    "integer of 10,000 digits": b"VALUE=1" + b"0" * 10_000,
    "integer of 100,000 digits": b"VALUE=1" + b"0" * 100_000,
    "NaN": b"VALUE=NaN",
    "Infinity": b"VALUE=Infinity",
    "-Infinity": b"VALUE=-Infinity",
    "invalid utf-8": b'VALUE="tok_\xff\xfe"',
    "a list": b"[1, 2]",
    "a string": b'"order"',
    "a number": b"42",
    "null": b"null",
    "true": b"true",
}
# Where VALUE goes: an order's quantity, a token request's username.
VALUE_IN = {
    "/api/orders/": json.dumps(payload(quantity=0)).replace('"quantity": 0', '"quantity": VALUE'),
    "/api/auth/token/": '{"username": VALUE, "password": "correct horse battery staple"}',
}


def hostile_body(path: str, body: bytes) -> bytes:
    if not body.startswith(b"VALUE="):
        return body
    return VALUE_IN[path].encode().replace(b"VALUE", body.removeprefix(b"VALUE="))


@pytest.mark.parametrize("path", list(VALUE_IN))
@pytest.mark.parametrize("body", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_hostile_json_bodies_are_a_4xx_and_create_nothing(customer, path, body):
    UserFactory(username="inf")  # what 1e400 became, as a username, before it was refused
    response = client_for(customer).generic(
        "POST", path, data=hostile_body(path, body), content_type="application/json"
    )
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    assert response.json()
    assert not Saga.objects.exists() and not SagaStep.objects.exists()
    assert not Order.objects.exists()
    assert not Token.objects.exists()


@pytest.mark.parametrize("path", list(VALUE_IN))
def test_deep_nesting_is_a_400_that_says_so(customer, path):
    nested = b'{"a":' * DEPTH + b"1" + b"}" * DEPTH
    response = client_for(customer).generic(
        "POST", path, data=nested, content_type="application/json"
    )
    assert response.status_code == 400
    assert "nested" in response.json()["detail"]


@pytest.mark.parametrize("path", list(VALUE_IN))
def test_a_non_finite_number_is_a_400_that_says_so(customer, path):
    body = hostile_body(path, b"VALUE=1e400")
    response = client_for(customer).generic(
        "POST", path, data=body, content_type="application/json"
    )
    assert response.status_code == 400
    assert "1e400" in response.json()["detail"]


def test_the_parser_counts_nesting_outside_strings_only():
    parser = BoundedJSONParser()
    deepest = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parser.parse(io.BytesIO(deepest)) == json.loads(deepest)
    brackets = {"note": '[[[{{{ \\" [[[' * 100, "ok": [1.5, -2, 10**30]}
    assert parser.parse(io.BytesIO(json.dumps(brackets).encode())) == brackets
    with pytest.raises(ParseError, match="nested deeper"):
        parser.parse(io.BytesIO(b"[" + deepest + b"]"))
    with pytest.raises(ParseError, match="not a text encoding"):
        parser.parse(io.BytesIO(b"[]"), parser_context={"encoding": "base64"})


def test_a_body_over_the_size_limit_is_a_413(customer):
    body = {**payload(), "padding": "x" * settings.ORDERS_MAX_BODY_BYTES}
    response = post_order(client_for(customer), body)
    assert response.status_code == 413
    assert "bytes" in response.json()["detail"]
    assert not Saga.objects.exists()


def test_the_size_limit_holds_whatever_content_length_says(customer):
    """A body longer than its declared length is read no further than the limit."""
    stream = io.BytesIO(b"[" + b"1," * settings.ORDERS_MAX_BODY_BYTES + b"1]")
    with pytest.raises(RequestTooLarge):
        LimitedJSONParser().parse(stream)


@pytest.mark.parametrize("key", ["has spaces", "k" * 101, "ключ"])
def test_a_malformed_idempotency_key_is_refused(customer, key):
    response = post_order(client_for(customer), payload(), HTTP_IDEMPOTENCY_KEY=key)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()
    assert not Saga.objects.exists()


def test_idempotency_key_returns_the_first_order_to_the_same_user_only(customer):
    client = client_for(customer)
    first = post_order(client, payload(), HTTP_IDEMPOTENCY_KEY="order-1")
    again = post_order(client, payload(), HTTP_IDEMPOTENCY_KEY="order-1")
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["saga"]["id"] == first.json()["saga"]["id"]
    assert Saga.objects.count() == 1

    other = post_order(client_for(UserFactory()), payload(), HTTP_IDEMPOTENCY_KEY="order-1")
    assert other.status_code == 202
    assert other.json()["id"] != first.json()["id"]
    assert Saga.objects.count() == 2

    # Without a key, every submission is a new order.
    assert post_order(client, payload()).status_code == 202
    assert Saga.objects.count() == 3


def test_order_submission_is_throttled_per_user(customer):
    rest_framework = copy.deepcopy(settings.REST_FRAMEWORK)
    rest_framework["DEFAULT_THROTTLE_RATES"]["orders"] = "2/minute"
    cache.clear()
    try:
        with override_settings(REST_FRAMEWORK=rest_framework):
            client = client_for(customer)
            codes = [post_order(client, {}).status_code for _ in range(3)]
            assert codes == [400, 400, 429]
            assert post_order(client_for(UserFactory()), {}).status_code == 400
            # Reading is not throttled.
            assert client.get("/api/orders/").status_code == 200
    finally:
        cache.clear()


# -- query counts ---------------------------------------------------------------------------------


def count_queries(client: APIClient, path: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    assert response.status_code == 200
    return len(queries)


@pytest.mark.parametrize("path", ["/api/orders/", "/api/sagas/", "/api/products/"])
def test_list_queries_do_not_grow_with_the_page(db, path):
    staff = client_for(UserFactory(is_staff=True))
    product = ProductFactory(sku="SKU-API")
    user = UserFactory()

    def add_rows(n: int) -> None:
        for _ in range(n):
            saga = submit_for(user, product)
            order = OrderFactory(id=saga.input["order_id"], customer=user, saga=saga)
            OrderLineFactory(order=order, sku="SKU-1")
            OrderLineFactory(order=order, sku="SKU-2")
            ProductFactory()

    add_rows(1)
    count_queries(staff, path)  # a process reads each definition version once
    one = count_queries(staff, path)
    add_rows(9)
    ten = count_queries(staff, path)
    assert one == ten


def test_an_order_not_created_yet_is_looked_up_through_its_index(world):
    """The lookup of an order's saga must match saga_business_key_idx, or it scans every saga."""
    a = client_for(world["a"])
    order_id = world["saga_a"].input["order_id"]
    Order.objects.filter(pk=order_id).delete()  # as before the saga's first step has run
    assert a.get(f"/api/orders/{order_id}/").json()["id"] == order_id
    assert a.get(f"/api/orders/{uuid.uuid4()}/").status_code == 404

    sql, params = sagas_of_order(uuid.uuid4())[:1].query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # the test table is tiny
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    # Searched by the index (an Index Cond), not merely walked instead of the table.
    assert "saga_business_key_idx" in plan and "Index Cond" in plan, plan


def test_detail_queries_do_not_grow_with_the_saga(world):
    staff = client_for(world["staff"])
    order_path = f"/api/orders/{world['order_a'].pk}/"
    saga_path = f"/api/sagas/{world['saga_a'].pk}/"
    before = count_queries(staff, order_path), count_queries(staff, saga_path)
    for _ in range(5):
        OrderLineFactory(order=world["order_a"])
    after = count_queries(staff, order_path), count_queries(staff, saga_path)
    assert before == after


# -- errors ---------------------------------------------------------------------------------------


def test_an_unreachable_database_is_a_503_and_a_bug_is_a_plain_500(world, monkeypatch):
    staff = client_for(world["staff"])

    def unreachable(self):
        raise OperationalError("could not connect to server: password=hunter2")

    monkeypatch.setattr("sagas.api.SagaViewSet.get_queryset", unreachable)
    response = staff.get("/api/sagas/")
    assert response.status_code == 503
    assert response["Retry-After"]
    assert b"hunter2" not in response.content

    def bug(self):
        raise KeyError("secret=hunter2")

    monkeypatch.setattr("sagas.api.SagaViewSet.get_queryset", bug)
    response = staff.get("/api/sagas/")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error."}
    assert b"hunter2" not in response.content and b"Traceback" not in response.content


# -- health and schema ----------------------------------------------------------------------------


def test_healthz_ok(db):
    response = APIClient().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "ok"}


def test_healthz_503_when_the_broker_does_not_answer(db):
    with override_settings(CELERY_BROKER_URL="redis://127.0.0.1:1/0"):
        response = APIClient().get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"database": "ok", "broker": "unavailable"}


def test_healthz_503_when_the_database_does_not_answer(db, monkeypatch):
    class Down:
        def cursor(self):
            raise OperationalError("connection refused: password=hunter2")

    monkeypatch.setattr("sagaproject.api.connection", Down())
    response = APIClient().get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"database": "unavailable", "broker": "ok"}
    assert b"hunter2" not in response.content


def test_schema_generates_without_warnings(tmp_path: Path):
    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    schema = target.read_text()
    assert "/api/orders/" in schema and "/api/sagas/{id}/retry/" in schema


# -- the API load benchmark's ceiling (bench.endpoints) -------------------------------------------


@pytest.fixture
def bench_endpoints_mounted():
    """The project's URLs as `make bench-api`'s server has them (SAGAPROJECT_BENCH_ENDPOINTS=1)."""
    import sagaproject.urls

    with override_settings(BENCH_ENDPOINTS=True):
        importlib.reload(sagaproject.urls)
        clear_url_caches()
        yield
    importlib.reload(sagaproject.urls)
    clear_url_caches()


def test_the_benchmark_ceiling_is_not_served_by_default(customer):
    assert settings.BENCH_ENDPOINTS is False
    response = client_for(customer).post(
        "/bench/submissions/", {"sku": "SKU-API", "quantity": 1}, format="json"
    )
    assert response.status_code == 404


def test_the_benchmark_ceiling_authenticates_and_validates_when_mounted(
    customer, bench_endpoints_mounted
):
    body = {"sku": "SKU-API", "quantity": 1}
    assert client_for().post("/bench/submissions/", body, format="json").status_code == 401
    response = client_for(customer).post(
        "/bench/submissions/", {**body, "quantity": 0}, format="json"
    )
    assert response.status_code == 400 and "quantity" in response.json()


# -- on real workers ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases=["default", "gateway"])
class TestOnWorkers:
    def submit(self, client: APIClient, token: str = "tok_ok") -> dict[str, Any]:
        response = post_order(client, payload(quantity=2, token=token))
        assert response.status_code == 202, response.content
        return response.json()

    def test_happy_path_shows_payment_reservations_and_shipment(self, saga_db):
        product = ProductFactory(sku="SKU-API", price=Decimal("12.50"), stock_on_hand=10)
        customer = UserFactory()
        client = client_for(customer)
        submitted = self.submit(client)
        saga = wait_final(submitted["saga"]["id"])
        assert saga.status == "completed"

        order = client.get(f"/api/orders/{submitted['id']}/").json()
        assert order["status"] == "confirmed"
        assert order["total"] == "25.00"
        assert order["saga"]["status"] == "completed"
        assert order["payment"] == {
            "status": "charged",
            "amount": "25.00",
            "refunded_amount": "0.00",
            "currency": "EUR",
        }
        assert order["reservations"] == [{"sku": "SKU-API", "quantity": 2, "status": "active"}]
        assert order["shipment"]["status"] == "scheduled"
        assert order["shipment"]["country"] == "GB"
        product.refresh_from_db()
        assert product.stock_on_hand == 8

        body = client.get(f"/api/sagas/{saga.pk}/").json()
        assert body["status"] == "completed" and body["finished_at"]
        assert [s["status"] for s in body["steps"]] == ["completed"] * 5
        steps = [s for s in body["steps"] if s["kind"] == "step"]  # the wait was skipped
        assert len(steps) == 4 and all(s["attempts"] == 1 and s["started_at"] for s in steps)
        assert body["events"][0]["kind"] == "saga_started"
        assert body["events"][-1]["kind"] == "saga_completed"
        listed = client.get("/api/orders/").json()["results"]
        assert [o["status"] for o in listed] == ["confirmed"]

    def test_declined_card_ends_compensated(self, saga_db):
        ProductFactory(sku="SKU-API", stock_on_hand=10)
        client = client_for(UserFactory())
        submitted = self.submit(client, token="tok_declined")
        saga = wait_final(submitted["saga"]["id"])
        assert saga.status == "compensated"

        body = client.get(f"/api/sagas/{saga.pk}/").json()
        assert body["status"] == "compensated"
        assert body["error"] == {"code": "card_declined", "message": "The card was declined."}
        charge = next(s for s in body["steps"] if s["name"] == "charge_payment")
        # Whether the failed step is compensated too is the saga definition's choice.
        assert charge["status"] in ("failed", "compensated")
        assert charge["error"]["code"] == "card_declined"
        create = next(s for s in body["steps"] if s["name"] == "create_order")
        assert create["status"] == "compensated" and create["compensated_at"]
        order = client.get(f"/api/orders/{submitted['id']}/").json()
        assert order["status"] == "cancelled"
        assert order["payment"] is None and order["reservations"] == []

    def test_staff_retry_of_a_paused_saga_completes_it(self, saga_db):
        ProductFactory(sku="SKU-API", stock_on_hand=10)
        customer = UserFactory()
        staff = client_for(make_operator())
        submitted = self.submit(client_for(customer), token="tok_timeout")
        saga = wait_final(submitted["saga"]["id"])
        assert saga.status == "failed"
        assert SagaStep.objects.get(saga=saga, name="charge_payment").status == "failed"
        body = client_for(customer).get(f"/api/sagas/{saga.pk}/").json()
        assert body["error"]["code"] == "gateway_unavailable"

        assert client_for(customer).post(f"/api/sagas/{saga.pk}/retry/").status_code == 403
        plan = staff.get(f"/api/sagas/{saga.pk}/plan/?action=retry").json()
        assert plan["allowed"] and plan["run"][0] == "charge_payment"

        gateway_recover()
        response = staff.post(f"/api/sagas/{saga.pk}/retry/")
        assert response.status_code == 202
        assert response.json()["id"] == str(saga.pk)
        assert response.json()["events"][-1]["kind"] == "operator_retry"
        assert wait_final(saga.pk).status == "completed"

        again = staff.post(f"/api/sagas/{saga.pk}/retry/")
        assert again.status_code == 409
        assert "completed" in again.json()["detail"]
        assert staff.post(f"/api/sagas/{saga.pk}/compensate/").status_code == 409
        order = client_for(customer).get(f"/api/orders/{submitted['id']}/").json()
        assert order["status"] == "confirmed"
