"""Scheduling and cancelling shipments with the (simulated) carrier."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from enum import StrEnum
from typing import Any
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from sagas.exceptions import BusinessError
from shipping.models import Shipment, ShipmentStatus

# ISO 3166-1 alpha-2 codes of the countries the carrier delivers to: the 27 EU member states,
# plus GB, US, CA, CH, NO, AU and JP. Anything else (AQ, Antarctica, say) is refused.
SUPPORTED_COUNTRIES: frozenset[str] = frozenset(
    {
        *("AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE"),
        *("IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE"),
        *("GB", "US", "CA", "CH", "NO", "AU", "JP"),
    }
)


class ShippingErrorCode(StrEnum):
    UNSUPPORTED_DESTINATION = "unsupported_destination"


class ShippingError(BusinessError):
    """The carrier cannot ship this order."""

    code = "shipping_error"


def _new_tracking_number() -> str:
    return f"SG{secrets.token_hex(6).upper()}"


# Steps call this inside their own transaction: a savepoint would add two round trips
# and buy nothing, since any error fails the whole step. Called alone, it is atomic.
@transaction.atomic(savepoint=False)
def shipment_schedule(*, order_id: UUID | str, address: Mapping[str, Any]) -> Shipment:
    """Schedule the order's shipment. Scheduling again returns the scheduled one."""
    country = str(address.get("country", "")).strip().upper()
    if country not in SUPPORTED_COUNTRIES:
        # Only echo a code we could have shipped to: the raw input may be anything.
        where = country if len(country) == 2 and country.isalpha() else "this destination"
        raise ShippingError(
            f"We do not ship to {where}.", code=ShippingErrorCode.UNSUPPORTED_DESTINATION
        )
    existing = Shipment.objects.filter(order_id=order_id, status=ShipmentStatus.SCHEDULED).first()
    if existing is not None:
        return existing
    return Shipment.objects.create(
        order_id=order_id,
        tracking_number=_new_tracking_number(),
        country=country,
        address=dict(address),
    )


@transaction.atomic(savepoint=False)
def shipment_cancel(*, order_id: UUID | str) -> list[Shipment]:
    """Cancel the order's scheduled shipment. Idempotent: returns what it cancelled."""
    shipments = list(
        Shipment.objects.select_for_update().filter(
            order_id=order_id, status=ShipmentStatus.SCHEDULED
        )
    )
    now = timezone.now()
    for shipment in shipments:
        shipment.status = ShipmentStatus.CANCELLED
        shipment.cancelled_at = now
        shipment.save(update_fields=["status", "cancelled_at", "updated_at"])
    return shipments
