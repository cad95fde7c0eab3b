"""The card issuer's late approval of a `tok_late_charge` charge: a process of its own.

    python -m payments.late_charge <idempotency key> <token> <amount> <currency> <delay>

The simulated gateway starts it (`payments.gateway`) when it declines such a charge for want
of the issuer's answer. It sleeps `delay` seconds, then records the charge in the gateway's
ledger, as a card network that approved the payment after the shop gave up on it: the outside
world acting late, which no kill of the shop's worker stops. It runs with the settings (and
the database) of the process that started it, whose environment it inherits.
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal


def main(argv: list[str]) -> int:
    key, token, amount, currency, delay = argv
    time.sleep(float(delay))
    import django

    django.setup()
    from payments.gateway import gateway_land_late_charge

    gateway_land_late_charge(
        idempotency_key=key, token=token, amount=Decimal(amount), currency=currency
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
