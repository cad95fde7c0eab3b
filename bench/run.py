"""`make bench`: end-to-end saga throughput and latency against the bare Celery chain.

Runs real Celery worker processes (WORKER_CONCURRENCY, default 2) on PostgreSQL and Redis, in
a database of its own (`<database>_bench`), and measures in the same run and with the same
settings: the order saga (success path and compensation path), a bare chain of as many tasks
each doing one committed UPDATE, a synthetic saga of 4 and 16 one-UPDATE steps against bare
chains of 4 and 16 tasks, a group of 4 one-UPDATE members then such a step against a bare
chord of the same shape, the 4-step saga with its middle two steps in a child saga against
it inline, latency one saga at a time, database cost per step (and per member of
the group) and the peak memory of the worker processes. Prints a table, then one JSON object as
its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import psutil

from sagas.testing.worker import CeleryWorker

ROOT = Path(__file__).resolve().parent.parent
FINAL = ("completed", "compensated", "failed")
# The order saga's compensation path (it fails at its last step): 4 step tasks, the error
# callback and 3 compensations, the tasks of a bare chain it is measured against.
COMPENSATION_PATH_TASKS = 8


# The bound of an attempt's session as a worker sets it: the steps' 60 s time limit and the
# hard kill's 10 s grace (`sagas.tasks`, `sagas.engine.rows.read.SESSION_BOUNDS_SQL`).
WORKER_BOUND = 70.0


def debug_off() -> None:
    """DEBUG off, as in production (no query log in the workers), with a secret key of this
    run's own: with DEBUG off the project refuses to start on the development key."""
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))


