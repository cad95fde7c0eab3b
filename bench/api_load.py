"""`make bench-api`: load on POST /api/orders/ through gunicorn, driven by wrk, against its ceiling.

Runs, in a database of its own (`<database>_bench`, as `bench.run`), a production-style web
server (gunicorn, `--web-workers` sync workers, DEBUG off, the order throttle raised) and real
Celery workers (WORKER_CONCURRENCY, default 2) so that the submitted sagas run as in production.
The same server also serves the ceiling (`bench.endpoints`, mounted for this run only): an
authenticated endpoint that validates a small body, inserts one row and publishes one message.
wrk (Debian's package) posts one fixed, valid body with a token for `--duration` seconds over
`--connections` connections, after a short warm-up: first to the ceiling (then waits for its
messages to be consumed), then to POST /api/orders/. Reports for each requests per second, latency
percentiles (wrk's, and the server's own from gunicorn's access log), errors (wrk's non-2xx/3xx
and socket errors, and every response but 202 in the access log), the CPU each part used, and the
orders' requests per second over the ceiling's; then waits (bounded) for the submitted sagas to
finish. Prints a table, then one JSON object as its last line. Exits 1 if any request failed. All
traffic is to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil

from bench.run import FINAL, ROOT, bench_database_url, percentile, wait, workers

LOG_DIR = ROOT / ".local" / "bench"
LUA_SCRIPT = ROOT / "bench" / "post_json.lua"
ORDERS_PATH = "/api/orders/"
CEILING_PATH = "/bench/submissions/"
# Gunicorn access log: status, request time in seconds, method, path.
ACCESS_LOG_FORMAT = "%(s)s %(L)s %(m)s %(U)s"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gunicorn:
    """gunicorn serving `sagaproject.wsgi` on 127.0.0.1 with sync workers, DEBUG off."""

    def __init__(self, workers: int, queue: str) -> None:
        self.workers, self.queue = workers, queue
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = LOG_DIR / "gunicorn-access.log"
        self.error_log = LOG_DIR / "gunicorn-error.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Gunicorn:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        for log in (self.access_log, self.error_log):
            log.write_text("")
        env = {
            **os.environ,
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50),
            "DJANGO_SECURE_SSL_REDIRECT": "0",  # plain http on 127.0.0.1
            "ORDERS_THROTTLE_RATE": "1000000/minute",
            "CELERY_TASK_DEFAULT_QUEUE": self.queue,
            "SAGAS_LOG_LEVEL": "WARNING",
            "SAGAPROJECT_BENCH_ENDPOINTS": "1",  # the ceiling, bench.endpoints
        }
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "sagaproject.wsgi:application",
            "--workers",
            str(self.workers),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--access-logfile",
            str(self.access_log),
            "--access-logformat",
            ACCESS_LOG_FORMAT,
            "--error-logfile",
            str(self.error_log),
            "--timeout",
            "30",
            "--graceful-timeout",
            "10",
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        try:
            wait(self._ready, 60, "gunicorn to answer /healthz", interval=0.2)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.error_log.read_text()[-2000:]
            raise SystemExit(f"bench: gunicorn exited ({self.proc.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def processes(self) -> list[psutil.Process]:
        return _tree(self.proc.pid) if self.proc else []

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # graceful: the master stops its workers
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for proc in reversed(self.processes()):
                proc.kill()
            self.proc.wait(timeout=10)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# -- wrk -------------------------------------------------------------------------------------

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match[1]) * UNITS[match[2]]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests, requests/s, latency percentiles and errors from `wrk --latency` output."""
    result: dict[str, Any] = {"non_2xx_3xx": 0, "socket_errors": 0}
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.MULTILINE):
        result[f"p{pct}_ms"] = _ms(value)
    if match := re.search(r"^\s+(\d+) requests in ([\d.]+\w+),", output, re.MULTILINE):
        result["requests"] = int(match[1])
        result["elapsed_s"] = _ms(match[2]) / 1000
    if match := re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE):
        result["rps"] = float(match[1])
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        result["socket_errors_detail"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, match.groups()), strict=True)
        )
        result["socket_errors"] = sum(result["socket_errors_detail"].values())
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        result["non_2xx_3xx"] = int(match[1])
    missing = {"p50_ms", "p99_ms", "requests", "rps"} - set(result)
    if missing:
        raise SystemExit(f"bench: could not read {sorted(missing)} from wrk's output:\n{output}")
    return result


