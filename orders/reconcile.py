"""The order saga's reconciliation check: what the payment gateway's ledger must hold once the
saga is final (`SagaDefinition.reconcile`; the sweeper runs it, `sagas.engine.reconcile`).

A confirmed order's charge is held in full; a cancelled order holds nothing. The gateway may
act after the saga decided (`tok_late_charge`: a charge that lands after its step failed and
the saga compensated), or someone may refund a charge outside the saga: the check finds both.
"""

from __future__ import annotations

from decimal import Decimal

from payments.gateway import gateway_find_charge
from payments.models import GatewayChargeStatus
from sagas.definitions import Discrepancy, ReconcileContext, Repair


def order_ledger(ctx: ReconcileContext) -> list[Discrepancy]:
    """The gateway's charge for the saga's `charge_payment` (found by its idempotency key):
    the order's total for a completed saga, nothing for a compensated one."""
    charge = gateway_find_charge(idempotency_key=ctx.idempotency_key("charge_payment"))
    held = charge.amount if charge and charge.status == GatewayChargeStatus.CHARGED else Decimal(0)
    total, currency = Decimal(ctx.input["total"]), ctx.input["currency"]
    if ctx.status == "compensated" and held:
        return [
            Discrepancy(
                "late_charge",
                f"The gateway holds a charge of {held} {currency} for a cancelled order.",
                repair=Repair(
                    "charge_payment",
                    note="Its compensation refunds the charge the gateway holds for the saga.",
                ),
            )
        ]
    if ctx.status == "completed" and held != total:
        return [
            Discrepancy(
                "charge_missing",
                f"The order is confirmed for {total} {currency}, but the gateway holds "
                f"{held} {currency} for it (refunded outside the saga?).",
            )
        ]
    return []