def bench_database_url(name: str | None = None) -> str:
    """The configured server (or the embedded one), with a database of the benchmark's own:
    `name`, by default `<database>_bench`. Never the configured database itself."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")
    base = os.environ.get("DATABASE_URL")
    if not base:
        from sagaproject import embedded

        base = embedded.postgres_url()
        os.environ["DATABASE_URL"] = base
    parts = urlsplit(base)
    own = parts.path.lstrip("/") or "postgres"
    name = name or own + "_bench"
    if name == own:
        raise SystemExit(f"bench: {name} is the database of DATABASE_URL; name another one")
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path="/" + name))


def chord_backend_url() -> str:
    """The bare chord's result backend: `BENCH_CHORD_BACKEND`, else the broker's Redis server
    with the database numbered after the broker's. Never the broker's database."""
    broker = urlsplit(os.environ["CELERY_BROKER_URL"])
    if url := os.environ.get("BENCH_CHORD_BACKEND"):
        backend = url
    elif broker.scheme == "redis+socket":  # the embedded server: its database in the query
        query = parse_qs(broker.query)
        database = int(query.get("virtual_host", ["0"])[0].strip("/") or 0)
        query["virtual_host"] = [str((database + 1) % 16)]
        backend = urlunsplit(broker._replace(scheme="socket", query=urlencode(query, doseq=True)))
    else:
        database = int(broker.path.strip("/") or 0)
        backend = urlunsplit(broker._replace(path=f"/{(database + 1) % 16}"))
    if backend == urlunsplit(broker):
        raise SystemExit(f"bench: the chord's result backend {backend} is the broker's database")
    return backend


def workers(queue: str, concurrency: int, result_backend: str | None = None) -> CeleryWorker:
    """One worker node of `concurrency` processes on the run's queue, with the benchmark's tasks,
    logging to .local/bench/worker-0.log; with `result_backend`, the one a chord needs (Celery
    reads `CELERY_RESULT_BACKEND` before its settings). The project has none, and its tasks,
    which ignore their results (`CELERY_TASK_IGNORE_RESULT`), never touch this one."""
    backend = {"CELERY_RESULT_BACKEND": result_backend} if result_backend else {}
    return CeleryWorker(
        "sagaproject",
        queue=queue,
        name="bench",
        concurrency=concurrency,
        env={
            "CELERY_TASK_DEFAULT_QUEUE": queue,
            "SAGAS_MODULES": "bench.sagas",
            "SAGAS_LOG_LEVEL": "WARNING",
            **backend,
        },
        log=ROOT / ".local" / "bench" / "worker-{index}.log",
        include=["bench.tasks"],
        cwd=ROOT,
        stop_timeout=30,
    )


def peak_rss_mb(workers: CeleryWorker) -> float:
    """Peak resident memory (VmHWM) of the largest worker process."""
    peak = 0
    for proc in workers.procs:
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return peak / 1024


def wait(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(interval)


# -- workloads ---------------------------------------------------------------------------------


class OrderSagas:
    """The reference order saga; `fail_last` sends it down the compensation path. Its card
    (`tok_ok`) skips the 3-D Secure wait: `steps` counts its steps, `waits` the indexes of
    the stages that are waits."""

    steps = 4

    @property
    def waits(self) -> tuple[int, ...]:
        from orders.sagas import ORDER_FULFILMENT
        from sagas.definitions import Wait

        return tuple(i for i, s in enumerate(ORDER_FULFILMENT.steps) if isinstance(s, Wait))

    def __init__(self, fail_last: bool = False) -> None:
        from decimal import Decimal

        from inventory.services import product_create

        self.country = "AQ" if fail_last else "NO"
        sku = f"BENCH-{uuid.uuid4().hex[:8]}"
        self.sku = product_create(
            sku=sku, name="Bench", price=Decimal("1.00"), stock_on_hand=10**9
        ).sku

    def submit(self) -> str:
        from orders.services import order_submit

        saga, _ = order_submit(
            customer=None,
            items=[{"sku": self.sku, "quantity": 1}],
            shipping_address={
                "name": "B",
                "line1": "1 Road",
                "city": "Oslo",
                "postal_code": "0150",
                "country": self.country,
            },
            payment_token="tok_ok",
        )
        return str(saga.pk)

    def done(self, ids: list[str]) -> int:
        from sagas.models import Saga

        return Saga.objects.filter(pk__in=ids, status__in=FINAL).count()


class SyntheticSagas:
    """A saga of `steps` steps, each one UPDATE: the framework's cost alone."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def submit(self) -> str:
        from bench.tasks import new_rows
        from sagas.services import saga_start

        saga, _ = saga_start(name=f"bench_{self.steps}", input={"row": new_rows(1)[0]})
        return str(saga.pk)

    done = OrderSagas.done


