"""`make profile-system`: where a saga step's time goes across the whole system.

Runs, on real Celery worker processes (WORKER_CONCURRENCY, default 2) in the benchmark's
database (as `make bench`), a batch of 16-step synthetic sagas (every step one UPDATE: the
framework's cost alone) and a batch of bare Celery chains of 16 tasks (each one committed
UPDATE), and reports per step and per bare task:

- wall time (the batch's elapsed time over its steps) and, one at a time, latency;
- CPU time of the worker's pool processes, its main process, every PostgreSQL server process,
  the Redis server and this process (which submits and polls);
- with `--py-spy`, the share of the pool processes' busy Python samples by library;
- with `--round-trips` (needs `strace`), the round trips of the pool processes to PostgreSQL and
  to Redis over TCP, counted in a short separate run (strace slows what it watches).

With `--group`, the same for a saga whose first stage is a group of 4 one-UPDATE members, then
one such step, against a bare Celery chord of the same shape (as `make bench`), per task: five
a saga, five a chord.

Prints a table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.run import (
    BareChains,
    BareChords,
    GroupSagas,
    SyntheticSagas,
    chord_app,
    chord_backend_url,
    latencies,
    prepare,
    report,
    throughput,
    workers,
)

STEPS = 16
PY_SPY = str(Path(sys.executable).with_name("py-spy"))  # installed with the dev group
PARTS = ("pool processes", "worker main process", "PostgreSQL", "Redis", "submitter (this)")


def server_processes(name: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == name]


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    times = {}
    for proc in procs:
        try:
            cpu = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        times[proc.pid] = cpu.user + cpu.system
    return times


def snapshot(node: Any) -> dict[str, dict[int, float]]:
    mains = [psutil.Process(proc.pid) for proc in node.procs]
    children = [child for main in mains for child in main.children()]
    return {
        "pool processes": cpu_seconds(children),
        "worker main process": cpu_seconds(mains),
        "PostgreSQL": cpu_seconds(server_processes("postgres")),
        "Redis": cpu_seconds(server_processes("redis-server")),
        "submitter (this)": cpu_seconds([psutil.Process()]),
    }


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict:
    """CPU seconds per part between two snapshots (a process new since `before` counts whole)."""
    return {
        part: sum(t - before[part].get(pid, 0.0) for pid, t in after[part].items())
        for part in PARTS
    }


def measure(node: Any, workload: Any, count: int) -> dict[str, float]:
    before = snapshot(node)
    started = time.perf_counter()
    rate = throughput(workload, count)
    elapsed = time.perf_counter() - started
    used = cpu_used(before, snapshot(node))
    steps = count * workload.steps
    result = {"per_s": rate, "wall_ms_per_step": elapsed / steps * 1000}
    for part, seconds in used.items():
        result[f"cpu_ms_per_step {part}"] = seconds / steps * 1000
    result["cpu_ms_per_step total"] = sum(used.values()) / steps * 1000
    return result


# A socket call as strace prints it with -f -yy: `123 sendto(7<TCP:[a:p->b:5432]>, ...`.
CALL = re.compile(r"^(\d+)\s+(sendto|write|sendmsg|recvfrom|read|recvmsg)\((\d+)<TCP:\[([^\]]*)\]>")
SENDS = ("sendto", "write", "sendmsg")


def round_trips(node: Any, workload: Any, count: int, ports: dict[str, str]) -> dict[str, float]:
    """Round trips of the pool processes to each server per step, counted with strace: a
    receive that follows a send on the same connection ends one round trip (a request sent in
    several writes, or an answer read in several reads, counts once)."""
    pids = [str(c.pid) for main in node.procs for c in psutil.Process(main.pid).children()]
    out = Path(tempfile.mkdtemp(prefix="saga-strace-")) / "trace"
    calls = "trace=sendto,write,sendmsg,recvfrom,read,recvmsg"
    tracer = subprocess.Popen(
        ["strace", "-f", "-yy", "-qq", "-e", calls, "-o", str(out)]
        + [arg for pid in pids for arg in ("-p", pid)]
    )
    time.sleep(1.0)  # attached
    throughput(workload, count)
    tracer.terminate()
    tracer.wait(timeout=30)
    trips: Counter[str] = Counter()
    last: dict[tuple[str, str], str] = {}
    for line in out.read_text().splitlines():
        match = CALL.match(line)
        if not match:
            continue
        pid, call, fd, peer = match.groups()
        server = next((s for s, port in ports.items() if peer.endswith(f":{port}")), None)
        if server is None:
            continue
        sent = call in SENDS
        if not sent and last.get((pid, fd)) == "send":
            trips[server] += 1
        last[(pid, fd)] = "send" if sent else "receive"
    shutil.rmtree(out.parent, ignore_errors=True)
    return {server: trips[server] / (count * workload.steps) for server in ports}


# Where a sampled frame's file lives, by library: the first match names the layer.
LAYERS = (
    ("(sagas/", "sagas (the framework)"),
    ("(bench/", "the step's own work"),
    ("(django/", "Django (ORM, signals)"),
    ("(psycopg", "psycopg"),
    ("(kombu/", "Celery and kombu"),
    ("(celery/", "Celery and kombu"),
    ("(billiard/", "Celery and kombu"),
    ("(redis/", "redis-py"),
)


def python_profile(node: Any, workload: Any, count: int) -> dict[str, float]:
    """Share of the pool processes' busy samples by library of the innermost frame (py-spy,
    idle samples left out)."""
    pids = [c.pid for main in node.procs for c in psutil.Process(main.pid).children()]
    folder = Path(tempfile.mkdtemp(prefix="saga-py-spy-"))
    record = [PY_SPY, "record", "--rate", "250", "--gil", "--format", "raw"]
    spies = [
        subprocess.Popen(
            [*record, "--pid", str(pid), "--output", str(folder / f"{pid}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    time.sleep(1.0)  # attached
    throughput(workload, count)
    for spy in spies:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    samples: Counter[str] = Counter()
    for path in folder.glob("*.txt"):
        for line in path.read_text().splitlines():
            stack, _, weight = line.rpartition(" ")
            leaf = stack.rsplit(";", 1)[-1]
            layer = next((name for key, name in LAYERS if key in leaf), "other (Python, stdlib)")
            samples[layer] += int(weight)
    shutil.rmtree(folder, ignore_errors=True)
    total = sum(samples.values()) or 1
    return {layer: samples[layer] / total for layer in sorted(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=100, help="16-step sagas (and chains)")
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument(
        "--round-trips", action="store_true", help="count round trips per step with strace"
    )
    parser.add_argument(
        "--py-spy", action="store_true", help="where the pool processes' Python time goes"
    )
    parser.add_argument(
        "--group",
        action="store_true",
        help="a group of 4 members then a step, against a bare chord of 4 tasks then a callback",
    )
    args = parser.parse_args()
    concurrency = int(os.environ.get("WORKER_CONCURRENCY", "2"))
    queue = prepare()
    from django.conf import settings

    database = settings.DATABASES["default"]
    ports = {
        "PostgreSQL": str(database.get("PORT") or "5432"),
        "Redis": str(settings.CELERY_BROKER_URL).rsplit(":", 1)[-1].split("/")[0],
    }

    results: dict[str, Any] = {"workers": concurrency, "sagas": args.sagas, "steps": STEPS}
    backend = chord_backend_url() if args.group else None
    with workers(queue, concurrency, result_backend=backend) as node:
        saga: Any = SyntheticSagas(STEPS)
        bare: Any = BareChains(STEPS)
        if args.group:  # per task: a group's member or its step, a chord's task or callback
            saga, bare = GroupSagas(), BareChords(chord_app(queue))
            results.update(group=True, steps=saga.steps)
        pair = (("saga", saga), ("bare", bare))
        for _, warmup in pair:
            throughput(warmup, 10)
        for name, workload in pair:
            for key, value in measure(node, workload, args.sagas).items():
                results[f"{name} {key}"] = value
            samples = latencies(workload, args.latency_samples)
            median = sorted(samples)[len(samples) // 2]
            results[f"{name} latency_ms_per_step"] = median / workload.steps
        if args.round_trips and shutil.which("strace"):
            for name, workload in pair:
                for server, per_step in round_trips(node, workload, 10, ports).items():
                    results[f"{name} round_trips_per_step {server}"] = per_step
        if args.py_spy and Path(PY_SPY).exists():
            for name, workload in pair:
                for layer, share in python_profile(node, workload, args.sagas).items():
                    results[f"{name} python_share {layer}"] = share
    return report(results, print_table)


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"One step of a {STEPS}-step synthetic saga vs one bare task"
    if r.get("group"):
        title = (
            "One task of a group saga (4 members, a step) vs of a bare chord (4 tasks, a callback)"
        )
    table = Table(title=title)
    for column in ("per step", "saga step", "bare task", "difference"):
        table.add_column(column, justify="left" if column == "per step" else "right")
    rows = [
        ("wall time, batch (ms)", "wall_ms_per_step"),
        ("latency, one at a time (ms)", "latency_ms_per_step"),
        *[(f"CPU: {part} (ms)", f"cpu_ms_per_step {part}") for part in PARTS],
        ("CPU: all (ms)", "cpu_ms_per_step total"),
        ("round trips to PostgreSQL", "round_trips_per_step PostgreSQL"),
        ("round trips to Redis", "round_trips_per_step Redis"),
    ]
    for label, key in rows:
        if f"saga {key}" not in r:
            continue
        saga, bare = r[f"saga {key}"], r[f"bare {key}"]
        table.add_row(label, f"{saga:.2f}", f"{bare:.2f}", f"{saga - bare:+.2f}")
    Console().print(table)
    layers = sorted({key.split("python_share ", 1)[1] for key in r if "python_share" in key})
    if layers:
        table = Table(title="Pool processes' busy Python samples, by innermost frame (py-spy)")
        for column in ("library", "saga step", "bare task"):
            table.add_column(column, justify="left" if column == "library" else "right")
        for layer in layers:
            saga, bare = (r.get(f"{name} python_share {layer}", 0.0) for name in ("saga", "bare"))
            table.add_row(layer, f"{saga:.0%}", f"{bare:.0%}")
        Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
