"""Submit a batch of demo orders, one of each outcome and more, and report what became of them."""

from __future__ import annotations

import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from inventory.selectors import product_prices, product_stock
from inventory.services import catalog_seed
from orders.services import order_review_threshold, order_submit
from payments.gateway import AMOUNT_LIMIT, gateway_find_charge, gateway_outage_begin
from sagas import conf
from sagas.exceptions import InvalidTransition, SignalError
from sagas.models import Reconciliation, Saga, SagaMember, SagaStatus, SagaStep, StepStatus
from sagas.services import saga_approve, saga_reconcile, saga_reject, saga_repair

FINAL = frozenset({"completed", "compensated", "failed"})
EVERYDAY_SKUS = ("TEE-BLUE", "MUG-CLASSIC", "HOODIE-GREY", "CAP-BLACK")
EXPENSIVE_SKU = "BIKE-CITY"
SCARCE_SKU = "POSTER-LTD"
COUNTRIES = ("GB", "FR", "DE", "NL", "US", "JP", "SE", "CA")


@dataclass(frozen=True)
class Scenario:
    name: str
    status: str  # the saga status it should end in
    error_code: str  # and the error code it should carry ("" for none)
    token: str
    items: Callable[[int], list[dict[str, Any]]]  # the n-th order of the scenario's items
    country: Callable[[int], str] = lambda n: COUNTRIES[n % len(COUNTRIES)]
    # What the demo decides, as an operator, when the order waits for its review.
    decision: Literal["", "approve", "reject"] = ""

    @property
    def expected(self) -> str:
        return f"{self.status} ({self.error_code})" if self.error_code else self.status


def _everyday_items(n: int) -> list[dict[str, Any]]:
    first, second = EVERYDAY_SKUS[n % 4], EVERYDAY_SKUS[(n + 1) % 4]
    return [{"sku": first, "quantity": 1 + n % 2}, {"sku": second, "quantity": 1}]


