"""`make profile`: where a saga step's time goes, without Celery in the way.

Submits sagas and runs their steps by calling the engine in this process (as the workers do,
minus the broker), on the configured PostgreSQL (or the embedded one), in the benchmark's
database. Prints the median time of one step, the round trip of a bare `SELECT 1` on the same
connection for scale, and a pyinstrument profile of the steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench.run import bench_database_url, debug_off, steps_in_process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=50)
    parser.add_argument("--steps", type=int, default=0, help="a synthetic saga of N steps")
    args = parser.parse_args()

    os.environ["DATABASE_URL"] = bench_database_url()
    os.environ["SAGAS_MODULES"] = "bench.sagas"
    debug_off()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from pyinstrument import Profiler

    from bench.run import OrderSagas, SyntheticSagas
    from bench.tasks import ensure_table

    call_command("migrate", verbosity=0, interactive=False)
    ensure_table()
    workload = SyntheticSagas(args.steps) if args.steps else OrderSagas()

    with connection.cursor() as cursor:
        started = time.perf_counter()
        for _ in range(500):
            cursor.execute("SELECT 1")
        round_trip_ms = (time.perf_counter() - started) / 500 * 1000

    with steps_in_process() as run_one:
        for _ in range(5):  # warm up: imports, connections, caches
            run_one(workload)
        per_saga = []
        profiler = Profiler(interval=0.0005)
        with profiler:
            for _ in range(args.sagas):
                started = time.perf_counter()
                run_one(workload)
                per_saga.append((time.perf_counter() - started) * 1000)

    name = f"{args.steps}-step synthetic saga" if args.steps else "order saga"
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    print(
        f"{name}: {statistics.median(per_saga) / workload.steps:.2f} ms a step "
        f"(submission included, median of {args.sagas}); "
        f"SELECT 1 round trip {round_trip_ms:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
