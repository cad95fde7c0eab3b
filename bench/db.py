"""`make bench-db`: what a saga step costs PostgreSQL, against a bare Celery task.

Starts a PostgreSQL cluster of its own (in a temporary folder, on a free port; the configured
server's binaries, else the embedded one's), with `pg_stat_statements` loaded where the
binaries have it and without full-page images (`full_page_writes = off`: a throwaway cluster),
then runs real Celery worker processes (WORKER_CONCURRENCY, default 2) on it and measures, in
the same run and batch after batch in turn: the synthetic saga (4 one-UPDATE steps), the order
saga and a bare chain of 4 tasks each doing one committed UPDATE. Per step (per task for the
bare chain), the benchmark's own polling excluded (it runs as a role of its own, on a
connection whose backend's CPU is subtracted):

- PostgreSQL CPU: every process of the cluster (backends, background workers and those that
  exited, through the postmaster's children's times);
- WAL bytes (the records' sizes read back with `pg_waldump`), by table and index;
- statements (`pg_stat_statements`, transaction control apart) and their executor time;
- commits (`pg_stat_database`), and round trips (counted on the client, the steps driven in
  this process as a worker drives them);
- the share of each table's updates that were HOT;

and the 16-core ceiling computed from the CPU. Prints a table, then one JSON object as its
last line. With `--fill N`, the tables first hold N finished order sagas, copied as `make fill`
copies them (the cluster's `shared_buffers` is 256 MB: large tables are read from the OS's
cache, as a busy server's would be).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.run import (
    BareChains,
    OrderSagas,
    SyntheticSagas,
    count_database_work,
    prepare,
    report,
    steps_in_process,
    workers,
)

POLLER = "bench_poll"  # the role the benchmark polls as: its statements are left out
# PostgreSQL's backends send their statistics (commits, updates) at most this often when idle
# (PGSTAT_IDLE_INTERVAL, 10 s): a batch's figures are read once they have all been sent.
STATS_FLUSH = 11.0
CORES = 16
TABLES = ("sagas_saga", "sagas_sagastep", "sagas_sagaevent", "sagas_sagamember", "bench_counter")


# -- the cluster -------------------------------------------------------------------------------


def bindir() -> Path:
    """`PG_BINDIR`, else the server's binaries on PATH (`pg_config --bindir`), else the
    embedded server's (pgserver, without `pg_stat_statements`)."""
    if configured := os.environ.get("PG_BINDIR"):
        return Path(configured)
    if pg_config := shutil.which("pg_config"):
        return Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())
    import pgserver  # type: ignore[import-untyped]

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def has_statements(bin: Path) -> bool:
    """Whether these binaries have the `pg_stat_statements` module."""
    libdir = subprocess.check_output([bin / "pg_config", "--pkglibdir"], text=True).strip()
    return (Path(libdir) / "pg_stat_statements.so").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    url: str
    data: Path
    bin: Path
    statements: bool
    pid: int = 0