class BareChains:
    """The ceiling: `steps` tasks in a chain, each one committed UPDATE."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def submit(self) -> str:
        from celery import chain

        from bench.tasks import bare_step, new_rows

        row = new_rows(1)[0]
        chain(*[bare_step.si(row) for _ in range(self.steps)]).apply_async()
        return str(row)

    def done(self, ids: list[str]) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM bench_counter WHERE id = ANY(%s) AND n >= %s",
                [[int(i) for i in ids], self.steps],
            )
            return cursor.fetchone()[0]


class ChildSagas(SyntheticSagas):
    """The 4 steps of `bench_4`, the middle two in a child saga (`bench_with_child`)."""

    def __init__(self) -> None:
        super().__init__(4)

    def submit(self) -> str:
        from bench.tasks import new_rows
        from sagas.services import saga_start

        saga, _ = saga_start(name="bench_with_child", input={"row": new_rows(1)[0]})
        return str(saga.pk)


class GroupSagas:
    """A saga whose first stage is a group of 4 members, then one step (`bench_group`): each
    member and the step one UPDATE of a row of its own."""

    def __init__(self) -> None:
        from bench.sagas import GROUP_MEMBERS

        self.members = GROUP_MEMBERS
        self.steps = self.members + 1  # its tasks, as a chain's steps are

    def submit(self) -> str:
        from bench.sagas import GROUP_STAGES
        from bench.tasks import new_rows
        from sagas.services import saga_start

        rows = dict(zip(GROUP_STAGES, new_rows(len(GROUP_STAGES)), strict=True))
        saga, _ = saga_start(name="bench_group", input={"rows": rows})
        return str(saga.pk)

    done = OrderSagas.done


def chord_app(queue: str) -> Any:
    """A Celery app that sends the bare chords, and nothing else: the project's broker and the
    run's queue, with the chord's result backend (`chord_backend_url`), which the project's
    app has not."""
    from celery import Celery
    from django.conf import settings

    app = Celery(
        "bench_chord",
        broker=settings.CELERY_BROKER_URL,
        backend=chord_backend_url(),
        set_as_current=False,
    )
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
    )
    return app


class BareChords:
    """The ceiling of a group: a Celery chord of as many tasks, each one committed UPDATE of a
    row of its own, then its callback doing the same. Celery joins it in its result backend
    (Redis: the last task of the header to end sends the callback)."""

    def __init__(self, app: Any) -> None:
        from bench.sagas import GROUP_MEMBERS

        self.app, self.members = app, GROUP_MEMBERS
        self.steps = self.members + 1  # its tasks

    def submit(self) -> str:
        from celery import chord

        from bench.tasks import new_rows

        *members, last = new_rows(self.members + 1)
        # Their results ignored, as every task of the project's: the worker still hands each
        # to the chord's join, and this process subscribes to none.
        header = [
            self.app.signature("bench.bare_step", args=(row,), immutable=True, ignore_result=True)
            for row in members
        ]
        callback = self.app.signature("bench.bare_step", args=(last,), immutable=True)
        chord(header, callback, app=self.app).apply_async()
        return str(last)

    def done(self, ids: list[str]) -> int:
        return BareChains(1).done(ids)


def throughput(workload: Any, count: int) -> float:
    started = time.perf_counter()
    ids = [workload.submit() for _ in range(count)]
    wait(lambda: workload.done(ids) == count, 600, "the batch to finish", interval=0.02)
    return count / (time.perf_counter() - started)


def latencies(workload: Any, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        ids = [workload.submit()]
        wait(lambda: workload.done(ids) == 1, 60, "one saga", interval=0.002)  # noqa: B023
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


# -- database cost -----------------------------------------------------------------------------


@contextmanager
def count_database_work(counts: dict[str, int]):
    """Count statements, commits and round trips on every connection of this process. A round
    trip: a statement sent alone (and the BEGIN psycopg sends alone before the first one of a
    transaction), a pipeline of statements (psycopg's pipeline mode: sent together, their
    results read together), a COMMIT sent alone."""
    from django.db import connections
    from psycopg.pq import TransactionStatus

    originals = {}
    counts.setdefault("round_trips", 0)

    def wrapper(alias: str):
        def execute(execute, sql, params, many, context):
            counts["queries"] += 1
            raw = connections[alias].connection
            if not connections[alias].in_atomic_block:
                counts["commits"] += 1  # a statement in autocommit mode commits by itself
            if raw._pipeline is None:
                counts["round_trips"] += 1
                idle = raw.info.transaction_status == TransactionStatus.IDLE
                counts["round_trips"] += int(idle and not raw.autocommit)  # its BEGIN
            return execute(sql, params, many, context)

        return execute

    for alias in connections:
        conn = connections[alias]
        conn.ensure_connection()
        raw = conn.connection
        originals[alias] = raw.commit, raw.pipeline
        conn.execute_wrappers.append(wrapper(alias))

        def commit(alias=alias, raw=raw):
            counts["commits"] += 1
            if raw.info.transaction_status != TransactionStatus.IDLE:
                counts["round_trips"] += 1  # a COMMIT sent alone
            return originals[alias][0]()

        def pipeline(alias=alias, raw=raw):
            counts["round_trips"] += int(raw._pipeline is None)  # the outermost one
            return originals[alias][1]()

        raw.commit = commit  # type: ignore[method-assign]
        raw.pipeline = pipeline  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        for alias in connections:
            connections[alias].execute_wrappers.pop()
            raw = connections[alias].connection
            raw.commit, raw.pipeline = originals[alias]  # type: ignore[method-assign]


@contextmanager
def steps_in_process():
    """Run sagas' steps by calling the engine here: no message is sent, no worker needed.

    Yields a function that submits one saga of a workload and runs its steps in order.
    """
    from sagas import engine
    from sagas.engine import dispatch

    def run_one(workload: Any) -> None:
        saga_id = workload.submit()
        # Its stages: a wait its condition skips (the order saga's 3-D Secure wait, for other
        # cards) is passed as the step before completes, and the steps after it come in a new
        # chain (the next epoch), as a worker gets them.
        waits = getattr(workload, "waits", ())
        epoch = 1
        for index in range(workload.steps + len(waits)):
            if index in waits:
                epoch += 1
                continue
            # As a worker calls it: its chain, its session bounded by the hard time limit.
            outcome = engine.step_attempt(saga_id, index, epoch=epoch, bound=WORKER_BOUND)
            assert outcome.kind == "done", outcome

    send_steps = dispatch.send_steps
    dispatch.send_steps = lambda *args: None  # type: ignore[assignment]
    try:
        yield run_one
    finally:
        dispatch.send_steps = send_steps  # type: ignore[assignment]


def database_cost(samples: int = 20) -> dict[str, float]:
    """Queries and commits per step of the order saga, its steps driven in this process."""
    workload = OrderSagas()
    counts = {"queries": 0, "commits": 0}
    with steps_in_process() as run_one, count_database_work(counts):
        for _ in range(samples):
            run_one(workload)
    steps = samples * workload.steps
    return {
        "queries_per_step": counts["queries"] / steps,
        "commits_per_step": counts["commits"] / steps,
    }


def group_database_cost(samples: int = 20) -> dict[str, float]:
    """Queries and commits per member of the group saga (`GroupSagas`), its messages run in
    this process in the order they are sent (none is sent): the members' attempts are counted,
    the last one's join included; the start and the step after the group are not."""
    from sagas import engine
    from sagas.engine import dispatch
    from sagas.models import Saga

    sent: list[tuple[str, int, int, int | None]] = []

    def send_members(saga_id: str, epoch: int, index: int, members: list, countdown: float):
        sent.extend((saga_id, epoch, index, member) for member, _ in members)

    def send_steps(saga_id: str, epoch: int, steps: list, countdown: float):
        sent.extend((saga_id, epoch, index, None) for index, _ in steps)

    workload = GroupSagas()
    counts = {"queries": 0, "commits": 0}
    step_counts = {"queries": 0, "commits": 0}
    originals = dispatch.send_members, dispatch.send_steps
    dispatch.send_members, dispatch.send_steps = send_members, send_steps  # type: ignore[assignment]
    try:
        for _ in range(samples):
            saga_id = workload.submit()
            while sent:
                saga_id, epoch, index, member = sent.pop(0)
                if member is None:  # the step after the group, for comparison
                    with count_database_work(step_counts):
                        outcome = engine.step_attempt(
                            saga_id, index, epoch=epoch, bound=WORKER_BOUND
                        )
                else:
                    with count_database_work(counts):
                        outcome = engine.step_attempt(
                            saga_id, index, epoch=epoch, bound=WORKER_BOUND, member=member
                        )
                assert outcome.kind == "done", outcome
            assert Saga.objects.get(pk=saga_id).status == "completed"
    finally:
        dispatch.send_members, dispatch.send_steps = originals  # type: ignore[assignment]
    members = samples * workload.members
    return {
        "group_queries_per_member": counts["queries"] / members,
        "group_commits_per_member": counts["commits"] / members,
        "group_round_trips_per_member": counts["round_trips"] / members,
        "round_trips_per_step": step_counts["round_trips"] / samples,
    }