def run_wrk(
    url: str, token: str, body: str, duration: int, args: argparse.Namespace
) -> tuple[dict[str, Any], float]:
    """Run wrk on `url` for `duration` seconds; its parsed output and the CPU seconds it used."""
    cmd = [
        "wrk",
        "--threads",
        str(args.threads),
        "--connections",
        str(args.connections),
        "--duration",
        f"{duration}s",
        "--timeout",
        f"{args.timeout}s",
        "--latency",
        "--script",
        str(LUA_SCRIPT),
        url,
    ]
    env = {**os.environ, "WRK_TOKEN": token, "WRK_BODY": body}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"bench: wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**parse_wrk(done.stdout), "output": done.stdout}, cpu


# -- server side -----------------------------------------------------------------------------


def access_log_settled(path: Path, timeout: float = 10) -> int:
    """Wait until the requests still in flight have been logged; the log's size."""
    deadline = time.monotonic() + timeout
    size = -1
    while time.monotonic() < deadline:
        current = path.stat().st_size
        if current == size:
            break
        size = current
        time.sleep(0.5)
    return path.stat().st_size


def read_access_log(
    path: Path, start: int, end: int, url_path: str
) -> tuple[dict[int, int], list[float]]:
    """Status counts and request times (ms) of the POSTs to `url_path` logged in [start, end)."""
    statuses: dict[int, int] = {}
    times: list[float] = []
    with path.open("rb") as handle:
        handle.seek(start)
        text = handle.read(end - start).decode(errors="replace")
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 4 or parts[2] != "POST" or parts[3] != url_path:
            continue
        statuses[int(parts[0])] = statuses.get(int(parts[0]), 0) + 1
        times.append(float(parts[1]) * 1000)
    return statuses, times


class CpuMeter:
    """CPU seconds used by groups of processes between `start` and `stop`."""

    def __init__(self, groups: dict[str, Any]) -> None:
        self.groups = groups  # name -> callable returning the group's processes
        self.before: dict[str, dict[int, float]] = {}
        self.used: dict[str, float] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        sample: dict[str, dict[int, float]] = {}
        for name, processes in self.groups.items():
            sample[name] = {}
            for proc in processes():
                try:
                    times = proc.cpu_times()
                    sample[name][proc.pid] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        return sample

    def start(self) -> None:
        self.before = self._sample()

    def stop(self) -> None:
        after = self._sample()
        for name, pids in after.items():
            self.used[name] = sum(
                max(0.0, cpu - self.before[name].get(pid, 0.0)) for pid, cpu in pids.items()
            )


def _named(*names: str):
    def processes() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["name"]) if p.info["name"] in names]

    return processes


# -- data --------------------------------------------------------------------------------------


def seed() -> tuple[str, dict[str, Any]]:
    """A product with plenty of stock; the order body that buys one."""
    from inventory.services import product_create

    sku = f"BENCH-API-{uuid.uuid4().hex[:8]}"
    product_create(sku=sku, name="Bench API", price=Decimal("1.00"), stock_on_hand=10**9)
    body = {
        "items": [{"sku": sku, "quantity": 1}],
        "shipping_address": {
            "name": "Bench",
            "line1": "1 Road",
            "city": "Oslo",
            "postal_code": "0150",
            "country": "NO",
        },
        "payment_token": "tok_ok",
    }
    return sku, body


