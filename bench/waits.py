"""`make bench-waits`: waits at scale, timed on a benchmark database of waiting sagas.

With `--sagas` (default 100,000) sagas waiting for an event in the tables (added by SQL: copies
of one saga that the engine began, as `make fill` copies finished ones; one in a hundred with
a signal kept for its later wait, which the wake's check cannot tell from one it can apply),
it times in this process: the query for the due waits (`due_waits`), with none due and with
1,000 due (rolled back); the wake's check (`waker.due`); a wake and a sweep with nothing to do;
a wake that ends a batch of 200 timeouts (rolled back); the admin's list of waiting sagas and
`GET /api/sagas/?status=waiting` (Django's test client, as `make bench-pages`). Then with real
Celery workers and a real `celery beat` of the reference schedule (its sweep an hour away, so
that only the wake ends a wait): signal to resume (`saga_signal` until the next step started,
on a worker), the lateness of timers of 3 s started one after the other, and of a burst of
waits falling due at once (`--burst`). Prints each figure beside its target, then one JSON
object.

The sagas go to a database of the benchmark's own (`<database>_bench`, or `--database`);
a run adds only the waiting sagas that are missing, so the next run starts faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bench.run import ROOT, percentile, prepare, wait, workers
from sagas.testing.worker import CeleryWorker

TARGETS_MS = {
    "due_waits, none due": 100,
    "due_waits, 1,000 due": 100,
    "the wake's check (waker.due)": 100,
    "a wake, nothing due": 100,
    "a sweep, nothing stale": 100,
    "admin list, status waiting": 150,
    "GET /api/sagas/?status=waiting": 150,
}
RESUME_P50_MS = 50
ON_TIME_S = 5.0
LOGS = ROOT / ".local" / "bench"


# -- the waiting sagas -------------------------------------------------------------------------


def top_up(count: int, batch: int) -> int:
    """Make `count` sagas of `bench_wait` wait at their first wait: the missing ones are copies
    of one that the engine began, due days from now. Returns how many were added."""
    from django.db import connection, transaction

    from bench.fill import select_list
    from sagas.models import Saga, SagaEvent, SagaStatus, SagaStep
    from sagas.services import saga_start

    waiting = Saga.objects.filter(name="bench_wait", status=SagaStatus.WAITING).count()
    missing = count - waiting
    if missing <= 0:
        return 0
    template, _ = saga_start(name="bench_wait", input={"n": 0})  # waits at once, on commit
    if Saga.objects.get(pk=template.pk).status != SagaStatus.WAITING:
        raise SystemExit("bench-waits: the template saga does not wait")
    seed = uuid.uuid4().hex[:12]
    saga_id = f"md5('{seed}' || g)::uuid"
    created = "(now() - interval '1 day' + g * interval '500 microseconds')"
    shift = f"({created} - s.created_at)"
    picks = "generate_series(%(first)s, %(last)s) g JOIN sagas_saga s ON s.id = %(template)s"
    sagas = select_list(
        Saga,
        {
            "id": saga_id,
            "input": "jsonb_build_object('n', g)",
            "created_at": created,
            "updated_at": created,
        },
    )
    steps = select_list(
        SagaStep,
        {
            "saga_id": saga_id,
            "started_at": f't."started_at" + {shift}',
            # Due in a week, one second apart: none due during the run.
            "due_at": "t.\"due_at\" + g * interval '1 second'",
        },
    )
    events = select_list(SagaEvent, {"saga_id": saga_id, "created_at": f't."created_at" + {shift}'})
    statements = [
        f"INSERT INTO sagas_saga ({sagas[0]}) SELECT {sagas[1]} FROM {picks} "
        "JOIN sagas_saga t ON t.id = s.id ORDER BY g",
        f"INSERT INTO sagas_sagastep ({steps[0]}) SELECT {steps[1]} FROM {picks} "
        "JOIN sagas_sagastep t ON t.saga_id = s.id ORDER BY g, t.index",
        f"INSERT INTO sagas_sagaevent ({events[0]}) SELECT {events[1]} FROM {picks} "
        "JOIN sagas_sagaevent t ON t.saga_id = s.id ORDER BY g, t.id",
        # One in a hundred has a signal kept for its later wait (sent early).
        "INSERT INTO sagas_sagasignal (saga_id, event, payload, status, reason, created_at) "
        f"SELECT {saga_id}, 'later', '{{}}'::jsonb, 'kept', '', now() FROM {picks} "
        "WHERE g %% 100 = 0",
    ]
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")  # a bench fill: a lost batch is harmless
        for first in range(1, missing + 1, batch):
            last = min(missing, first + batch - 1)
            with transaction.atomic():
                for sql in statements:
                    cursor.execute(sql, {"first": first, "last": last, "template": template.pk})
            print(f"bench-waits: {last:,} of {missing:,} waiting sagas added", flush=True)
        for table in ("sagas_saga", "sagas_sagastep", "sagas_sagaevent", "sagas_sagasignal"):
            cursor.execute(f"VACUUM (ANALYZE) {table}")
    print(f"bench-waits: filled in {time.monotonic() - started:.0f} s (VACUUM ANALYZE included)")
    return missing + 1


# -- in this process ---------------------------------------------------------------------------


def timed(call: Callable[[], Any], *, warmup: int, runs: int) -> dict[str, float]:
    """Median and p95 of the wall time of `runs` calls, and the median CPU time of this
    process (what the call costs it, without the waits for a core on a busy machine), in ms."""
    for _ in range(warmup):
        call()
    samples, cpu = [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter(), time.process_time()
        call()
        cpu.append((time.process_time() - cpu_started) * 1000)
        samples.append((time.perf_counter() - started) * 1000)
    return {**figures(samples), "cpu_median_ms": round(statistics.median(cpu), 2)}


def query_count(call: Callable[[], Any]) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        call()
    return len(captured.captured_queries)


@contextmanager
def due_for_a_moment(count: int) -> Iterator[None]:
    """`count` of the waiting sagas' waits due, in a transaction rolled back afterwards."""
    from django.db import connection, transaction

    class RolledBack(Exception):
        pass

    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "UPDATE sagas_sagastep SET due_at = now() - interval '1 second' WHERE id IN "
                "(SELECT id FROM sagas_sagastep WHERE status = 'waiting' AND due_at IS NOT NULL "
                "ORDER BY due_at DESC LIMIT %s)",
                [count],
            )
            yield
            raise RolledBack
    except RolledBack:
        pass


