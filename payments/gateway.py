"""A simulated payment gateway: an external provider with its own ledger and idempotency keys.

The gateway writes on the `gateway` database alias, in transactions of its own, so what it
records stays recorded whatever becomes of the calling step's transaction, as with a real
provider. Requests with the same idempotency key are handled one at a time.

Test tokens:

    tok_ok                  charged.
    tok_declined            declined, code "card_declined".
    tok_insufficient_funds  declined, code "insufficient_funds".
    tok_transient_2         unavailable on the first two attempts for an idempotency key, then
                            charged.
    tok_timeout             unavailable on every attempt while the gateway is in outage for it,
                            which it is by default; `gateway_recover()` ends the outage and
                            `gateway_outage_begin()` starts it again.
    tok_lost_response       the first attempt for a key records the charge, then fails as if the
                            response had been lost on the network; the retry returns that charge.
    tok_3ds                 charged, pending the customer's 3-D Secure confirmation: the gateway
                            posts it (a webhook) to the charge's `confirmation_url`
                            `GATEWAY_CONFIRM_DELAY` seconds (default 2) after the charge
                            (lost if the shop's broker, the simulation's clock, is down then).
    tok_3ds_abandoned       charged, pending a confirmation that never comes: the customer
                            abandoned the 3-D Secure page.
    tok_late_charge         declined at once, code "issuer_timeout" (the gateway gave up
                            waiting for the card's issuer); the issuer's approval lands anyway:
                            the charge appears in the ledger `GATEWAY_LATE_CHARGE_DELAY`
                            seconds later (default 5), written by a process of its own, which
                            no kill of the worker that asked stops. The order saga's
                            reconciliation check finds it (`orders.reconcile`).
    any other token         declined, code "invalid_token".

A 3-D Secure token (`tok_3ds*`) needs a `confirmation_url`: without one the request is
rejected ("confirmation_url_required").

Whatever the token, an amount over 10000.00 is declined with code "amount_over_limit" (and an
amount that is not positive with "invalid_amount").

A charge repeated with a key already used returns the first charge (or is declined again with
the same code); reusing a key for a different token, amount or currency is rejected. A refund
names the charge by its key; refunding again is a no-op that returns the charge.

Declines raise `PaymentDeclined`; unavailability raises `GatewayUnavailable`, which callers
should retry with the same key.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerUnavailable

from payments.models import (
    GatewayAttempt,
    GatewayCharge,
    GatewayChargeStatus,
    GatewayOperation,
    GatewayOutage,
    GatewayOutcome,
)
from payments.routers import GATEWAY_DB
from payments.tasks import gateway_post_webhook
from sagas.exceptions import BusinessError, StepError, TransientError

logger = logging.getLogger("payments")

AMOUNT_LIMIT = Decimal("10000.00")
# Where `python -m payments.late_charge` finds the project's packages.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOK_TRANSIENT_2_FAILURES = 2


class DeclineCode(StrEnum):
    CARD_DECLINED = "card_declined"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    AMOUNT_OVER_LIMIT = "amount_over_limit"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_TOKEN = "invalid_token"
    ISSUER_TIMEOUT = "issuer_timeout"


DECLINE_MESSAGES: dict[str, str] = {
    DeclineCode.CARD_DECLINED: "The card was declined.",
    DeclineCode.INSUFFICIENT_FUNDS: "The card was declined: insufficient funds.",
    DeclineCode.AMOUNT_OVER_LIMIT: f"The amount exceeds the payment limit of {AMOUNT_LIMIT}.",
    DeclineCode.INVALID_AMOUNT: "The amount to charge must be positive.",
    DeclineCode.INVALID_TOKEN: "The payment method is not valid.",
    DeclineCode.ISSUER_TIMEOUT: "The card's issuer did not answer in time.",
}

TOKEN_DECLINES: dict[str, DeclineCode] = {
    "tok_declined": DeclineCode.CARD_DECLINED,
    "tok_insufficient_funds": DeclineCode.INSUFFICIENT_FUNDS,
}
CONFIRMATION_TOKENS = frozenset({"tok_3ds", "tok_3ds_abandoned"})
CHARGEABLE_TOKENS = frozenset(
    {
        "tok_ok",
        "tok_transient_2",
        "tok_timeout",
        "tok_lost_response",
        "tok_late_charge",
        *CONFIRMATION_TOKENS,
    }
)
# The webhook the gateway posts once the customer confirmed a 3-D Secure charge.
CONFIRMED_EVENT_TYPE = "payment.confirmed"


def needs_confirmation(token: str) -> bool:
    """Whether a charge with this token waits for the customer's 3-D Secure confirmation."""
    return token.startswith("tok_3ds")


class PaymentDeclined(BusinessError):
    """The gateway declined the charge; `code` says why."""

    code = "payment_declined"


class GatewayUnavailable(TransientError):
    """The gateway did not answer, or failed: try again with the same idempotency key."""

    code = "gateway_unavailable"


class GatewayRequestRejected(BusinessError):
    """The request cannot be honoured: an unknown charge, or a key reused for another request."""

    code = "gateway_request_rejected"