def api_user(label: str) -> tuple[Any, str]:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user = get_user_model().objects.create_user(f"bench-api-{label}-{uuid.uuid4().hex[:8]}")
    return user, Token.objects.create(user=user).key


def saga_counts(user: Any) -> dict[str, int]:
    from django.db.models import Count

    from sagas.models import Saga

    rows = Saga.objects.filter(created_by=user).values("status").annotate(n=Count("pk"))
    return {row["status"]: row["n"] for row in rows}


def finished(users: list[Any]) -> tuple[int, int]:
    """Sagas of `users` that are final, and their steps that completed."""
    from sagas.models import Saga, SagaStep, StepStatus

    sagas = Saga.objects.filter(created_by__in=users)
    steps = SagaStep.objects.filter(saga__in=sagas, status=StepStatus.COMPLETED)
    return sagas.filter(status__in=FINAL).count(), steps.count()


def drain(users: list[Any], timeout: float) -> float | None:
    """Wait until every saga of `users` is final; seconds it took, or None on timeout."""
    from sagas.models import Saga

    started = time.monotonic()
    while Saga.objects.filter(created_by__in=users).exclude(status__in=FINAL).exists():
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.5)
    return time.monotonic() - started


def purge_queue(queue: str) -> None:
    """Best effort: drop what is left in the run's own queue (after a drain timeout)."""
    try:
        from sagaproject.celery import app

        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)
            conn.default_channel.queue_delete(queue)
    except Exception as exc:  # cleanup must not hide the run's outcome
        print(f"bench: could not purge queue {queue}: {exc}", file=sys.stderr)


# -- the run -----------------------------------------------------------------------------------


def ceiling_rows_after(row_id: int) -> tuple[int, int]:
    """Rows the ceiling inserted after `row_id`, and those whose message has not run yet."""
    from django.db import connection

    from bench.tasks import TABLE

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*), count(*) FILTER (WHERE n = 0) FROM {TABLE} WHERE id > %s", [row_id]
        )
        inserted, waiting = cursor.fetchone()
    return inserted, waiting


def ceiling_last_row() -> int:
    from django.db import connection

    from bench.tasks import TABLE

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT coalesce(max(id), 0) FROM {TABLE}")
        return cursor.fetchone()[0]


def consumed(row_id: int, timeout: float) -> float | None:
    """Wait until every message of the ceiling's rows after `row_id` ran; seconds, or None."""
    started = time.monotonic()
    while ceiling_rows_after(row_id)[1]:
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.2)
    return time.monotonic() - started