@contextmanager
def private_cluster() -> Iterator[Cluster]:
    bin = bindir()
    statements = has_statements(bin)
    folder = Path(tempfile.mkdtemp(prefix="sagas-bench-db-"))
    data = folder / "data"
    port = free_port()
    # PostgreSQL refuses to run as root: as root, the cluster runs as the embedded server's
    # system user (pgserver's `pgserver`, made if missing).
    user = None
    if os.geteuid() == 0:
        from pgserver.utils import ensure_user_exists  # type: ignore[import-untyped]

        user = "pgserver"
        ensure_user_exists(user)
        shutil.chown(folder, user)
    subprocess.run(
        [bin / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
        user=user,
    )
    settings = {
        "port": str(port),
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{folder}'",
        "full_page_writes": "off",  # WAL without full-page images: the records alone
        "checkpoint_timeout": "'1h'",
        "max_wal_size": "'20GB'",
        "shared_buffers": "'256MB'",
    }
    if statements:
        settings |= {
            "shared_preload_libraries": "'pg_stat_statements'",
            "pg_stat_statements.track": "top",
            "pg_stat_statements.track_utility": "on",
            "pg_stat_statements.max": "10000",
        }
    with (data / "postgresql.conf").open("a") as conf:
        conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
    subprocess.run(
        [bin / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "start"],
        check=True,
        capture_output=True,
        user=user,
    )
    cluster = Cluster(f"postgres://postgres@127.0.0.1:{port}/postgres", data, bin, statements)
    cluster.pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        yield cluster
    finally:
        subprocess.run(
            [bin / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
            capture_output=True,
            user=user,
        )
        shutil.rmtree(folder, ignore_errors=True)


# -- what a batch cost -------------------------------------------------------------------------


@dataclass
class Reading:
    cpu: float  # seconds: the cluster's processes, the poller's backend apart
    lsn: str
    statements: int
    exec_ms: float
    commits: int
    updates: dict[str, tuple[int, int]]
    calls: dict[str, int]


@dataclass
class Poller:
    """The benchmark's own connection (role `bench_poll`): its statements, commits and CPU are
    not the workload's."""

    conn: Any
    postmaster: int
    statements: bool
    queries: int = 0

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        self.queries += 1  # autocommit: a commit each
        return self.conn.execute(sql, params).fetchall()

    def cpu(self) -> float:
        master = psutil.Process(self.postmaster)
        times = master.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        own = self.conn.info.backend_pid
        for child in master.children():
            try:
                t = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            if child.pid != own:
                total += t.user + t.system
        return total

    def read(self) -> Reading:
        cpu = self.cpu()
        self.execute("SELECT pg_stat_clear_snapshot()")
        ((lsn,),) = self.execute("SELECT pg_current_wal_insert_lsn()::text")
        statements, exec_ms, calls = 0, 0.0, {}
        if self.statements:
            calls = dict(
                self.execute(
                    "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 160), sum(calls) "
                    "FROM pg_stat_statements WHERE userid <> %s::regrole GROUP BY 1",
                    [POLLER],
                )
            )
            ((statements, exec_ms),) = self.execute(
                "SELECT coalesce(sum(calls), 0), coalesce(sum(total_exec_time), 0) "
                "FROM pg_stat_statements WHERE userid <> %s::regrole "
                "AND query !~* '^\\s*(BEGIN|COMMIT|ROLLBACK|SET|SAVEPOINT|RELEASE)'",
                [POLLER],
            )
        ((commits,),) = self.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        rows = self.execute(
            "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
            "WHERE relname = ANY(%s)",
            [list(TABLES)],
        )
        return Reading(
            cpu,
            lsn,
            int(statements),
            float(exec_ms),
            int(commits) - self.queries,
            {name: (upd, hot) for name, upd, hot in rows},
            calls,
        )

    def done(self, workload: Any, ids: list[str]) -> int:
        if isinstance(workload, BareChains):
            sql = "SELECT count(*) FROM bench_counter WHERE id = ANY(%s::bigint[]) AND n >= %s"
            return int(self.execute(sql, [ids, workload.steps])[0][0])
        sql = (
            "SELECT count(*) FROM sagas_saga WHERE id = ANY(%s::uuid[]) "
            "AND status IN ('completed', 'compensated', 'failed')"
        )
        return int(self.execute(sql, [ids])[0][0])


@dataclass
class Totals:
    """A workload's sums over its batches."""

    steps: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    statements: int = 0
    exec_ms: float = 0.0
    commits: int = 0
    wal: int = 0
    wal_by: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    updates: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))


RECORD = re.compile(r"rmgr: (\w+)\s+len \(rec/tot\):\s*\d+/\s*(\d+)")
BLOCK = re.compile(r"blkref #0: rel \d+/\d+/(\d+)")


def wal_by_relation(cluster: Cluster, start: str, end: str, names: dict[int, str]) -> dict:
    """The WAL written between two positions, by the relation of each record's first block (a
    commit's and other records without one under their resource manager's name)."""
    out = subprocess.run(
        [cluster.bin / "pg_waldump", "-p", cluster.data / "pg_wal", "-s", start, "-e", end],
        capture_output=True,
        text=True,
    ).stdout
    sizes: dict[str, int] = defaultdict(int)
    for line in out.splitlines():
        if m := RECORD.search(line):
            rmgr, size = m.groups()
            node = b.group(1) if (b := BLOCK.search(line)) else None
            key = names.get(int(node), f"relation {node}") if node else f"({rmgr.lower()})"
            sizes[key] += int(size)
    return sizes


