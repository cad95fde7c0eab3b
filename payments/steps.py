"""The payment step of the order fulfilment saga: charge the customer, or refund them."""

from __future__ import annotations

from decimal import Decimal

from payments.services import payment_charge, payment_refund, payment_refund_unrecorded
from sagas.definitions import StepContext


def charge_payment(ctx: StepContext) -> dict[str, int | str]:
    payment = payment_charge(
        order_id=ctx.input["order_id"],
        saga_id=ctx.saga_id,
        amount=Decimal(ctx.input["total"]),
        currency=ctx.input["currency"],
        token=ctx.input["payment_token"],
        idempotency_key=ctx.idempotency_key,
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