def wake_nothing() -> None:
    from sagas.engine import waker

    report = waker.wake()
    if report.waits_timed_out or report.signals_applied:
        raise SystemExit("bench-waits: the wake found something due; time it with nothing")


def wake_a_batch() -> int:
    """A wake that ends 200 timeouts, rolled back: the cost of a full batch."""
    from sagas.engine import waker

    with due_for_a_moment(waker.BATCH_SIZE):
        started = time.perf_counter()
        ended = waker.wake(max_seconds=0).waits_timed_out
        elapsed = (time.perf_counter() - started) * 1000
        if len(ended) != waker.BATCH_SIZE:
            raise SystemExit(f"bench-waits: a batch ended {len(ended)} timeouts")
    return round(elapsed, 1)


def in_process(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client
    from django.utils import timezone

    from bench.pages import request, sweep
    from sagas.engine import waits, waker

    call_command("collectstatic", verbosity=0, interactive=False)  # DEBUG off: the manifest
    user, _ = get_user_model().objects.get_or_create(
        username="bench-waits", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)

    def due_waits() -> None:
        waits.due_waits(timezone.now())

    def due_waits_of_1000() -> None:
        if len(waits.due_waits(timezone.now())) != waker.BATCH_SIZE:
            raise SystemExit("bench-waits: due_waits did not find a full batch")

    calls: list[tuple[str, Callable[[], Any]]] = [
        ("due_waits, none due", due_waits),
        ("the wake's check (waker.due)", lambda: waker.due(timezone.now())),
        ("a wake, nothing due", wake_nothing),
        ("a sweep, nothing stale", sweep),
        ("admin list, status waiting", request(client, "/admin/sagas/saga/?status__exact=waiting")),
        ("GET /api/sagas/?status=waiting", request(client, "/api/sagas/?status=waiting")),
    ]
    results: dict[str, dict[str, float]] = {}
    for what, call in calls:
        results[what] = timed(call, warmup=args.warmup, runs=args.runs)
        results[what]["queries"] = query_count(call)
    with due_for_a_moment(1000):
        results["due_waits, 1,000 due"] = timed(
            due_waits_of_1000, warmup=args.warmup, runs=args.runs
        )
        results["due_waits, 1,000 due"]["queries"] = 1
    batches = [wake_a_batch() for _ in range(5)]
    results["a wake ending a batch of 200 timeouts (rolled back)"] = figures(batches)
    return results


def figures(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p95_ms": round(percentile(samples, 95), 2),
    }


# -- with workers and beat ---------------------------------------------------------------------


@contextmanager
def beat(queue: str) -> Iterator[Path]:
    """`celery beat` of the reference schedule, sending to `queue`: a wake every 2 s, the sweep
    an hour away."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / "beat-waits.log"
    schedule = LOGS / f"beat-waits-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "SAGAS_WAKE_INTERVAL": "2",
        "SAGAS_SWEEP_INTERVAL": "3600",
    }
    command = [sys.executable, "-m", "celery", "-A", "sagaproject", "beat", "-l", "info"]
    with log.open("w") as output:
        proc = subprocess.Popen(
            [*command, "-s", str(schedule)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait(lambda: "Sending due task sagas-wake" in log.read_text(), 60, "beat's first wake")
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for path in LOGS.glob(f"{schedule.name}*"):
            path.unlink()


def signal_to_resume(count: int) -> list[float]:
    """ms from `saga_signal` to the start of the step after the wait, on a worker, one saga
    at a time."""
    from django.utils import timezone

    from sagas.models import Saga, SagaStep
    from sagas.services import saga_signal

    ids = list(
        Saga.objects.filter(name="bench_wait", status="waiting", current_step=0).values_list(
            "pk", flat=True
        )[:count]
    )
    samples = []
    for saga_id in ids:
        sent = timezone.now()
        outcome = saga_signal(saga_id=saga_id, event="go", payload={"sent": sent.isoformat()})
        if outcome.status != "consumed":
            raise SystemExit(f"bench-waits: the signal was {outcome.status}")
        step = SagaStep.objects.filter(saga_id=saga_id, index=1, started_at__isnull=False)
        wait(step.exists, 30, "the step after the wait to start", interval=0.001)
        started = step.values_list("started_at", flat=True).get()
        samples.append((started - sent).total_seconds() * 1000)
    return samples


def lateness(saga_ids: list[Any]) -> list[float]:
    """Seconds between each wait's due time and the moment its timeout was recorded."""
    from sagas.models import EventKind, SagaEvent

    events = SagaEvent.objects.filter(saga_id__in=saga_ids, kind=EventKind.WAIT_TIMED_OUT)
    return [
        (created - datetime.fromisoformat(detail["due"])).total_seconds()
        for created, detail in events.values_list("created_at", "detail")
    ]


def timers(count: int) -> list[float]:
    """Timers of 3 s started 0.25 s apart (due at every moment of beat's 2 s period): how late
    each ended."""
    from sagas.models import Saga
    from sagas.services import saga_start

    ids = []
    for _ in range(count):
        ids.append(saga_start(name="bench_timer", input={})[0].pk)
        time.sleep(0.25)
    done = Saga.objects.filter(pk__in=ids, status="completed")
    wait(lambda: done.count() == len(ids), 60, "the timers to end")
    return lateness(ids)


def burst(count: int) -> tuple[list[float], float]:
    """`count` waits of the waiting sagas due at once: how late each ended, and how long the
    wakes took to end them all."""
    from django.db import connection

    from sagas.models import SagaStep

    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE sagas_sagastep SET due_at = now() WHERE id IN (SELECT id FROM "
            "sagas_sagastep WHERE status = 'waiting' AND index = 0 AND due_at IS NOT NULL "
            "ORDER BY due_at DESC LIMIT %s) RETURNING saga_id",
            [count],
        )
        ids = [row[0] for row in cursor.fetchall()]
    started = time.monotonic()
    left = SagaStep.objects.filter(saga_id__in=ids, index=0, status="waiting")
    wait(lambda: not left.exists(), 300, "the burst's timeouts", interval=0.05)
    return lateness(ids), time.monotonic() - started


def settle() -> None:
    """Wait for the sagas in flight to finish their steps."""
    from sagas.models import IN_FLIGHT, Saga

    in_flight = Saga.objects.filter(status__in=IN_FLIGHT)
    wait(lambda: not in_flight.exists(), 600, "the sagas in flight to settle", interval=0.2)


def wake_worker(queue: str, wake_queue: str) -> CeleryWorker:
    """One worker process that takes the wakes from a queue of their own (`-Q`), and sends
    the steps they start to the run's queue, which the other workers take."""
    return CeleryWorker(
        "sagaproject",
        name="bench-wake",
        env={
            "CELERY_TASK_DEFAULT_QUEUE": queue,
            "SAGAS_MODULES": "bench.sagas",
            "SAGAS_LOG_LEVEL": "WARNING",
        },
        args=["-Q", wake_queue],
        log=LOGS / "worker-wake.log",
        include=["bench.tasks"],
        cwd=ROOT,
        stop_timeout=30,
    )


def burst_figures(count: int) -> dict[str, float]:
    late, took = burst(count)
    return {
        "p50_s": round(statistics.median(late), 2),
        "max_s": round(max(late), 2),
        "all_ended_in_s": round(took, 1),
        "per_s": round(len(late) / took),
    }


def with_workers(args: argparse.Namespace, queue: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    concurrency = int(os.environ.get("WORKER_CONCURRENCY", "2"))
    with workers(queue, concurrency):
        settle()  # what a previous run left in flight, sent again (`main`)
        with beat(queue):
            signal_to_resume(5)  # warm-up
            resume = signal_to_resume(args.signals)
            results["signal to resume"] = {
                "p50_ms": round(statistics.median(resume), 1),
                "p95_ms": round(percentile(resume, 95), 1),
                "samples": len(resume),
            }
            late = timers(args.timers)
            results["timers of 3 s, lateness"] = {
                "p50_s": round(statistics.median(late), 2),
                "max_s": round(max(late), 2),
                "samples": len(late),
            }
            results[f"{args.burst:,} due at once, lateness"] = burst_figures(args.burst)
        # The wakes on a queue of their own, with a worker process of their own: no longer
        # behind the steps that the timeouts started.
        wake_queue = f"{queue}-wake"
        with wake_worker(queue, wake_queue), beat(wake_queue):
            figures = burst_figures(args.burst)
            results[f"{args.burst:,} due at once, the wake on its own queue"] = figures
        settle()  # the steps the timeouts started run before the workers stop
    return results


# -- the run -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=100_000, help="waiting sagas in the tables")
    parser.add_argument("--batch", type=int, default=25_000, help="sagas added per transaction")
    parser.add_argument("--database", help="the database (default: <DATABASE_URL's>_bench)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--signals", type=int, default=50, help="signal-to-resume samples")
    parser.add_argument("--timers", type=int, default=30, help="timers started for lateness")
    parser.add_argument("--burst", type=int, default=1000, help="waits falling due at once")
    args = parser.parse_args()
    queue = prepare(args.database)
    from sagas.models import Saga

    added = top_up(args.sagas, args.batch)
    waiting = Saga.objects.filter(status="waiting").count()
    # Sagas a previous run left in flight (stopped with their steps queued) are sent again to
    # this run's queue, which its workers empty: the timed sweeps find nothing stale.
    from sagas.engine.sweeper import sweep

    left = len(sweep(stale_after=timedelta(seconds=1), batch_size=args.sagas).recovered)
    if left:
        print(f"bench-waits: {left} sagas a previous run left in flight, sent again")
    results: dict[str, Any] = {"waiting_sagas": waiting, "added": added}
    results["load_average_before"] = round(os.getloadavg()[0], 1)  # a shared machine's noise
    results.update(in_process(args))
    results.update(with_workers(args, queue))
    results["load_average_after"] = round(os.getloadavg()[0], 1)
    print_table(results)
    print(json.dumps(results))
    return 0


def verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Waits: {results['waiting_sagas']:,} waiting sagas in the tables (load average "
        f"{results['load_average_before']} before, {results['load_average_after']} after)"
    )
    for column in ("measure", "median", "p95 / max", "CPU", "queries", "target", "met"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for what, figure in results.items():
        if not isinstance(figure, dict) or "median_ms" not in figure:
            continue
        target = TARGETS_MS.get(what)
        table.add_row(
            what,
            f"{figure['median_ms']:.1f} ms",
            f"{figure['p95_ms']:.1f} ms",
            f"{figure['cpu_median_ms']:.1f} ms" if "cpu_median_ms" in figure else "",
            str(figure.get("queries", "")),
            f"< {target} ms" if target else "",
            verdict(figure["p95_ms"] < target) if target else "",
        )
    resume = results["signal to resume"]
    table.add_row(
        "signal to resume (next step started, worker)",
        f"{resume['p50_ms']:.1f} ms",
        f"{resume['p95_ms']:.1f} ms",
        "",
        "",
        f"p50 < {RESUME_P50_MS} ms",
        verdict(resume["p50_ms"] < RESUME_P50_MS),
    )
    for what, figure in results.items():
        if isinstance(figure, dict) and "max_s" in figure:
            table.add_row(
                what + " (beat, wake every 2 s)",
                f"{figure['p50_s']:.2f} s",
                f"{figure['max_s']:.2f} s",
                "",
                "",
                f"< {ON_TIME_S:g} s" if what.startswith("timers") else "",
                verdict(figure["max_s"] < ON_TIME_S) if what.startswith("timers") else "",
            )
    Console(width=132).print(table)


if __name__ == "__main__":
    sys.exit(main())
