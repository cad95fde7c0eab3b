"""What the engine's calls cost a step, in process: `engine.step_attempt` of synthetic sagas, timed.

Submits sagas of `--steps` steps (each step one UPDATE) and runs their steps by calling the
engine in this process, as `make profile` does, timing the `engine.step_attempt` calls alone (not
the submission), in wall time and in this process's CPU time: what the framework's Python
costs, which is what signals, metrics and traces add to, and which a busy database server
shared with other work disturbs less than the wall time. The observability settings come
from the environment, as in `make run`: `SAGAS_METRICS=1`, `SAGAS_TRACING=1`; `--receivers`
connects a receiver to every signal of `sagas.signals`. Prints the medians and means of a
step, then one JSON line.

    .venv/bin/python -m bench.hot_path --sagas 200 --steps 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import psutil

from bench.breakdown import cpu_seconds
from bench.run import bench_database_url, debug_off, steps_in_process

# The bound of an attempt's session as a worker sets it: the steps' 60 s time limit and the
# hard kill's 10 s grace (`sagas.tasks`, `sagas.engine.rows.read.SESSION_BOUNDS_SQL`).
WORKER_BOUND = 70.0


def connect_receivers() -> int:
    from sagas import signals

    def receiver(**kwargs: Any) -> None:
        return None

    names = [name for name in signals.__all__ if name.startswith(("saga_", "step_"))]
    for name in names:
        getattr(signals, name).connect(receiver, weak=False)
    return len(names)


def server_process() -> list[psutil.Process]:
    """The PostgreSQL server process of this process's connection if it runs on this host
    (a list of one), or none."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    try:
        process = psutil.Process(pid)
        return [process] if process.name() == "postgres" else []
    except psutil.Error:
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--receivers", action="store_true", help="a receiver on every signal")
    parser.add_argument("--database", help="the database (default: <DATABASE_URL's>_bench)")
    args = parser.parse_args()

    os.environ["DATABASE_URL"] = bench_database_url(args.database)
    os.environ["SAGAS_MODULES"] = "bench.sagas"
    os.environ.setdefault("SAGAS_METRICS", "0")
    debug_off()
    import django

    django.setup()
    from django.core.management import call_command

    from bench.run import SyntheticSagas
    from bench.tasks import ensure_table
    from sagas import engine

    call_command("migrate", verbosity=0, interactive=False)
    ensure_table()
    if args.receivers:
        connect_receivers()
    workload = SyntheticSagas(args.steps)
    per_step: list[float] = []
    cpu_per_step: list[float] = []
    server = server_process()
    server_cpu = 0.0

    with steps_in_process():
        for round_ in range(args.sagas + 10):
            saga_id = workload.submit()
            server_started = sum(cpu_seconds(server).values())
            for index in range(args.steps):
                started, cpu_started = time.perf_counter(), time.process_time()
                # As a worker calls it: its first chain, its session bounded by the hard time limit.
                outcome = engine.step_attempt(saga_id, index, epoch=1, bound=WORKER_BOUND)
                cpu = (time.process_time() - cpu_started) * 1000
                elapsed = (time.perf_counter() - started) * 1000
                assert outcome.kind == "done", outcome
                if round_ >= 10:  # the first ten warm up: imports, connections, caches
                    per_step.append(elapsed)
                    cpu_per_step.append(cpu)
            if round_ >= 10:
                server_cpu += sum(cpu_seconds(server).values()) - server_started

    result = {
        "steps": args.steps,
        "sagas": args.sagas,
        "metrics": os.environ.get("SAGAS_METRICS", "0"),
        "tracing": os.environ.get("SAGAS_TRACING", "0"),
        "receivers": args.receivers,
        "median_ms": round(statistics.median(per_step), 4),
        "mean_ms": round(statistics.fmean(per_step), 4),
        "cpu_mean_ms": round(statistics.fmean(cpu_per_step), 4),
        # The database server process's CPU per step (its own statements), when it runs here.
        "server_cpu_mean_ms": (round(server_cpu * 1000 / len(per_step), 4) if server else None),
    }
    print(
        f"engine.step_attempt: median {result['median_ms']} ms, "
        f"mean {result['mean_ms']} ms a step; "
        f"CPU {result['cpu_mean_ms']} ms a step (mean); "
        f"the database server's CPU {result['server_cpu_mean_ms']} ms a step (mean)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
