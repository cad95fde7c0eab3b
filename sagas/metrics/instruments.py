"""The counters and histograms, and the observer that feeds them from committed events.

Each process counts what it committed: a worker's processes the steps, compensations and
sweeps, the web process the starts and the operators' actions. Under prometheus-client's
multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`) every process writes its own file and whoever
serves the directory adds them up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Counter, Histogram

from ..models import EventKind

K = EventKind
BY_DEFINITION = ["definition"]
BY_STEP = ["definition", "step"]

# Steps run from milliseconds (a row) to a minute (an external call with retries).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Waits from a webhook's seconds to an approval's weeks: 1 s to 30 days.
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400)

started = Counter("sagas_started", "Sagas started.", BY_DEFINITION)
completed = Counter("sagas_completed", "Sagas that completed every step.", BY_DEFINITION)
compensated = Counter("sagas_compensated", "Sagas whose compensations all ran.", BY_DEFINITION)
failed = Counter(
    "sagas_failed",
    "Sagas that stopped for an operator: a compensation failed (compensation_failed), or the "
    "sweeper gave up on them (recovery_exhausted).",
    ["definition", "reason"],
)
paused = Counter(
    "sagas_paused",
    "Sagas paused for an operator after a step failed for good (by policy, or past a pivot).",
    BY_DEFINITION,
)
step_attempts = Counter(
    "sagas_step_attempts",
    "Attempts of a step's action whose outcome was recorded (completed, retried or failed).",
    BY_STEP,
)
step_retries = Counter(
    "sagas_step_retries", "Failed attempts of a step's action that will be retried.", BY_STEP
)
step_failures = Counter(
    "sagas_step_failures",
    "Steps whose action failed for good, by safe error code.",
    ["definition", "step", "code"],
)
step_duration = Histogram(
    "sagas_step_duration_seconds",
    "Time from a step's first attempt to its completion (retries included).",
    BY_STEP,
    buckets=STEP_BUCKETS,
)
compensations = Counter("sagas_compensations", "Compensations that ran.", BY_STEP)
compensation_retries = Counter(
    "sagas_compensation_retries", "Failed compensation attempts that will be retried.", BY_STEP
)
compensation_failures = Counter(
    "sagas_compensation_failures", "Compensations that ran out of retries.", BY_STEP
)
recoveries = Counter(
    "sagas_recoveries", "Stalled sagas sent again by the recovery sweeper.", BY_DEFINITION
)
dead_lettered = Counter(
    "sagas_dead_lettered",
    "Sagas failed by the sweeper after SAGAS_RECOVERY_MAX_ATTEMPTS recoveries without progress.",
    BY_DEFINITION,
)
waits_started = Counter(
    "sagas_waits_started",
    "Waits the saga began waiting at (again after an operator's retry).",
    BY_STEP,
)
waits_timed_out = Counter(
    "sagas_waits_timed_out",
    "Waits whose timeout passed before their event, by what the saga did then (on_timeout: "
    "continue, compensate or pause).",
    ["definition", "step", "action"],
)
wait_duration = Histogram(
    "sagas_wait_duration_seconds",
    "Time a saga waited at a wait, from its start to its event, its timeout or a signal that "
    "failed it.",
    BY_STEP,
    buckets=WAIT_BUCKETS,
)
signals_received = Counter(
    "sagas_signals_received",
    "Signals stored for a saga (an idempotency key's repeats are not), whatever became of "
    "them: consumed, kept, refused, or later discarded.",
    BY_DEFINITION,
)
signals_consumed = Counter(
    "sagas_signals_consumed",
    "Signals a wait consumed: as they came, or kept and consumed when the saga got there.",
    BY_DEFINITION,
)
signals_refused = Counter(
    "sagas_signals_refused",
    "Signals refused because their wait was over (answered, timed out, or the saga turned "
    "back or finished): as they came, or kept and refused later.",
    BY_DEFINITION,
)
signals_discarded = Counter(
    "sagas_signals_discarded",
    "Signals kept for a wait the saga never reached (it finished first, or skipped the wait).",
    BY_DEFINITION,
)
discrepancies_found = Counter(
    "sagas_discrepancies_found",
    "Reconciliation checks that flagged a final saga (found discrepancies it had not recorded).",
    BY_DEFINITION,
)
reconcile_failures = Counter(
    "sagas_reconcile_failures",
    "Reconciliation checks that raised (run again at their next turn).",
    BY_DEFINITION,
)
repairs = Counter(
    "sagas_repairs",
    "Repairs an operator chose (a step's compensation run again), by outcome (ran, failed).",
    ["definition", "step", "outcome"],
)
sweep_duration = Histogram(
    "sagas_sweep_duration_seconds",
    "Time a sweep of the recovery sweeper took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def zero_series() -> None:
    """Create the series of every registered definition (and of its steps) at 0, so that a
    scrape sees them before their first increment: `rate()` and `increase()` count that
    first one, and a rare event (a dead letter) is not lost from its panel. Idempotent."""
    from ..definitions import Wait, registered

    for name, definition in registered().items():
        for counter in (started, completed, compensated, paused, recoveries, dead_lettered):
            counter.labels(name)
        if any(isinstance(step, Wait) for step in definition.steps):
            for by_definition in (
                signals_received,
                signals_consumed,
                signals_refused,
                signals_discarded,
            ):
                by_definition.labels(name)
        for reason in ("compensation_failed", "recovery_exhausted"):
            failed.labels(name, reason)
        for step in definition.steps:
            if isinstance(step, Wait):
                waits_started.labels(name, step.name)
                # As the engine reads it (`sagas.engine.waits.timed_out`).
                waits_timed_out.labels(name, step.name, step.on_timeout or "compensate")
                continue
            for per_step in (
                step_attempts,
                step_retries,
                compensations,
                compensation_retries,
                compensation_failures,
            ):
                per_step.labels(name, step.name)


def _step(definition: str, event: Any) -> tuple[str, str]:
    return definition, event.step_name


def _saga_failed(definition: str, event: Any) -> None:
    reason = event.detail.get("reason", "compensation_failed")
    failed.labels(definition, reason).inc()
    if reason == "recovery_exhausted":
        dead_lettered.labels(definition).inc()


def _step_completed(definition: str, event: Any) -> None:
    step_attempts.labels(*_step(definition, event)).inc()
    seconds = event.detail.get("duration_ms")
    if seconds is not None:
        step_duration.labels(*_step(definition, event)).observe(seconds / 1000)


def _step_retrying(definition: str, event: Any) -> None:
    step_attempts.labels(*_step(definition, event)).inc()
    step_retries.labels(*_step(definition, event)).inc()


def _step_failed(definition: str, event: Any) -> None:
    step_attempts.labels(*_step(definition, event)).inc()
    step_failures.labels(*_step(definition, event), event.detail.get("code", "")).inc()


def _wait_ended(definition: str, event: Any) -> None:
    seconds = event.detail.get("duration_ms")
    if seconds is not None:  # None: it never began (its condition or until raised)
        wait_duration.labels(*_step(definition, event)).observe(seconds / 1000)
    if event.kind == K.WAIT_TIMED_OUT:
        action = event.detail.get("action", "compensate")
        waits_timed_out.labels(*_step(definition, event), action).inc()
    elif event.detail.get("signal") is not None:
        signals_consumed.labels(definition).inc()


COUNT: dict[str, Callable[[str, Any], None]] = {
    K.SAGA_STARTED: lambda d, e: started.labels(d).inc(),
    K.SAGA_COMPLETED: lambda d, e: completed.labels(d).inc(),
    K.SAGA_COMPENSATED: lambda d, e: compensated.labels(d).inc(),
    K.SAGA_FAILED: _saga_failed,
    K.SAGA_PAUSED: lambda d, e: paused.labels(d).inc(),
    K.STEP_COMPLETED: _step_completed,
    K.STEP_RETRYING: _step_retrying,
    K.STEP_FAILED: _step_failed,
    K.STEP_COMPENSATED: lambda d, e: compensations.labels(*_step(d, e)).inc(),
    K.COMPENSATION_RETRYING: lambda d, e: compensation_retries.labels(*_step(d, e)).inc(),
    K.COMPENSATION_FAILED: lambda d, e: compensation_failures.labels(*_step(d, e)).inc(),
    K.RECOVERED: lambda d, e: recoveries.labels(d).inc(),
    K.WAIT_STARTED: lambda d, e: waits_started.labels(*_step(d, e)).inc(),
    K.WAIT_COMPLETED: _wait_ended,
    K.WAIT_TIMED_OUT: _wait_ended,
    K.WAIT_FAILED: _wait_ended,
    K.SIGNAL_REFUSED: lambda d, e: signals_refused.labels(d).inc(),
    K.SIGNAL_DISCARDED: lambda d, e: signals_discarded.labels(d).inc(),
    K.DISCREPANCY_FOUND: lambda d, e: discrepancies_found.labels(d).inc(),
    K.RECONCILE_FAILED: lambda d, e: reconcile_failures.labels(d).inc(),
    K.REPAIR_RAN: lambda d, e: repairs.labels(*_step(d, e), "ran").inc(),
    K.REPAIR_FAILED: lambda d, e: repairs.labels(*_step(d, e), "failed").inc(),
}


class MetricsObserver:
    """Counts committed events (`sagas.engine.notify`)."""

    kinds = frozenset(COUNT)

    def committed(self, saga: Any, events: Sequence[Any]) -> None:
        for event in events:
            COUNT[event.kind](saga.name, event)

    def swept(self, seconds: float, recovered: int, dead_lettered: int) -> None:
        sweep_duration.observe(seconds)

    def signal_received(self, saga: Any, *, refused: bool) -> None:
        signals_received.labels(saga.name).inc()
        if refused:  # no `signal_refused` event counts it
            signals_refused.labels(saga.name).inc()

    def __repr__(self) -> str:
        return "sagas.metrics"


observer = MetricsObserver()
