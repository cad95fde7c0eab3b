"""Submit a batch of demo orders, one of each outcome and more, and report what became of them."""

from __future__ import annotations

import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from inventory.selectors import product_prices, product_stock
from inventory.services import catalog_seed
from orders.services import order_submit
from payments.gateway import AMOUNT_LIMIT, gateway_outage_begin
from sagas.models import Saga

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

    @property
    def expected(self) -> str:
        return f"{self.status} ({self.error_code})" if self.error_code else self.status


def _everyday_items(n: int) -> list[dict[str, Any]]:
    first, second = EVERYDAY_SKUS[n % 4], EVERYDAY_SKUS[(n + 1) % 4]
    return [{"sku": first, "quantity": 1 + n % 2}, {"sku": second, "quantity": 1}]


def _over_the_limit(n: int) -> list[dict[str, Any]]:
    price = product_prices(skus=[EXPENSIVE_SKU])[EXPENSIVE_SKU]
    return [{"sku": EXPENSIVE_SKU, "quantity": int(AMOUNT_LIMIT // price) + 1}]


def _more_than_in_stock(n: int) -> list[dict[str, Any]]:
    # Nothing else in the demo orders this product, so its stock cannot grow meanwhile.
    return [{"sku": SCARCE_SKU, "quantity": (product_stock(sku=SCARCE_SKU) or 0) + 5}]


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


class Command(BaseCommand):
    help = (
        "Seed the demo catalog, submit a batch of orders covering every outcome (success, "
        "declined card, amount over the limit, insufficient stock, unsupported destination, a "
        "transient gateway failure that is retried, a gateway outage that pauses the saga), "
        "wait for their sagas and report the outcomes. Needs a running Celery worker on the "
        "sagas queue (`make run`, or `celery -A sagaproject worker -Q sagas`). Note: it resets "
        "the demo products' stock and (re)starts the simulated gateway outage."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, default=24, help="Orders to submit (24).")
        parser.add_argument(
            "--timeout", type=float, default=120, help="Seconds to wait for the sagas (120)."
        )

    def handle(self, *args: Any, count: int, timeout: float, **options: Any) -> None:
        if count < 1 or timeout <= 0:
            raise CommandError("--count must be at least 1 and --timeout positive.")
        console = Console(file=options.get("stdout") or sys.stdout, highlight=False)
        catalog_seed()
        gateway_outage_begin()  # so that tok_timeout pauses, whatever an earlier run left
        submitted = self._submit(count)
        console.print(
            f"Submitted {count} orders. Waiting up to {timeout:g} s for the sagas, run by the "
            f"Celery workers on queue [bold]{settings.CELERY_TASK_DEFAULT_QUEUE}[/bold]..."
        )
        sagas = self._wait(console, [saga_id for _, saga_id in submitted], timeout)
        missed = self._report(console, submitted, sagas)
        if all(saga.status == "pending" for saga in sagas.values()):
            raise CommandError(
                f"No saga started within {timeout:g} s: no Celery worker seems to be running on "
                f"queue {settings.CELERY_TASK_DEFAULT_QUEUE!r}. Start one with `make run`, or "
                f"`celery -A sagaproject worker -Q {settings.CELERY_TASK_DEFAULT_QUEUE}`."
            )
        if missed:
            raise CommandError(f"{missed} of {count} sagas did not reach their expected outcome.")
        console.print("[green]Every saga reached its expected outcome.[/green]")

    def _submit(self, count: int) -> list[tuple[Scenario, UUID]]:
        submitted = []
        dealt = itertools.islice(itertools.cycle(ROTATION), count)
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

    def _wait(self, console: Console, saga_ids: list[UUID], timeout: float) -> dict[UUID, Saga]:
        """Poll the saga rows until every saga is final or the time is up."""
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

    def _report(
        self, console: Console, submitted: list[tuple[Scenario, UUID]], sagas: dict[UUID, Saga]
    ) -> int:
        """Print one row per scenario; return how many sagas missed their expected outcome."""
        table = Table(title="Demo orders")
        for column in ("Scenario", "Expected", "Orders", "Observed", ""):
            table.add_column(column, overflow="fold")
        missed = 0
        misses: list[str] = []
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
        return missed
