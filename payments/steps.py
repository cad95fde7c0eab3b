"""The payment stages of the order fulfilment saga: charge the customer, or refund them; and,
for a 3-D Secure card, the wait for the customer's confirmation."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError

from payments.gateway import CONFIRMED_EVENT_TYPE, needs_confirmation
from payments.services import payment_charge, payment_refund, payment_refund_unrecorded
from sagas.definitions import StepContext

# The event of the wait for a 3-D Secure confirmation: the gateway's webhook sends it.
PAYMENT_CONFIRMED = "payment_confirmed"


def charge_payment(ctx: StepContext) -> dict[str, int | str]:
    token = ctx.input["payment_token"]
    payment = payment_charge(
        order_id=ctx.input["order_id"],
        saga_id=ctx.saga_id,
        amount=Decimal(ctx.input["total"]),
        currency=ctx.input["currency"],
        token=token,
        idempotency_key=ctx.idempotency_key,
        # Where the gateway posts the customer's confirmation: the saga's signed URL for the
        # wait to come, made now, before the wait begins.
        confirmation_url=ctx.signal_url(PAYMENT_CONFIRMED) if needs_confirmation(token) else None,
    )
    return {
        "payment_id": payment.pk,
        "charge_id": payment.gateway_charge_id,
        "amount": str(payment.amount),
    }


def refund_payment(ctx: StepContext) -> None:
    if ctx.output is None:  # the charge step itself failed; the gateway may have charged
        payment_refund_unrecorded(idempotency_key=ctx.idempotency_key)
        return
    payment_refund(payment_id=ctx.output["payment_id"], idempotency_key=ctx.idempotency_key)


def payment_needs_confirmation(ctx: StepContext) -> bool:
    """The condition of the wait for the confirmation: only 3-D Secure cards wait."""
    return needs_confirmation(ctx.input["payment_token"])


def confirmation_is_valid(payload: Any) -> None:
    """The wait takes the gateway's confirmation only: its type, and the charge it confirms."""
    if not isinstance(payload, dict) or payload.get("type") != CONFIRMED_EVENT_TYPE:
        raise ValidationError(f"A confirmation's type is {CONFIRMED_EVENT_TYPE!r}.")
    if not isinstance(payload.get("charge_id"), str) or not payload["charge_id"]:
        raise ValidationError("A confirmation names its charge (charge_id).")
