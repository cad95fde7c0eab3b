"""`make bench-pages`: the operator's pages and the sweeper, timed on a benchmark database.

With Django's test client (no network, no web server: the view, its queries and its template),
`DEBUG` off, signed in as a superuser: the admin saga list, the admin's search by business key
(an order id), the list of failed sagas, a saga's admin page, the API's saga list, its failed
sagas, its sagas of a key, one saga by the API, and one sweep of the recovery sweeper with
nothing stale. Each is run `--warmup` times, then timed `--runs` times; prints a table (median,
p95, the median CPU time of this process, the queries of one run and how many of them count
rows), then one JSON object.

Run it on a filled database (`make fill`): `--database` names it, as for `make fill`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.run import bench_database_url, debug_off, percentile


def pages(saga_id: str, key: str) -> list[tuple[str, str | None]]:
    """(what, URL) of each page; None for the sweeps."""
    return [
        ("admin saga list", "/admin/sagas/saga/"),
        ("admin search by key (order id)", f"/admin/sagas/saga/?q={key}"),
        ("admin saga list, status failed", "/admin/sagas/saga/?status__exact=failed"),
        ("admin saga page", f"/admin/sagas/saga/{saga_id}/change/"),
        ("GET /api/sagas/", "/api/sagas/"),
        ("GET /api/sagas/?status=failed", "/api/sagas/?status=failed"),
        ("GET /api/sagas/?key=", f"/api/sagas/?key={key}"),
        ("GET /api/sagas/<id>/", f"/api/sagas/{saga_id}/"),
        ("a sweep, nothing stale", None),
        ("a sweep, reconciliation off", None),
    ]


def timed(call: Callable[[], Any], *, warmup: int, runs: int) -> tuple[list[float], list[float]]:
    """Wall times and this process's CPU times of `runs` calls, in ms. The CPU time is what
    the page costs the web process; on a machine busy with other work the wall time adds
    the waits for a core."""
    for _ in range(warmup):
        call()
    samples, cpu = [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter(), time.process_time()
        call()
        cpu.append((time.process_time() - cpu_started) * 1000)
        samples.append((time.perf_counter() - started) * 1000)
    return samples, cpu


def request(client: Any, url: str) -> Callable[[], None]:
    def get() -> None:
        response = client.get(url, secure=True)
        if response.status_code != 200:
            raise SystemExit(f"bench-pages: {url} answered {response.status_code}")

    return get


def sweep() -> None:
    """One sweep. On a filled database its reconciliation pass has checks due (the sagas that
    finished within SAGAS_RECONCILE_WINDOW), run until SAGAS_RECONCILE_BUDGET is spent."""
    from sagas.engine.sweeper import sweep

    report = sweep()
    if report.recovered or report.dead_lettered or report.deadline_compensated:
        raise SystemExit("bench-pages: the sweep found stale sagas; time it with none")


def sweep_without_checks() -> None:
    """One sweep with reconciliation off (SAGAS_RECONCILE_WINDOW None): the sweep's own cost."""
    from django.test import override_settings

    with override_settings(SAGAS_RECONCILE_WINDOW=None):
        sweep()


SWEEPS = {"a sweep, nothing stale": sweep, "a sweep, reconciliation off": sweep_without_checks}


def queries_of(call: Callable[[], Any]) -> list[str]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        call()
    return [q["sql"] for q in captured.captured_queries]


def explain(what: str, queries: list[str]) -> None:
    """Each SELECT of a page, with its plan and the time it ran, as PostgreSQL reports them."""
    from django.db import connection, transaction

    print(f"== {what}")
    for sql in queries:
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            continue
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql.replace("%", "%%"))
            plan = [row[0] for row in cursor.fetchall()]
        print(f"-- {sql[:300]}")
        print("\n".join("   " + line for line in plan))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", help="the database (default: <DATABASE_URL's>_bench)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--explain", action="store_true", help="print EXPLAIN (ANALYZE) of each page's queries"
    )
    args = parser.parse_args()
    os.environ["DATABASE_URL"] = bench_database_url(args.database)
    os.environ["SAGAS_LOG_LEVEL"] = "WARNING"
    debug_off()
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client

    from sagas.models import Saga, SagaStatus

    call_command("migrate", verbosity=0, interactive=False)
    # DEBUG off serves the collected files' manifest, as in production (`make run` collects).
    call_command("collectstatic", verbosity=0, interactive=False)
    user, _ = get_user_model().objects.get_or_create(
        username="bench-pages", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    # A saga from the middle of the table, as an operator would look up an old order.
    total = Saga.objects.filter(status=SagaStatus.COMPLETED).order_by().count()
    saga = (
        Saga.objects.filter(status=SagaStatus.COMPLETED).order_by("created_at")[total // 2 :][:1]
    ).get()
    results: dict[str, Any] = {"runs": args.runs, "sagas": Saga.objects.order_by().count()}
    rows = []
    for what, url in pages(str(saga.pk), saga.business_key or ""):
        call = request(client, url) if url else SWEEPS[what]
        samples, cpu = timed(call, warmup=args.warmup, runs=args.runs)
        sql = queries_of(call)
        if args.explain:
            explain(what, sql)
        counts = sum(1 for q in sql if "COUNT(" in q.upper())
        median, p95 = statistics.median(samples), percentile(samples, 95)
        cpu_median = statistics.median(cpu)
        rows.append((what, median, p95, cpu_median, len(sql), counts))
        results[what] = {"median_ms": round(median, 1), "p95_ms": round(p95, 1)}
        results[what].update(cpu_median_ms=round(cpu_median, 1), queries=len(sql), counts=counts)
    print_table(rows, results)
    print(json.dumps(results))
    return 0


def print_table(
    rows: list[tuple[str, float, float, float, int, int]], results: dict[str, Any]
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['sagas']:,} sagas: median and p95 of {results['runs']} runs")
    for column in ("page", "median ms", "p95 ms", "CPU ms", "queries", "of them COUNT"):
        table.add_column(column, justify="left" if column == "page" else "right")
    for what, median, p95, cpu, queries, counts in rows:
        table.add_row(what, f"{median:.1f}", f"{p95:.1f}", f"{cpu:.1f}", str(queries), str(counts))
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