@dataclass(frozen=True)
class _Result:
    outcome: GatewayOutcome
    charge: GatewayCharge | None = None
    error: StepError | None = None


def _unavailable(message: str = "The payment gateway is unavailable.") -> GatewayUnavailable:
    return GatewayUnavailable(message)


def _declined(code: str) -> PaymentDeclined:
    return PaymentDeclined(DECLINE_MESSAGES[code], code=code)


def _one_request_at_a_time(idempotency_key: str) -> None:
    # A provider answers concurrent requests with one key one after the other; without this,
    # two racing retries could both find no charge and both charge.
    with connections[GATEWAY_DB].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [idempotency_key])


def _record(idempotency_key: str, operation: str, token: str, result: _Result) -> None:
    GatewayAttempt.objects.create(
        idempotency_key=idempotency_key, operation=operation, token=token, outcome=result.outcome
    )


def _answer(result: _Result) -> GatewayCharge:
    """Raise the result's error, if any, once the gateway's transaction has committed."""
    if result.error is not None:
        raise result.error
    assert result.charge is not None
    return result.charge


def gateway_in_outage() -> bool:
    latest = GatewayOutage.objects.order_by("-pk").first()
    return latest is None or latest.active


def gateway_recover() -> None:
    """End the outage: `tok_timeout` charges succeed from now on."""
    GatewayOutage.objects.create(active=False)


def gateway_outage_begin() -> None:
    """Start the outage again: `tok_timeout` charges fail until `gateway_recover()`."""
    GatewayOutage.objects.create(active=True)


def gateway_charge(
    *,
    idempotency_key: str,
    token: str,
    amount: Decimal,
    currency: str,
    confirmation_url: str | None = None,
) -> GatewayCharge:
    """Charge `amount` to the payment method `token`, once per idempotency key.

    A 3-D Secure token needs `confirmation_url`: the gateway posts the customer's confirmation
    there (`CONFIRMED_EVENT_TYPE`, with the charge's id), once, after the charge is made.
    """
    if needs_confirmation(token) and not confirmation_url:
        raise GatewayRequestRejected(
            "A 3-D Secure charge needs a confirmation URL.", code="confirmation_url_required"
        )
    with transaction.atomic(using=GATEWAY_DB):
        _one_request_at_a_time(idempotency_key)
        result = _charge(idempotency_key, token, amount, currency)
        _record(idempotency_key, GatewayOperation.CHARGE, token, result)
        if token == "tok_3ds" and result.outcome == GatewayOutcome.CHARGED:
            assert result.charge is not None and confirmation_url
            _confirm_later(result.charge, confirmation_url)
    return _answer(result)


def _confirm_later(charge: GatewayCharge, url: str) -> None:
    """The customer confirms at once, and the gateway posts the webhook a little later (a task
    with a countdown: the simulated outside world keeps its own time), once its ledger
    committed the charge."""
    payload = {"type": CONFIRMED_EVENT_TYPE, "charge_id": charge.charge_id}
    delay = float(getattr(settings, "GATEWAY_CONFIRM_DELAY", 2))
    transaction.on_commit(lambda: _post_later(url, payload, delay), using=GATEWAY_DB)


def _post_later(url: str, payload: dict[str, str], delay: float) -> None:
    """Schedule the webhook. The simulation's own clock is the shop's broker: when it is down,
    the webhook is lost (as a provider's that never arrives), and the charge it follows is
    still answered: a provider's webhook delivery never fails the charge request."""
    try:
        gateway_post_webhook.apply_async((url, payload), countdown=delay)
    except BrokerUnavailable as error:
        logger.warning("The gateway's webhook for %s was lost: %s", payload["charge_id"], error)


def _charge(idempotency_key: str, token: str, amount: Decimal, currency: str) -> _Result:
    if token == "tok_timeout" and gateway_in_outage():
        return _Result(GatewayOutcome.UNAVAILABLE, error=_unavailable())
    existing = GatewayCharge.objects.filter(idempotency_key=idempotency_key).first()
    if existing is not None:
        return _replay(existing, token, amount, currency)
    if token == "tok_late_charge" and _decline_code(token, amount) is None:
        _land_later(idempotency_key, token, amount, currency)
        return _Result(GatewayOutcome.DECLINED, error=_declined(DeclineCode.ISSUER_TIMEOUT))
    if token == "tok_transient_2" and _failed_attempts(idempotency_key) < TOK_TRANSIENT_2_FAILURES:
        return _Result(GatewayOutcome.UNAVAILABLE, error=_unavailable())
    decline_code = _decline_code(token, amount)
    charge = GatewayCharge.objects.create(
        charge_id=f"ch_{secrets.token_hex(12)}",
        idempotency_key=idempotency_key,
        token=token,
        amount=amount,
        currency=currency,
        status=GatewayChargeStatus.DECLINED if decline_code else GatewayChargeStatus.CHARGED,
        decline_code=decline_code or "",
    )
    if decline_code:
        return _Result(GatewayOutcome.DECLINED, charge, _declined(decline_code))
    if token == "tok_lost_response":
        lost = _unavailable("The payment gateway did not respond in time.")
        return _Result(GatewayOutcome.RESPONSE_LOST, charge, lost)
    return _Result(GatewayOutcome.CHARGED, charge)