def batch(poller: Poller, cluster: Cluster, workload: Any, count: int, totals: Totals) -> None:
    before = poller.read()
    started = time.perf_counter()
    ids = [workload.submit() for _ in range(count)]
    deadline = time.monotonic() + 600
    while poller.done(workload, ids) < count:
        if time.monotonic() > deadline:
            raise SystemExit("bench-db: timed out waiting for a batch to finish")
        time.sleep(0.05)
    totals.seconds += time.perf_counter() - started
    time.sleep(STATS_FLUSH)  # the workers' backends send their statistics
    after = poller.read()
    totals.steps += count * workload.steps
    totals.cpu += after.cpu - before.cpu
    totals.statements += after.statements - before.statements
    totals.exec_ms += after.exec_ms - before.exec_ms
    totals.commits += after.commits - before.commits
    ((wal,),) = poller.execute("SELECT pg_wal_lsn_diff(%s, %s)::bigint", [after.lsn, before.lsn])
    totals.wal += int(wal)
    names = dict(poller.execute("SELECT pg_relation_filenode(oid), relname FROM pg_class"))
    for name, size in wal_by_relation(cluster, before.lsn, after.lsn, names).items():
        totals.wal_by[name] += size
    for query, calls in after.calls.items():
        totals.calls[query] += int(calls) - int(before.calls.get(query, 0))
    for table, (upd, hot) in after.updates.items():
        old = before.updates.get(table, (0, 0))
        totals.updates[table][0] += upd - old[0]
        totals.updates[table][1] += hot - old[1]


def round_trips(workload: Any, samples: int = 20) -> tuple[float, float]:
    """Round trips per step, the saga's start included, the steps driven in this process as a
    worker drives them (`bench.run.steps_in_process`), and of them the workload's own: its
    actions' and the benchmark's row (each saga's, inserted before it starts). The bare task's:
    its UPDATE, in autocommit."""
    counts = {"queries": 0, "commits": 0, "round_trips": 0}
    if isinstance(workload, BareChains):
        from bench.tasks import new_rows, touch

        row = new_rows(1)[0]
        with count_database_work(counts):
            for _ in range(samples):
                touch(row)
        return counts["round_trips"] / samples, counts["round_trips"] / samples  # the task's own
    import bench.tasks
    from sagas.engine import forward

    actions = [0]
    resolve, new_rows = forward.resolve, bench.tasks.new_rows

    def own_rows(count: int) -> list[int]:  # the benchmark's row a saga's actions update
        before = counts["round_trips"]
        try:
            return new_rows(count)
        finally:
            actions[0] += counts["round_trips"] - before

    def counted(path: str) -> Any:
        function = resolve(path)

        def action(ctx: Any) -> Any:
            before = counts["round_trips"]
            try:
                return function(ctx)
            finally:
                actions[0] += counts["round_trips"] - before

        return action

    forward.resolve = counted  # type: ignore[assignment]
    bench.tasks.new_rows = own_rows  # type: ignore[assignment]
    try:
        with steps_in_process() as run_one:
            run_one(workload)  # its statements prepared, as in a worker that ran a few
            actions[0] = 0
            with count_database_work(counts):
                for _ in range(samples):
                    run_one(workload)
    finally:
        forward.resolve = resolve  # type: ignore[assignment]
        bench.tasks.new_rows = new_rows  # type: ignore[assignment]
    steps = samples * workload.steps
    return counts["round_trips"] / steps, actions[0] / steps


