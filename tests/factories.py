"""factory_boy factories for the domain objects."""

from __future__ import annotations

import uuid
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model

from inventory.models import Product
from orders.models import Order, OrderLine


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"customer{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    password = factory.django.Password("correct horse battery staple")


def make_operator(**fields):
    """A staff user with the saga action permissions (retry, compensate, resolve, skip)."""
    from django.contrib.auth.models import Permission

    from sagas.models import OperatorAction

    user = UserFactory(is_staff=True, **fields)
    codenames = [f"{action}_saga" for action in OperatorAction.values]
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


class ProductFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Product

    sku = factory.Sequence(lambda n: f"SKU-{n:05d}")
    name = factory.LazyAttribute(lambda product: f"Product {product.sku}")
    price = Decimal("10.00")
    stock_on_hand = 100


class OrderFactory(factory.django.DjangoModelFactory):
    """A pending order without lines; add them with OrderLineFactory."""

    class Meta:
        model = Order

    id = factory.LazyFunction(uuid.uuid4)
    customer = factory.SubFactory(UserFactory)
    currency = "EUR"
    total = Decimal("0.00")
    shipping_address = factory.LazyFunction(
        lambda: {
            "name": "Ada Lovelace",
            "line1": "12 St James's Square",
            "city": "London",
            "postal_code": "SW1Y 4JH",
            "country": "GB",
        }
    )


class OrderLineFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = OrderLine

    order = factory.SubFactory(OrderFactory)
    sku = factory.Sequence(lambda n: f"SKU-{n:05d}")
    quantity = 1
    unit_price = Decimal("10.00")
    line_total = factory.LazyAttribute(lambda line: line.unit_price * line.quantity)


def saga_rows(
    name: str = "three_steps",
    *,
    status: str = "failed",
    stopped_at: int = 1,
    error_code: str = "boom",
):
    """A saga of a registered definition as the engine leaves it, built without running it:
    `failed` at step `stopped_at` (its earlier steps completed), or `completed`."""
    from django.utils import timezone

    from sagas.definitions import get_definition
    from sagas.models import Saga, SagaStep

    definitions, version = get_definition(name).snapshot()
    steps = get_definition(name).steps
    if status == "completed":
        stopped_at = len(steps) - 1
        statuses = ["completed"] * len(steps)
    else:
        statuses = ["completed"] * stopped_at + ["failed"]
        statuses += ["pending"] * (len(steps) - len(statuses))
    now = timezone.now()
    saga = Saga.objects.create(
        name=name,
        status=status,
        input={},
        current_step=stopped_at,
        error_code=error_code if status == "failed" else "",
        error_message="It failed." if status == "failed" else "",
        definition_version=version,
        finished_at=now if status == "completed" else None,
    )
    SagaStep.objects.bulk_create(
        SagaStep(
            saga=saga,
            index=index,
            name=step.name,
            status=step_status,
            definition=definition,
            attempts=0 if step_status == "pending" else 1,
            output={"step": step.name} if step_status == "completed" else None,
            started_at=None if step_status == "pending" else now,
            finished_at=None if step_status == "pending" else now,
        )
        for index, (step, definition, step_status) in enumerate(
            zip(steps, definitions, statuses, strict=True)
        )
    )
    return saga
