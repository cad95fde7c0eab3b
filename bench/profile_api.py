"""`make profile-api`: where a request's time goes, `POST /api/orders/` against the ceiling.

Serves both endpoints of `make bench-api` (`POST /api/orders/` and the ceiling,
`POST /bench/submissions/`) in this process through Django's test client, DEBUG off as in
production, on the configured PostgreSQL and Redis, in the benchmark's database. The messages
go to a queue of the run's own, which no worker reads and which is deleted at the end. The two
endpoints take turns, request by request, so that both see the same machine. Prints, for each,
the median wall time and the mean CPU time of a request and its SQL statements (`--show-sql`
prints them), then a pyinstrument profile (`--profile`, of the orders endpoint by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.run import bench_database_url, debug_off

ORDERS = "/api/orders/"
CEILING = "/bench/submissions/"


def measure(sends: dict[str, Callable[[], Any]], requests: int) -> dict[str, dict[str, float]]:
    """Median wall and mean CPU milliseconds of `requests` calls to each of `sends`, the
    endpoints taking turns, so that both see the same machine (it may be shared)."""
    wall: dict[str, list[float]] = {name: [] for name in sends}
    cpu: dict[str, list[float]] = {name: [] for name in sends}
    for _ in range(requests):
        for name, send in sends.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            send()
            cpu[name].append((time.process_time() - started_cpu) * 1000)
            wall[name].append((time.perf_counter() - started) * 1000)
    return {
        name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.mean(cpu[name])}
        for name in sends
    }


def statements(send: Callable[[], Any]) -> list[str]:
    """The SQL one call to `send` runs, in order."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        send()
    return [query["sql"] for query in queries.captured_queries]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per endpoint")
    parser.add_argument(
        "--profile",
        choices=["orders", "ceiling", "none"],
        default="orders",
        help="which to profile",
    )
    parser.add_argument("--show-sql", action="store_true", help="print each endpoint's SQL")
    args = parser.parse_args()

    os.environ["DATABASE_URL"] = bench_database_url()
    os.environ["SAGAS_MODULES"] = "bench.sagas"
    os.environ["SAGAPROJECT_BENCH_ENDPOINTS"] = "1"
    os.environ["SAGAS_LOG_LEVEL"] = "WARNING"
    os.environ["DJANGO_SECURE_SSL_REDIRECT"] = "0"  # plain http, as bench-api's server
    os.environ["ORDERS_THROTTLE_RATE"] = "1000000/minute"  # counted, never reached
    queue = f"bench-api-profile-{uuid.uuid4().hex[:8]}"
    os.environ["CELERY_TASK_DEFAULT_QUEUE"] = queue
    debug_off()
    import django

    django.setup()
    from django.core.management import call_command
    from pyinstrument import Profiler
    from rest_framework.test import APIClient

    from bench.api_load import api_user, purge_queue, seed
    from bench.tasks import ensure_table

    call_command("migrate", verbosity=0, interactive=False)
    ensure_table()
    try:
        _sku, order = seed()
        _user, token = api_user("profile")
        client = APIClient(HTTP_AUTHORIZATION=f"Token {token}", HTTP_ACCEPT="application/json")
        bodies = {ORDERS: order, CEILING: {"sku": _sku, "quantity": 1}}

        def sender(path: str) -> Callable[[], Any]:
            body = json.dumps(bodies[path])

            def send() -> Any:
                response = client.post(path, body, content_type="application/json")
                if response.status_code != 202:
                    raise SystemExit(f"bench: {path} answered {response.status_code}")
                return response

            return send

        sends = {path: sender(path) for path in (ORDERS, CEILING)}
        sql = {}
        for path, send in sends.items():
            for _ in range(20):  # warm up: imports, connections, caches
                send()
            sql[path] = statements(send)
            if args.show_sql:
                print(f"-- {path}")
                print("\n".join(sql[path]))
        results = measure(sends, args.requests)
        profiled = {"orders": ORDERS, "ceiling": CEILING}.get(args.profile)
        if profiled:
            send = sender(profiled)
            profiler = Profiler(interval=0.0002)
            with profiler:
                for _ in range(args.requests):
                    send()
            print(profiler.output_text(unicode=True, color=False, show_all=False))
    finally:
        purge_queue(queue)

    for path, result in results.items():
        print(
            f"POST {path}: {result['wall_ms']:.2f} ms a request (median), "
            f"{result['cpu_ms']:.2f} ms CPU, {len(sql[path])} SQL statements"
        )
    ratio = results[CEILING]["wall_ms"] / results[ORDERS]["wall_ms"]
    cpu_ratio = results[CEILING]["cpu_ms"] / results[ORDERS]["cpu_ms"]
    print(
        f"orders / ceiling, requests per second in one process: {ratio:.2f} "
        f"(by CPU time: {cpu_ratio:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