def load_phase(
    server: Gunicorn,
    url_path: str,
    token: str,
    body: str,
    args: argparse.Namespace,
    meter: CpuMeter,
    on_stop: Any = None,
) -> dict[str, Any]:
    """wrk on one endpoint for `--duration` seconds: wrk's figures, the server's statuses and
    request times from the access log, CPU (cores) of each part, errors."""
    start = access_log_settled(server.access_log)
    meter.start()
    load, wrk_cpu = run_wrk(server.url + url_path, token, body, args.duration, args)
    meter.stop()
    after = on_stop() if on_stop else None
    end = access_log_settled(server.access_log)
    statuses, times = read_access_log(server.access_log, start, end, url_path)
    elapsed = load.get("elapsed_s", args.duration)
    cpu = {name: used / elapsed for name, used in meter.used.items()}
    cpu["wrk"] = wrk_cpu / elapsed
    server_errors = sum(n for code, n in statuses.items() if code != 202)
    return {
        "load": load,
        "statuses": statuses,
        "times": times,
        "elapsed": elapsed,
        "cpu": cpu,
        "gunicorn_cpu_ms_per_request": meter.used["gunicorn"] * 1000 / max(1, load["requests"]),
        # A failed request is one wrk saw fail (a socket error, or neither 2xx nor 3xx) or one
        # the server answered with anything but 202, whichever count is higher.
        "errors": load["socket_errors"] + max(load["non_2xx_3xx"], server_errors),
        "after": after,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds of measured load")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--web-workers", type=int, default=3, help="gunicorn sync workers")
    parser.add_argument("--threads", type=int, default=0, help="wrk threads (default min(2, c))")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured load first")
    parser.add_argument("--timeout", type=int, default=10, help="wrk's per-request timeout (s)")
    parser.add_argument(
        "--drain-timeout", type=float, default=120, help="longest wait for the sagas to finish"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit(
            "bench: wrk is not installed (Debian: apt-get install wrk; `make bench-api` does it)"
        )
    if not (1 <= args.duration <= 600 and args.connections >= 1 and args.web_workers >= 1):
        raise SystemExit("bench: need --duration 1 to 600, --connections and --web-workers >= 1")
    args.threads = min(args.threads or 2, args.connections)
    concurrency = int(os.environ.get("WORKER_CONCURRENCY", "2"))

    os.environ["DATABASE_URL"] = bench_database_url()
    os.environ["SAGAS_MODULES"] = "bench.sagas"
    queue = f"bench-api-{uuid.uuid4().hex[:8]}"
    os.environ["CELERY_TASK_DEFAULT_QUEUE"] = queue
    os.environ["SAGAS_LOG_LEVEL"] = "WARNING"
    import django

    django.setup()  # exports the (embedded, if need be) servers' URLs for the processes below
    from django.core.management import call_command

    from bench.tasks import ensure_table
    from sagaproject import embedded

    try:
        call_command("migrate", verbosity=0, interactive=False)
        ensure_table()
        sku, order = seed()
        body = json.dumps(order, separators=(",", ":"))
        ceiling_body = json.dumps({"sku": sku, "quantity": 1}, separators=(",", ":"))
        warmup_user, warmup_token = api_user("warmup")
        load_user, load_token = api_user("load")

        with workers(queue, concurrency) as node, Gunicorn(args.web_workers, queue) as server:
            if args.warmup > 0:  # every gunicorn worker imports its views on its first request
                run_wrk(server.url + CEILING_PATH, warmup_token, ceiling_body, args.warmup, args)
                run_wrk(server.url + ORDERS_PATH, warmup_token, body, args.warmup, args)
                drain([warmup_user], args.drain_timeout)
            meter = CpuMeter(
                {
                    "gunicorn": server.processes,
                    "celery": lambda: [p for proc in node.procs for p in _tree(proc.pid)],
                    "postgres": _named("postgres"),
                    "redis": _named("redis-server"),
                }
            )
            # The ceiling first, on idle workers; its messages are consumed before the orders.
            last_row = ceiling_last_row()
            ceiling = load_phase(server, CEILING_PATH, load_token, ceiling_body, args, meter)
            ceiling_consumed_s = consumed(last_row, args.drain_timeout)
            ceiling_rows = ceiling_rows_after(last_row)[0]

            done_before = finished([warmup_user, load_user])
            orders = load_phase(
                server,
                ORDERS_PATH,
                load_token,
                body,
                args,
                meter,
                on_stop=lambda: finished([warmup_user, load_user]),
            )
            done_after = orders["after"]
            drain_s = drain([warmup_user, load_user], args.drain_timeout)
            sagas = saga_counts(load_user)
            total, _ = finished([warmup_user, load_user])
    finally:
        purge_queue(queue)
        embedded.stop_redis_if_started()
        embedded.stop_postgres()

    load, elapsed, server_times = orders["load"], orders["elapsed"], orders["times"]
    results: dict[str, Any] = {
        "api_rps": round(load["rps"], 1),
        "api_p50_ms": round(load["p50_ms"], 2),
        "api_p99_ms": round(load["p99_ms"], 2),
        "api_errors": orders["errors"],
        "ceiling_rps": round(ceiling["load"]["rps"], 1),
        "ceiling_p50_ms": round(ceiling["load"]["p50_ms"], 2),
        "ceiling_p99_ms": round(ceiling["load"]["p99_ms"], 2),
        "ceiling_errors": ceiling["errors"],
        # POST /api/orders/'s requests per second over the ceiling's (the target: >= 0.5).
        "ratio": round(load["rps"] / ceiling["load"]["rps"], 2),
        # The same by gunicorn's CPU per request (the ceiling's over the orders'): what the
        # ratio would be if both had the same share of the machine.
        "ratio_cpu": round(
            ceiling["gunicorn_cpu_ms_per_request"] / orders["gunicorn_cpu_ms_per_request"], 2
        ),
        "sagas_submitted": sum(sagas.values()),
        "sagas_completed": sagas.get("completed", 0),
        "web_workers": args.web_workers,
        "connections": args.connections,
        "duration_s": args.duration,
        "requests": load["requests"],
        "api_p75_ms": round(load["p75_ms"], 2),
        "api_p90_ms": round(load["p90_ms"], 2),
        "server_p50_ms": round(percentile(server_times, 50), 2) if server_times else None,
        "server_p99_ms": round(percentile(server_times, 99), 2) if server_times else None,
        "wrk_non_2xx_3xx": load["non_2xx_3xx"],
        "wrk_socket_errors": load["socket_errors"],
        "server_statuses": {str(code): n for code, n in sorted(orders["statuses"].items())},
        "sagas_final": {k: v for k, v in sorted(sagas.items())},
        "drain_s": round(drain_s, 1) if drain_s is not None else None,
        # Sagas (and steps) per second the workers finished while the load ran, then draining.
        "sagas_per_s_during_load": round((done_after[0] - done_before[0]) / elapsed, 1),
        "steps_per_s_during_load": round((done_after[1] - done_before[1]) / elapsed, 1),
        "sagas_per_s_draining": round((total - done_after[0]) / drain_s, 1) if drain_s else None,
        "gunicorn_cpu_ms_per_request": round(orders["gunicorn_cpu_ms_per_request"], 1),
        "cpu_cores": {name: round(value, 2) for name, value in orders["cpu"].items()},
        "ceiling_requests": ceiling["load"]["requests"],
        "ceiling_p75_ms": round(ceiling["load"]["p75_ms"], 2),
        "ceiling_p90_ms": round(ceiling["load"]["p90_ms"], 2),
        "ceiling_server_p50_ms": (
            round(percentile(ceiling["times"], 50), 2) if ceiling["times"] else None
        ),
        "ceiling_server_p99_ms": (
            round(percentile(ceiling["times"], 99), 2) if ceiling["times"] else None
        ),
        "ceiling_wrk_non_2xx_3xx": ceiling["load"]["non_2xx_3xx"],
        "ceiling_wrk_socket_errors": ceiling["load"]["socket_errors"],
        "ceiling_server_statuses": {
            str(code): n for code, n in sorted(ceiling["statuses"].items())
        },
        "ceiling_gunicorn_cpu_ms_per_request": round(ceiling["gunicorn_cpu_ms_per_request"], 1),
        "ceiling_cpu_cores": {name: round(value, 2) for name, value in ceiling["cpu"].items()},
        # Rows the ceiling inserted (one per 202), and how long after its load their messages
        # had all run (None: not within --drain-timeout).
        "ceiling_rows": ceiling_rows,
        "ceiling_consumed_s": (
            round(ceiling_consumed_s, 1) if ceiling_consumed_s is not None else None
        ),
        "worker_concurrency": concurrency,
        "wrk_threads": args.threads,
        "host_cores": os.cpu_count(),
    }
    print_table(results)
    if drain_s is None:
        print(
            f"bench: the sagas were not all final after {args.drain_timeout:.0f} s", file=sys.stderr
        )
    if ceiling_consumed_s is None:
        print("bench: the ceiling's messages had not all run", file=sys.stderr)
    print(json.dumps(results))
    return 1 if results["api_errors"] or results["ceiling_errors"] else 0


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def errors(prefix: str) -> str:
        statuses = r[f"{prefix}server_statuses"]
        return (
            f"{r[f'{prefix}wrk_non_2xx_3xx']}, {r[f'{prefix}wrk_socket_errors']}; "
            f"{sum(n for code, n in statuses.items() if code != '202')}"
        )

    def latency(prefix: str) -> str:
        return " / ".join(f"{r[f'{prefix}_p{p}_ms']:.1f}" for p in (50, 75, 90, 99))

    def cpu(cores: dict[str, float]) -> str:
        return ", ".join(f"{name} {value:.2f}" for name, value in cores.items())

    table = Table(
        title=(
            f"wrk, {r['connections']} connections, {r['duration_s']} s each, "
            f"gunicorn {r['web_workers']} workers, Celery {r['worker_concurrency']} processes"
        )
    )
    table.add_column("measure")
    table.add_column("POST /api/orders/", justify="right")
    table.add_column(f"ceiling, POST {CEILING_PATH}", justify="right")
    table.add_row("requests", f"{r['requests']}", f"{r['ceiling_requests']}")
    table.add_row("throughput (requests/s)", f"{r['api_rps']:.1f}", f"{r['ceiling_rps']:.1f}")
    table.add_row(
        "orders / ceiling: requests/s (by gunicorn CPU per request)",
        f"[bold]{r['ratio']:.2f}[/bold] ({r['ratio_cpu']:.2f})",
        "",
    )
    table.add_row("latency p50 / p75 / p90 / p99 (ms, wrk)", latency("api"), latency("ceiling"))
    if r["server_p50_ms"] is not None and r["ceiling_server_p50_ms"] is not None:
        table.add_row(
            "in the server p50 / p99 (ms, gunicorn)",
            f"{r['server_p50_ms']:.1f} / {r['server_p99_ms']:.1f}",
            f"{r['ceiling_server_p50_ms']:.1f} / {r['ceiling_server_p99_ms']:.1f}",
        )
    table.add_row(
        "gunicorn CPU per request (ms)",
        f"{r['gunicorn_cpu_ms_per_request']:.1f}",
        f"{r['ceiling_gunicorn_cpu_ms_per_request']:.1f}",
    )
    table.add_row(
        "errors (wrk non-2xx/3xx, socket; server non-202)", errors(""), errors("ceiling_")
    )
    table.add_row(
        "server responses by status",
        json.dumps(r["server_statuses"]),
        json.dumps(r["ceiling_server_statuses"]),
    )
    table.add_row(
        f"CPU during the load (cores of {r['host_cores']}; postgres: the whole server)",
        cpu(r["cpu_cores"]),
        cpu(r["ceiling_cpu_cores"]),
    )
    table.add_row(
        "sagas submitted / completed; ceiling: rows, their messages run",
        f"{r['sagas_submitted']} / {r['sagas_completed']}"
        + ("" if r["drain_s"] is None else f" (all final {r['drain_s']:.1f} s after the load)"),
        f"{r['ceiling_rows']}"
        + (
            ", not all"
            if r["ceiling_consumed_s"] is None
            else f", all {r['ceiling_consumed_s']:.1f} s after the load"
        ),
    )
    table.add_row(
        "sagas (steps) finished per second: during the load; draining",
        f"{r['sagas_per_s_during_load']:.1f} ({r['steps_per_s_during_load']:.1f}); "
        + ("-" if r["sagas_per_s_draining"] is None else f"{r['sagas_per_s_draining']:.1f}"),
        "",
    )
    table.add_row("api_errors, ceiling_errors", f"{r['api_errors']}", f"{r['ceiling_errors']}")
    Console(stderr=False, width=150).print(table)


if __name__ == "__main__":
    sys.exit(main())
