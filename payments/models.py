"""Payments of orders, and the ledger of the simulated payment gateway."""

from __future__ import annotations

from decimal import Decimal

from django.db import models
from django.db.models import F, Q


class PaymentStatus(models.TextChoices):
    CHARGED = "charged", "Charged"
    REFUNDED = "refunded", "Refunded"


class Payment(models.Model):
    order_id = models.UUIDField(help_text="The order paid for.")
    saga = models.ForeignKey(
        "sagas.Saga",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="payments",
        help_text="The saga that took the payment.",
    )
    amount = models.DecimalField(max_digits=12, decimal_places=2, help_text="Amount charged.")
    currency = models.CharField(max_length=3, help_text="ISO 4217 currency code.")
    status = models.CharField(
        max_length=20,
        choices=PaymentStatus.choices,
        default=PaymentStatus.CHARGED,
        help_text="Charged, or refunded in full.",
    )
    refunded_amount = models.DecimalField(
        max_digits=12, decimal_places=2, default=Decimal("0.00"), help_text="Amount refunded."
    )
    gateway_charge_id = models.CharField(
        max_length=64, unique=True, help_text="The payment gateway's id of the charge."
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the payment was taken.")
    updated_at = models.DateTimeField(auto_now=True, help_text="Last change to the payment.")

    class Meta:
        verbose_name = "payment"
        verbose_name_plural = "payments"
        ordering = ("-created_at",)
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=PaymentStatus.values), name="payment_status_valid"
            ),
            models.CheckConstraint(condition=Q(amount__gt=0), name="payment_amount_positive"),
            models.CheckConstraint(
                condition=Q(refunded_amount__gte=0, refunded_amount__lte=F("amount")),
                name="payment_refund_within_amount",
            ),
        ]
        indexes = [
            models.Index(fields=["order_id"], name="payment_order_idx"),
            models.Index(fields=["status"], name="payment_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} for {self.order_id} ({self.status})"


# The gateway's own tables. They stand for an external provider's ledger: the router sends them
# to the `gateway` connection, and nothing outside `payments.gateway` writes them.


class GatewayChargeStatus(models.TextChoices):
    CHARGED = "charged", "Charged"
    DECLINED = "declined", "Declined"
    REFUNDED = "refunded", "Refunded"


class GatewayCharge(models.Model):
    charge_id = models.CharField(
        max_length=64, unique=True, help_text="The gateway's public id of the charge."
    )
    idempotency_key = models.CharField(
        max_length=200,
        unique=True,
        help_text="The client's key: a repeated request with it returns this charge.",
    )
    token = models.CharField(max_length=64, help_text="The payment method token charged.")
    amount = models.DecimalField(max_digits=12, decimal_places=2, help_text="Amount requested.")
    currency = models.CharField(max_length=3, help_text="ISO 4217 currency code.")
    status = models.CharField(
        max_length=20,
        choices=GatewayChargeStatus.choices,
        help_text="Charged, declined, or refunded.",
    )
    decline_code = models.CharField(
        max_length=50, blank=True, help_text="Why the charge was declined, if it was."
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the charge was made.")
    refunded_at = models.DateTimeField(
        null=True, blank=True, help_text="When the charge was refunded, if it was."
    )

    class Meta:
        verbose_name = "gateway charge"
        verbose_name_plural = "gateway charges"
        ordering = ("-created_at",)
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=GatewayChargeStatus.values),
                name="gateway_charge_status_valid",
            ),
            models.CheckConstraint(
                condition=(Q(status=GatewayChargeStatus.DECLINED) & ~Q(decline_code=""))
                | (~Q(status=GatewayChargeStatus.DECLINED) & Q(decline_code="")),
                name="gateway_charge_decline_code_iff_declined",
            ),
        ]
        indexes = [models.Index(fields=["status"], name="gateway_charge_status_idx")]

    def __str__(self) -> str:
        return f"{self.charge_id} {self.amount} {self.currency} ({self.status})"


class GatewayOperation(models.TextChoices):
    CHARGE = "charge", "Charge"
    REFUND = "refund", "Refund"


class GatewayOutcome(models.TextChoices):
    CHARGED = "charged", "Charged"
    DECLINED = "declined", "Declined"
    REFUNDED = "refunded", "Refunded"
    REPLAYED = "replayed", "Repeated request: first result returned"
    UNAVAILABLE = "unavailable", "Gateway unavailable"
    RESPONSE_LOST = "response_lost", "Charged, but the response was lost"
    REJECTED = "rejected", "Rejected (unknown charge or reused key)"


class GatewayAttempt(models.Model):
    """Every request the gateway received, whatever became of it."""

    idempotency_key = models.CharField(max_length=200, help_text="The request's key.")
    operation = models.CharField(
        max_length=20, choices=GatewayOperation.choices, help_text="What was requested."
    )
    token = models.CharField(max_length=64, blank=True, help_text="The payment method token.")
    outcome = models.CharField(
        max_length=20, choices=GatewayOutcome.choices, help_text="What the gateway did."
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the request arrived.")

    class Meta:
        verbose_name = "gateway attempt"
        verbose_name_plural = "gateway attempts"
        ordering = ("-created_at",)
        constraints = [
            models.CheckConstraint(
                condition=Q(operation__in=GatewayOperation.values),
                name="gateway_attempt_operation_valid",
            ),
            models.CheckConstraint(
                condition=Q(outcome__in=GatewayOutcome.values),
                name="gateway_attempt_outcome_valid",
            ),
        ]
        indexes = [
            models.Index(fields=["idempotency_key", "operation"], name="gateway_attempt_key_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.operation} {self.idempotency_key}: {self.outcome}"


class GatewayOutage(models.Model):
    """The outage that `tok_timeout` runs into: the latest row says whether it is on.

    With no row at all the outage is on, so `tok_timeout` fails until someone recovers it.
    """

    active = models.BooleanField(help_text="True: the outage began; false: it ended.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="When it began or ended.")

    class Meta:
        verbose_name = "gateway outage change"
        verbose_name_plural = "gateway outage changes"
        ordering = ("-pk",)

    def __str__(self) -> str:
        change = "began" if self.active else "ended"
        return f"outage {change} at {self.created_at:%Y-%m-%d %H:%M:%S}"