TABLES = ("sagas_saga", "sagas_sagastep")


RECONCILED_SAGAS = 10_000


def reconcile_sweep(count: int = RECONCILED_SAGAS) -> dict[str, float]:
    """A sweep with reconciliation over `count` recently finished sagas whose check is due
    (each reads one row of the outside world): one sweep's time (its batch of
    `SAGAS_RECONCILE_BATCH` checks and the rest of the sweep), and the checks per second
    through all of them. The sagas are deleted afterwards."""
    from datetime import timedelta

    from django.db import connection
    from django.utils import timezone

    from bench.tasks import new_rows
    from sagas.engine import reconcile, sweeper
    from sagas.models import Saga

    finished = timezone.now() - timedelta(minutes=5)
    rows = new_rows(count)
    Saga.objects.bulk_create(
        (
            Saga(
                name="bench_reconciled",
                status="completed",
                input={"row": row},
                finished_at=finished,
            )
            for row in rows
        ),
        batch_size=2000,
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_saga")
    try:
        began = time.perf_counter()
        swept = sweeper.sweep()
        one_sweep = time.perf_counter() - began
        began, checked = time.perf_counter(), swept.reconciled
        while checked < count:
            done = reconcile.sweep().checked
            if not done:
                break
            checked += done
        rate = (checked - swept.reconciled) / max(time.perf_counter() - began, 1e-9)
    finally:
        Saga.objects.filter(name="bench_reconciled").delete()
    return {
        "reconcile_sweep_ms": one_sweep * 1000,
        "reconcile_sweep_checked": swept.reconciled,
        "reconcile_checks_per_s": rate,
    }


def sagas_in_tables() -> int:
    """The saga table's size, as the planner knows it (no count of a filled table)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT CASE WHEN reltuples >= 0 THEN reltuples "  # -1: never analysed
            "ELSE (SELECT count(*) FROM sagas_saga) END FROM pg_class WHERE relname = 'sagas_saga'"
        )
        return max(0, int(cursor.fetchone()[0]))


def updates() -> dict[str, tuple[int, int]]:
    """Rows updated so far, and of them HOT updates (no index touched), per table."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
            "WHERE relname = ANY(%s)",
            [list(TABLES)],
        )
        return {name: (updated, hot) for name, updated, hot in cursor.fetchall()}