def figures(name: str, t: Totals, trips: tuple[float, float]) -> dict[str, Any]:
    per = max(t.steps, 1)
    cpu_ms = t.cpu * 1000 / per
    result = {
        f"{name}_steps_per_s": t.steps / t.seconds,
        f"{name}_cpu_ms": cpu_ms,
        f"{name}_wal_bytes": t.wal / per,
        f"{name}_statements": t.statements / per,
        f"{name}_exec_ms": t.exec_ms / per,
        f"{name}_commits": t.commits / per,
        f"{name}_round_trips": trips[0],
        f"{name}_round_trips_beyond_action": trips[0] - trips[1],
        f"{name}_ceiling_16_cores": CORES * 1000 / cpu_ms if cpu_ms else 0.0,
    }
    for relation, size in sorted(t.wal_by.items(), key=lambda kv: -kv[1]):
        result[f"{name}_wal.{relation}"] = size / per
    for table, (upd, hot) in t.updates.items():
        if upd:
            result[f"{name}_hot.{table}"] = hot / upd
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=300, help="sagas (or chains) per batch")
    parser.add_argument("--batches", type=int, default=3, help="batches per workload")
    parser.add_argument(
        "--statements", type=int, default=0, help="list each saga's N most frequent statements"
    )
    parser.add_argument(
        "--fill",
        type=int,
        default=0,
        help="first fill the tables with as many finished order sagas (as `make fill` does)",
    )
    args = parser.parse_args()
    concurrency = int(os.environ.get("WORKER_CONCURRENCY", "2"))
    with private_cluster() as cluster:
        os.environ["DATABASE_URL"] = cluster.url
        queue = prepare()
        if args.fill:
            from bench.fill import fill, run_templates, vacuum

            templates = run_templates(queue, concurrency)
            fill(templates, sagas=args.fill, batch=50_000, keep_indexes=False)
            vacuum()
        import psycopg
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                f"DO $$ BEGIN CREATE ROLE {POLLER} SUPERUSER LOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
            if cluster.statements:
                cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        poll_url = connection.settings_dict
        conn = psycopg.connect(
            host=poll_url["HOST"],
            port=poll_url["PORT"],
            dbname=poll_url["NAME"],
            user=POLLER,
            autocommit=True,
        )
        poller = Poller(conn, cluster.pid, cluster.statements)
        loads = {
            "synthetic": SyntheticSagas(4),
            "order": OrderSagas(),
            "bare": BareChains(4),
        }
        totals = {name: Totals() for name in loads}
        results: dict[str, Any] = {
            "workers": concurrency,
            "sagas": args.sagas,
            "filled": args.fill,
        }
        with workers(queue, concurrency):
            for workload in loads.values():  # warm up: imports, prepared statements, caches
                batch(poller, cluster, workload, 20, Totals())
            for _ in range(args.batches):
                for name, workload in loads.items():
                    batch(poller, cluster, workload, args.sagas, totals[name])
        for name, workload in loads.items():
            results.update(figures(name, totals[name], round_trips(workload)))
        results["statements_measured"] = cluster.statements
        for name in ("synthetic", "order") if args.statements else ():
            print(f"The {name} saga's most frequent statements, calls per step:")
            t = totals[name]
            for query, calls in sorted(t.calls.items(), key=lambda kv: -kv[1])[: args.statements]:
                if calls:
                    print(f"  {calls / t.steps:5.2f}  {query}")
        conn.close()
        from django.db import connections

        connections.close_all()
    return report(results, print_table)


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = ("synthetic", "order", "bare")
    table = Table(
        title=f"What a step costs PostgreSQL ({r['workers']} worker processes, "
        f"{r['sagas']} a batch; per step, per task for the bare chain)"
    )
    table.add_column("per step", justify="left")
    for heading in ("synthetic saga (4 steps)", "order saga", "bare task"):
        table.add_column(heading, justify="right")
    rows = [
        ("PostgreSQL CPU, ms", "cpu_ms", "{:.3f}"),
        ("WAL, bytes", "wal_bytes", "{:,.0f}"),
        ("statements", "statements", "{:.2f}"),
        ("executor time, ms", "exec_ms", "{:.3f}"),
        ("commits", "commits", "{:.2f}"),
        ("round trips (the start's share included)", "round_trips", "{:.2f}"),
        (
            "  beyond the actions' own (and the benchmark's row)",
            "round_trips_beyond_action",
            "{:.2f}",
        ),
        ("steps/s (this machine)", "steps_per_s", "{:,.0f}"),
        (f"ceiling on {CORES} cores, steps/s", "ceiling_16_cores", "{:,.0f}"),
    ]
    for label, key, fmt in rows:
        if key in ("statements", "exec_ms") and not r["statements_measured"]:
            continue
        table.add_row(label, *(fmt.format(r[f"{n}_{key}"]) for n in names))
    for table_name in TABLES:
        shares = [r.get(f"{n}_hot.{table_name}") for n in names]
        if any(s is not None for s in shares):
            table.add_row(
                f"HOT updates, {table_name}",
                *("" if s is None else f"{s:.0%}" for s in shares),
            )
    # The relations that take 20 bytes of a step or more, the others summed.
    relations = sorted(
        {k.split(".", 1)[1] for k in r if "_wal." in k},
        key=lambda rel: -max(r.get(f"{n}_wal.{rel}", 0) for n in names),
    )
    large = [rel for rel in relations if max(r.get(f"{n}_wal.{rel}", 0) for n in names) >= 20]
    for relation in large:
        table.add_row(
            f"  WAL, {relation}", *(f"{r.get(f'{n}_wal.{relation}', 0):,.0f}" for n in names)
        )
    others = [
        sum(r.get(f"{n}_wal.{rel}", 0) for rel in relations if rel not in large) for n in names
    ]
    table.add_row("  WAL, the other relations", *(f"{o:,.0f}" for o in others))
    Console(width=120).print(table)
    print(
        f"The ceiling: {CORES} cores of a database server that does nothing else, each step "
        "costing the CPU measured here; WAL, disks and the network not counted."
    )


if __name__ == "__main__":
    raise SystemExit(main())