def _over_the_limit(n: int) -> list[dict[str, Any]]:
    price = product_prices(skus=[EXPENSIVE_SKU])[EXPENSIVE_SKU]
    return [{"sku": EXPENSIVE_SKU, "quantity": int(AMOUNT_LIMIT // price) + 1}]


def _above_the_review_threshold(n: int) -> list[dict[str, Any]]:
    """Bikes for more than ORDERS_REVIEW_ABOVE (and within the payment limit)."""
    threshold = order_review_threshold() or Decimal(0)
    price = product_prices(skus=[EXPENSIVE_SKU])[EXPENSIVE_SKU]
    return [{"sku": EXPENSIVE_SKU, "quantity": int(threshold // price) + 1}]


def _more_than_in_stock(n: int) -> list[dict[str, Any]]:
    # Nothing else in the demo orders this product, so its stock cannot grow meanwhile.
    short = {"sku": SCARCE_SKU, "quantity": (product_stock(sku=SCARCE_SKU) or 0) + 5}
    if not settings.ORDERS_RESERVE_EACH_LINE:
        return [short]
    # Each line reserved at once: the everyday line is reserved, the scarce one fails, and
    # the everyday line's reservation is compensated.
    return [{"sku": EVERYDAY_SKUS[n % 4], "quantity": 1}, short]


# Submitted once each, after the rotation, as far as the settings allow: orders that wait, for
# the customer's 3-D Secure confirmation (the simulated gateway's webhook, or its timeout) or
# for an operator's review.
CONFIRMED, ABANDONED = "3-D Secure, confirmed", "3-D Secure, abandoned"
LATE_CHARGE = "issuer answered late (reconciled)"
REVIEWED = ("review, approved", "review, rejected")
SUCCEEDS = Scenario("succeeds", "completed", "", "tok_ok", _everyday_items)
SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        SUCCEEDS,
        Scenario("card declined", "compensated", "card_declined", "tok_declined", _everyday_items),
        Scenario(
            "over the payment limit",
            "compensated",
            "amount_over_limit",
            "tok_ok",
            _over_the_limit,
        ),
        Scenario(
            "more than in stock",
            "compensated",
            "insufficient_stock",
            "tok_ok",
            _more_than_in_stock,
        ),
        Scenario(
            "unsupported destination (AQ)",
            "compensated",
            "unsupported_destination",
            "tok_ok",
            _everyday_items,
            country=lambda n: "AQ",
        ),
        Scenario("gateway hiccup, retried", "completed", "", "tok_transient_2", _everyday_items),
        Scenario(
            "gateway outage, paused",
            "failed",
            "gateway_unavailable",
            "tok_timeout",
            _everyday_items,
        ),
        Scenario(CONFIRMED, "completed", "", "tok_3ds", _everyday_items),
        Scenario(
            ABANDONED,
            "compensated",
            "wait_timed_out",
            "tok_3ds_abandoned",
            _everyday_items,
        ),
        Scenario(LATE_CHARGE, "compensated", "issuer_timeout", "tok_late_charge", _everyday_items),
        Scenario(
            REVIEWED[0],
            "completed",
            "",
            "tok_ok",
            _above_the_review_threshold,
            decision="approve",
        ),
        Scenario(
            REVIEWED[1],
            "compensated",
            "approval_rejected",
            "tok_ok",
            _above_the_review_threshold,
            decision="reject",
        ),
    )
}
# The order in which scenarios are dealt out: half of the orders succeed, every outcome shows.
ROTATION = (
    "succeeds",
    "card declined",
    "succeeds",
    "over the payment limit",
    "succeeds",
    "more than in stock",
    "succeeds",
    "unsupported destination (AQ)",
    "succeeds",
    "gateway hiccup, retried",
    "succeeds",
    "gateway outage, paused",
)
# Seconds the sweeper may take to end a wait past its timeout: the wake's interval (2 s), or,
# where beat sends no wake, the sweep's (30 s), and a margin.
TIMEOUT_LAG = 40


class Command(BaseCommand):
    help = (
        "Seed the demo catalog, submit a batch of orders covering every outcome (success, "
        "declined card, amount over the limit, insufficient stock, unsupported destination, a "
        "transient gateway failure that is retried, a gateway outage that pauses the saga), "
        "then orders that wait: a 3-D Secure card the simulated gateway confirms by webhook, "
        "one never confirmed (compensated when its wait times out, if ORDERS_CONFIRM_TIMEOUT "
        "is short enough), and, with ORDERS_REVIEW_ABOVE set, orders above it that the demo "
        "approves and rejects as an operator; wait for their sagas and report the outcomes. "
        "Needs a running Celery worker on the sagas queue and beat (`make run`; `make demo` "
        "sets the two settings). Note: it resets the demo products' stock and (re)starts the "
        "simulated gateway outage."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--count", type=int, default=24, help="Orders to submit, besides those that wait (24)."
        )
        parser.add_argument(
            "--timeout", type=float, default=120, help="Seconds to wait for the sagas (120)."
        )

    def handle(self, *args: Any, count: int, timeout: float, **options: Any) -> None:
        if count < 1 or timeout <= 0:
            raise CommandError("--count must be at least 1 and --timeout positive.")
        console = Console(file=options.get("stdout") or sys.stdout, highlight=False)
        catalog_seed()
        gateway_outage_begin()  # so that tok_timeout pauses, whatever an earlier run left
        waiting = self._waiting_scenarios(console, timeout)
        submitted = self._submit(count, waiting)
        console.print(
            f"Submitted {count} orders and {len(waiting)} that wait. Waiting up to {timeout:g} s "
            f"for the sagas, run by the Celery workers on queue "
            f"[bold]{settings.CELERY_TASK_DEFAULT_QUEUE}[/bold]..."
        )
        if ABANDONED in waiting:
            confirm_timeout = float(settings.ORDERS_CONFIRM_TIMEOUT)
            console.print(
                f"The abandoned 3-D Secure order ends when its wait times out, "
                f"{confirm_timeout:g} s after its charge: beat's wake ends it within seconds "
                f"(or, without the wake, the sweep, every 30 s): up to {TIMEOUT_LAG} s more."
            )
        sagas = self._wait(console, submitted, timeout)
        missed = self._report(console, submitted, sagas)
        self._report_shapes(console, list(sagas))
        late = [saga_id for s, saga_id in submitted if s.name == LATE_CHARGE]
        missed += sum(not self._reconcile(console, saga_id) for saga_id in late)
        if not self._any_step_began(sagas):
            raise CommandError(
                f"No saga started within {timeout:g} s: no Celery worker seems to be running on "
                f"queue {settings.CELERY_TASK_DEFAULT_QUEUE!r}. Start one with `make run`, or "
                f"`celery -A sagaproject worker -Q {settings.CELERY_TASK_DEFAULT_QUEUE}`."
            )
        if missed:
            raise CommandError(
                f"{missed} of {len(submitted)} sagas did not reach their expected outcome."
            )
        console.print("[green]Every saga reached its expected outcome.[/green]")

    @staticmethod
    def _any_step_began(sagas: dict[UUID, Saga]) -> bool:
        """Whether a worker ran anything: a saga is created running (its first stage is a
        step), so only its stages tell."""
        stages = SagaStep.objects.filter(saga_id__in=list(sagas))
        return stages.exclude(status=StepStatus.PENDING, attempts=0).exists()

    def _waiting_scenarios(self, console: Console, timeout: float) -> list[str]:
        """The orders that wait which this run can show, as its settings allow."""
        names = [CONFIRMED, LATE_CHARGE]
        confirm_timeout = float(settings.ORDERS_CONFIRM_TIMEOUT)
        if confirm_timeout + TIMEOUT_LAG <= timeout:
            names.append(ABANDONED)
        else:
            console.print(
                f"[dim]Not shown: a 3-D Secure order never confirmed (ORDERS_CONFIRM_TIMEOUT is "
                f"{confirm_timeout:g} s, longer than this run waits; `make demo` sets 5).[/dim]"
            )
        threshold = order_review_threshold()
        price = product_prices(skus=[EXPENSIVE_SKU])[EXPENSIVE_SKU]
        if threshold is not None and (threshold // price + 1) * price <= AMOUNT_LIMIT:
            names += REVIEWED
        else:
            console.print(
                "[dim]Not shown: orders waiting for an operator's review (ORDERS_REVIEW_ABOVE "
                "is not set, or above the payment limit; `make demo` sets 500).[/dim]"
            )
        return names

    def _submit(self, count: int, waiting: list[str]) -> list[tuple[Scenario, UUID]]:
        submitted = []
        dealt = [*itertools.islice(itertools.cycle(ROTATION), count), *waiting]
        for n, name in enumerate(dealt):
            scenario = SCENARIOS[name]
            saga, _ = order_submit(
                customer=None,
                items=scenario.items(n),
                shipping_address={
                    "name": f"Demo customer {n + 1}",
                    "line1": f"{n + 1} Example Street",
                    "city": "Example City",
                    "postal_code": f"{10000 + n}",
                    "country": scenario.country(n),
                },
                payment_token=scenario.token,
            )
            submitted.append((scenario, saga.pk))
        return submitted

    def _wait(
        self, console: Console, submitted: list[tuple[Scenario, UUID]], timeout: float
    ) -> dict[UUID, Saga]:
        """Poll the saga rows until every saga is final or the time is up, deciding the
        reviews as an operator would once their orders wait for them."""
        saga_ids = [saga_id for _, saga_id in submitted]
        to_decide = {saga_id: s.decision for s, saga_id in submitted if s.decision}
        deadline = time.monotonic() + timeout
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("Sagas finished", total=len(saga_ids))
            while True:
                sagas = Saga.objects.in_bulk(saga_ids)
                for saga_id, decision in list(to_decide.items()):
                    if sagas[saga_id].status == SagaStatus.WAITING:
                        self._decide(progress.console, saga_id, decision)
                        del to_decide[saga_id]
                statuses = Counter(saga.status for saga in sagas.values())
                finished = sum(statuses[status] for status in FINAL)
                in_flight = ", ".join(
                    f"{number} {status}"
                    for status, number in sorted(statuses.items())
                    if status not in FINAL
                )
                progress.update(
                    bar,
                    completed=finished,
                    description=f"Sagas finished [dim]{in_flight}[/dim]",
                )
                if finished == len(saga_ids) or time.monotonic() > deadline:
                    return sagas
                time.sleep(0.25)

    def _reconcile(self, console: Console, saga_id: UUID) -> bool:
        """The late charge of a `tok_late_charge` order: wait for it to land, then, as an
        operator, run the saga's reconciliation check (the sweeper would, within
        SAGAS_RECONCILE_AFTER of the end), which flags it, and its repair, which refunds it;
        whether the flag then cleared, the saga still compensated."""
        saga = Saga.objects.get(pk=saga_id)
        if saga.status != SagaStatus.COMPENSATED:
            return False
        key = f"{saga_id}:charge_payment"
        deadline = time.monotonic() + 30
        while gateway_find_charge(idempotency_key=key) is None:
            if time.monotonic() > deadline:
                console.print(f"[red]The late charge of {saga_id} never landed.[/red]")
                return False
            time.sleep(0.25)
        saga_reconcile(saga_id=saga_id, actor="make demo")
        saga.refresh_from_db()
        found = ", ".join(d["code"] for d in saga.discrepancies or []) or "nothing"
        console.print(
            f"Late charge: the gateway charged order saga {saga_id} after it compensated; its "
            f"reconciliation check found {found}: flagged {saga.reconciliation}."
        )
        index = saga.steps.get(name="charge_payment").index
        try:
            saga_repair(saga_id=saga_id, index=index, actor="make demo")
        except InvalidTransition as error:
            console.print(f"[red]No repair offered[/red]: {error}")
            return False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            saga.refresh_from_db()
            if saga.reconciliation == Reconciliation.AGREES:
                charge = gateway_find_charge(idempotency_key=key)
                held = charge.status if charge else "gone"
                console.print(
                    f"Repaired by the demo as an operator: the charge is {held}, "
                    f"the flag cleared, the saga still {saga.status} (the repair is on its "
                    "timeline)."
                )
                return saga.status == SagaStatus.COMPENSATED
            time.sleep(0.25)
        console.print(f"[red]The repair of {saga_id} did not clear its flag.[/red]")
        return False

    def _decide(self, console: Console, saga_id: UUID, decision: str) -> None:
        """Approve or reject the order's review, as an operator with `sagas.approve_saga`
        would in the admin or the API (`POST /api/sagas/<id>/approve/`)."""
        act, done = (
            (saga_approve, "approved") if decision == "approve" else (saga_reject, "rejected")
        )
        try:
            act(saga_id=saga_id, actor="make demo", note=f"{done} by the demo")
        except SignalError as error:
            console.print(f"[red]Could not {decision} the review of {saga_id}[/red]: {error}")
            return
        console.print(f"[dim]The demo {done} the review of order saga {saga_id}.[/dim]")

    def _report_shapes(self, console: Console, saga_ids: list[UUID]) -> None:
        """What the groups' members and the child sagas did, where the settings use them."""
        if settings.ORDERS_RESERVE_EACH_LINE:
            members = Counter(
                SagaMember.objects.filter(saga_id__in=saga_ids).values_list("status", flat=True)
            )
            shown = ", ".join(f"{n} {status}" for status, n in sorted(members.items()))
            console.print(f"Lines reserved each at once (group members): {shown}.")
        if settings.ORDERS_SHIP_AS_CHILD:
            children = Counter(
                Saga.objects.filter(parent_id__in=saga_ids).values_list("status", flat=True)
            )
            shown = ", ".join(f"{n} {status}" for status, n in sorted(children.items()))
            console.print(f"Shipment sagas (children of the orders): {shown}.")

    def _report(
        self, console: Console, submitted: list[tuple[Scenario, UUID]], sagas: dict[UUID, Saga]
    ) -> int:
        """Print one row per scenario; return how many sagas missed their expected outcome."""
        table = Table(title="Demo orders")
        for column in ("Scenario", "Expected", "Orders", "Observed", ""):
            table.add_column(column, overflow="fold")
        missed = 0
        misses: list[str] = []
        unconfirmed = False  # a 3-D Secure order the gateway's webhook never reached
        for scenario in SCENARIOS.values():
            ids = [saga_id for s, saga_id in submitted if s is scenario]
            if not ids:
                continue
            observed: Counter[str] = Counter()
            for saga_id in ids:
                saga = sagas[saga_id]
                outcome = f"{saga.status} ({saga.error_code})" if saga.error_code else saga.status
                observed[outcome] += 1
                if outcome != scenario.expected:
                    missed += 1
                    misses.append(f"{saga_id}: {scenario.name}, {outcome}")
                    unconfirmed |= scenario.token == "tok_3ds"
            ok = set(observed) == {scenario.expected}
            table.add_row(
                scenario.name,
                scenario.expected,
                str(len(ids)),
                ", ".join(f"{outcome} x{number}" for outcome, number in observed.most_common()),
                "[green]ok[/green]" if ok else "[red]MISSED[/red]",
            )
        console.print(table)
        for line in misses[:10]:
            console.print(f"[red]missed[/red] {line}")
        if unconfirmed:
            console.print(
                "The gateway's confirmation never reached its saga: a worker posts it to the "
                f"signed URL on SAGAS_BASE_URL (here {conf.base_url() or 'unset'}). Is "
                "the web server of `make run` serving there?"
            )
        return missed