def hot_updates(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict:
    """The share of the run's updates of each table that were HOT."""
    shares = {}
    for table in TABLES:
        updated = after[table][0] - before[table][0]
        hot = after[table][1] - before[table][1]
        shares[f"hot_updates_{table}"] = round(hot / updated, 3) if updated else 0.0
    return shares


# -- the run -----------------------------------------------------------------------------------


def prepare(database: str | None = None) -> str:
    """Set up this process for a run in the benchmark's database: Django with DEBUG off, the
    benchmark's sagas, migrations and table, and a queue of the run's own (returned)."""
    os.environ["DATABASE_URL"] = bench_database_url(database)
    os.environ["SAGAS_MODULES"] = "bench.sagas"
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    os.environ["CELERY_TASK_DEFAULT_QUEUE"] = queue
    os.environ["SAGAS_LOG_LEVEL"] = "WARNING"
    debug_off()
    import django

    django.setup()
    from django.core.management import call_command

    from bench.tasks import ensure_table

    call_command("migrate", verbosity=0, interactive=False)
    ensure_table()
    return queue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=300, help="sagas per throughput run")
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--scaling", action="store_true", help="also 8-step sagas")
    parser.add_argument(
        "--database",
        help="the database to run in (default: <DATABASE_URL's database>_bench), such as one "
        "`make fill` filled",
    )
    args = parser.parse_args()
    concurrency = int(os.environ.get("WORKER_CONCURRENCY", "2"))

    queue = prepare(args.database)

    results: dict[str, Any] = {"workers": concurrency, "sagas": args.sagas}
    results["sagas_in_tables"] = sagas_in_tables()
    updates_before = updates()
    with workers(queue, concurrency, result_backend=chord_backend_url()) as node:
        for warmup in (OrderSagas(), BareChains(4)):
            throughput(warmup, 20)
        results["bare_chain_per_s"] = throughput(BareChains(4), args.sagas)
        results["sagas_per_s"] = throughput(OrderSagas(), args.sagas)
        results["compensation_sagas_per_s"] = throughput(OrderSagas(fail_last=True), args.sagas)
        # The compensation path sends as many tasks: 4 steps, the error callback, 3 undone.
        results["bare_8_per_s"] = throughput(BareChains(COMPENSATION_PATH_TASKS), args.sagas)
        bare = latencies(BareChains(4), args.latency_samples)
        saga = latencies(OrderSagas(), args.latency_samples)
        for steps in (4, 8, 16) if args.scaling else (4, 16):
            results[f"synthetic_{steps}_per_s"] = throughput(SyntheticSagas(steps), args.sagas)
            if steps != 4:  # the 4-task chain was measured above
                results[f"bare_{steps}_per_s"] = throughput(BareChains(steps), args.sagas)
            lat = latencies(SyntheticSagas(steps), args.latency_samples)
            bare_lat = latencies(BareChains(steps), args.latency_samples)
            results[f"synthetic_{steps}_p50_ms"] = statistics.median(lat)
            results[f"bare_{steps}_p50_ms"] = statistics.median(bare_lat)
        results["bare_4_per_s"] = results["bare_chain_per_s"]
        throughput(ChildSagas(), 20)
        results["child_per_s"] = throughput(ChildSagas(), args.sagas)
        results["child_p50_ms"] = statistics.median(latencies(ChildSagas(), args.latency_samples))
        chords = BareChords(chord_app(queue))
        for warmup in (GroupSagas(), chords):
            throughput(warmup, 20)
        results["bare_chord_per_s"] = throughput(chords, args.sagas)
        results["group_per_s"] = throughput(GroupSagas(), args.sagas)
        lat = latencies(GroupSagas(), args.latency_samples)
        bare_lat = latencies(chords, args.latency_samples)
        results["group_p50_ms"] = statistics.median(lat)
        results["bare_chord_p50_ms"] = statistics.median(bare_lat)
        results["worker_peak_rss_mb"] = round(peak_rss_mb(node), 1)
    results.update(hot_updates(updates_before, updates()))
    results.update(database_cost())
    results.update(group_database_cost())
    results.update(reconcile_sweep())
    for name, samples in (("", saga), ("bare_", bare)):
        for pct in (50, 95, 99):
            results[f"{name}p{pct}_ms"] = round(percentile(samples, pct), 2)
    results["ratio"] = round(results["sagas_per_s"] / results["bare_chain_per_s"], 3)
    results["p50_ratio"] = round(results["p50_ms"] / results["bare_p50_ms"], 3)
    results["compensation_ratio"] = round(
        results["compensation_sagas_per_s"] / results[f"bare_{COMPENSATION_PATH_TASKS}_per_s"], 3
    )
    for steps in (4, 8, 16):
        if f"synthetic_{steps}_per_s" in results:
            results[f"ratio_{steps}"] = round(
                results[f"synthetic_{steps}_per_s"] / results[f"bare_{steps}_per_s"], 3
            )
    results["group_ratio"] = round(results["group_per_s"] / results["bare_chord_per_s"], 3)
    results["child_ratio"] = round(results["child_per_s"] / results["synthetic_4_per_s"], 3)
    return report(results, print_table)