def _land_later(idempotency_key: str, token: str, amount: Decimal, currency: str) -> None:
    """The issuer approves the charge late: a process of its own (`payments.late_charge`),
    started once the gateway's answer commits, records it after the delay. Started once per
    key: a repeated request finds the attempt it declined."""
    declined = GatewayAttempt.objects.filter(
        idempotency_key=idempotency_key, operation=GatewayOperation.CHARGE
    )
    if declined.exists():
        return
    delay = float(getattr(settings, "GATEWAY_LATE_CHARGE_DELAY", 5))
    command = [sys.executable, "-m", "payments.late_charge", idempotency_key, token]
    command += [str(amount), currency, str(delay)]

    def start() -> None:
        # Its own session: a kill of the worker's process group does not reach it.
        subprocess.Popen(command, cwd=PROJECT_ROOT, start_new_session=True)

    transaction.on_commit(start, using=GATEWAY_DB)


def gateway_land_late_charge(
    *, idempotency_key: str, token: str, amount: Decimal, currency: str
) -> GatewayCharge:
    """Record a charge the issuer approved after the gateway declined it (`tok_late_charge`):
    the ledger now holds it, whatever the shop did meanwhile."""
    with transaction.atomic(using=GATEWAY_DB):
        _one_request_at_a_time(idempotency_key)
        charge, _ = GatewayCharge.objects.get_or_create(
            idempotency_key=idempotency_key,
            defaults={
                "charge_id": f"ch_{secrets.token_hex(12)}",
                "token": token,
                "amount": amount,
                "currency": currency,
                "status": GatewayChargeStatus.CHARGED,
            },
        )
        _record(idempotency_key, GatewayOperation.CHARGE, token, _Result(GatewayOutcome.CHARGED))
    logger.info("The issuer's late approval of %s landed: %s", idempotency_key, charge.charge_id)
    return charge


def _replay(charge: GatewayCharge, token: str, amount: Decimal, currency: str) -> _Result:
    if (charge.token, charge.amount, charge.currency) != (token, amount, currency):
        rejected = GatewayRequestRejected(
            "The idempotency key was already used for a different payment.",
            code="idempotency_key_reused",
        )
        return _Result(GatewayOutcome.REJECTED, error=rejected)
    if charge.status == GatewayChargeStatus.DECLINED:
        return _Result(GatewayOutcome.REPLAYED, charge, _declined(charge.decline_code))
    return _Result(GatewayOutcome.REPLAYED, charge)


def _failed_attempts(idempotency_key: str) -> int:
    return GatewayAttempt.objects.filter(
        idempotency_key=idempotency_key,
        operation=GatewayOperation.CHARGE,
        outcome=GatewayOutcome.UNAVAILABLE,
    ).count()


def _decline_code(token: str, amount: Decimal) -> DeclineCode | None:
    if token not in CHARGEABLE_TOKENS and token not in TOKEN_DECLINES:
        return DeclineCode.INVALID_TOKEN
    if amount <= 0:
        return DeclineCode.INVALID_AMOUNT
    if amount > AMOUNT_LIMIT:
        return DeclineCode.AMOUNT_OVER_LIMIT
    return TOKEN_DECLINES.get(token)


def gateway_find_charge(*, idempotency_key: str) -> GatewayCharge | None:
    """The charge made with `idempotency_key`, if the gateway made one."""
    return GatewayCharge.objects.using(GATEWAY_DB).filter(idempotency_key=idempotency_key).first()


def gateway_refund(*, idempotency_key: str, charge_id: str | None = None) -> GatewayCharge:
    """Refund the charge made with `idempotency_key` in full. Refunding again is a no-op.

    With `charge_id`, the gateway also checks that the key names that charge.
    """
    with transaction.atomic(using=GATEWAY_DB):
        _one_request_at_a_time(idempotency_key)
        charge = (
            GatewayCharge.objects.select_for_update()
            .filter(idempotency_key=idempotency_key)
            .first()
        )
        result = _refund(charge, charge_id)
        _record(idempotency_key, GatewayOperation.REFUND, charge.token if charge else "", result)
    return _answer(result)


def _refund(charge: GatewayCharge | None, charge_id: str | None) -> _Result:
    if charge is None or (charge_id is not None and charge.charge_id != charge_id):
        rejected = GatewayRequestRejected("No such charge to refund.", code="charge_not_found")
        return _Result(GatewayOutcome.REJECTED, error=rejected)
    if charge.status != GatewayChargeStatus.CHARGED:
        return _Result(GatewayOutcome.REPLAYED, charge)  # refunded already, or never charged
    charge.status = GatewayChargeStatus.REFUNDED
    charge.refunded_at = timezone.now()
    charge.save(update_fields=["status", "refunded_at"])
    return _Result(GatewayOutcome.REFUNDED, charge)
