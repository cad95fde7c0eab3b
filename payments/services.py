"""Taking and refunding payments through the payment gateway."""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID

from django.db import transaction

from payments.gateway import gateway_charge, gateway_find_charge, gateway_refund
from payments.models import GatewayChargeStatus, Payment, PaymentStatus

CENT = Decimal("0.01")


# Steps call this inside their own transaction: a savepoint would add two round trips
# and buy nothing, since any error fails the whole step. Called alone, it is atomic.
@transaction.atomic(savepoint=False)
def payment_charge(
    *,
    order_id: UUID | str,
    saga_id: UUID | str | None,
    amount: Decimal,
    currency: str,
    token: str,
    idempotency_key: str,
    confirmation_url: str | None = None,
) -> Payment:
    """Charge through the gateway, then record the payment in the caller's transaction.

    The gateway commits its charge on its own. Should the caller's transaction roll back, a
    call with the same idempotency key finds that charge instead of making a second one, and
    records it here. A 3-D Secure charge (`needs_confirmation`) is confirmed by the gateway's
    webhook to `confirmation_url`, later.
    """
    charge = gateway_charge(
        idempotency_key=idempotency_key,
        token=token,
        amount=amount.quantize(CENT),
        currency=currency,
        confirmation_url=confirmation_url,
    )
    payment, _ = Payment.objects.get_or_create(
        gateway_charge_id=charge.charge_id,
        defaults={
            "order_id": order_id,
            "saga_id": saga_id,
            "amount": charge.amount,
            "currency": charge.currency,
        },
    )
    return payment


@transaction.atomic(savepoint=False)
def payment_refund(*, payment_id: int, idempotency_key: str) -> Payment:
    """Refund a payment in full. Idempotent.

    `idempotency_key` is the key the payment was charged with: the gateway finds the charge
    by it, and refunds it at most once.
    """
    payment = Payment.objects.select_for_update().get(pk=payment_id)
    if payment.status == PaymentStatus.REFUNDED:
        return payment
    gateway_refund(idempotency_key=idempotency_key, charge_id=payment.gateway_charge_id)
    payment.status = PaymentStatus.REFUNDED
    payment.refunded_amount = payment.amount
    payment.save(update_fields=["status", "refunded_amount", "updated_at"])
    return payment


def payment_refund_unrecorded(*, idempotency_key: str) -> None:
    """Refund a charge the gateway made that no payment records: its step failed after it.

    A lost response, or a failure between the gateway call and the step's commit, can leave
    the customer charged with the step failed. Nothing to do if the gateway never charged.
    """
    charge = gateway_find_charge(idempotency_key=idempotency_key)
    if charge is not None and charge.status == GatewayChargeStatus.CHARGED:
        gateway_refund(idempotency_key=idempotency_key, charge_id=charge.charge_id)