def report(results: dict[str, Any], print_table: Callable[[dict[str, Any]], None]) -> int:
    """Round the figures, print the table, then the JSON line (a run's last line)."""
    for key, value in results.items():
        if isinstance(value, float):
            results[key] = round(value, 3)
    print_table(results)
    print(json.dumps(results))
    return 0


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Order saga vs bare Celery chain ({r['workers']} worker processes)")
    for column in ("measure", "order saga", "bare chain (4 tasks)", "saga / bare"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row(
        "throughput, success path (/s)",
        f"{r['sagas_per_s']:.1f}",
        f"{r['bare_chain_per_s']:.1f}",
        f"{r['ratio']:.2f}",
    )
    table.add_row(
        "throughput, compensation path (/s; bare: 8 tasks)",
        f"{r['compensation_sagas_per_s']:.1f}",
        f"{r['bare_8_per_s']:.1f}",
        f"{r['compensation_ratio']:.2f}",
    )
    for pct in (50, 95, 99):
        table.add_row(
            f"latency p{pct} (ms)",
            f"{r[f'p{pct}_ms']:.1f}",
            f"{r[f'bare_p{pct}_ms']:.1f}",
            f"{r[f'p{pct}_ms'] / r[f'bare_p{pct}_ms']:.2f}",
        )
    table.add_row("queries per step", f"{r['queries_per_step']:.2f}", "1", "")
    table.add_row("commits per step", f"{r['commits_per_step']:.2f}", "1", "")
    table.add_row("worker peak RSS (MB)", f"{r['worker_peak_rss_mb']:.0f}", "", "")
    table.add_row(
        "HOT updates: saga rows, step rows",
        f"{r['hot_updates_sagas_saga']:.0%}, {r['hot_updates_sagas_sagastep']:.0%}",
        "",
        "",
    )
    table.add_row("sagas in the tables before the run", f"{r['sagas_in_tables']:,}", "", "")
    for steps in (4, 8, 16):
        if f"synthetic_{steps}_per_s" in r:
            table.add_row(
                f"{steps}-step synthetic saga (/s, p50 ms)",
                f"{r[f'synthetic_{steps}_per_s']:.1f}, {r[f'synthetic_{steps}_p50_ms']:.1f}",
                f"{r[f'bare_{steps}_per_s']:.1f}, {r[f'bare_{steps}_p50_ms']:.1f}",
                f"{r[f'ratio_{steps}']:.2f}",
            )
    table.add_row(
        "group of 4, then a step (/s, p50 ms; bare: a chord of 4 + 1)",
        f"{r['group_per_s']:.1f}, {r['group_p50_ms']:.1f}",
        f"{r['bare_chord_per_s']:.1f}, {r['bare_chord_p50_ms']:.1f}",
        f"{r['group_ratio']:.2f}",
    )
    table.add_row(
        "4 steps, the middle 2 in a child saga (/s, p50 ms; against: inline, the 4-step saga)",
        f"{r['child_per_s']:.1f}, {r['child_p50_ms']:.1f}",
        f"{r['synthetic_4_per_s']:.1f}, {r['synthetic_4_p50_ms']:.1f}",
        f"{r['child_ratio']:.2f}",
    )
    table.add_row(
        f"a sweep with reconciliation over {RECONCILED_SAGAS:,} finished sagas (ms; checks)",
        f"{r['reconcile_sweep_ms']:.0f}; {r['reconcile_sweep_checked']}",
        "",
        f"{r['reconcile_checks_per_s']:.0f} checks/s",
    )
    table.add_row(
        "queries, commits per group member",
        f"{r['group_queries_per_member']:.2f}, {r['group_commits_per_member']:.2f}",
        "1, 1",
        "",
    )
    table.add_row(
        "round trips: a group member's, a step's",
        f"{r['group_round_trips_per_member']:.2f}, {r['round_trips_per_step']:.2f}",
        "",
        "",
    )
    Console(stderr=False).print(table)


if __name__ == "__main__":
    sys.exit(main())
