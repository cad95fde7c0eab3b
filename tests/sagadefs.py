"""Saga definitions used only by the tests (imported by the test workers via SAGAS_MODULES)."""

import time
from pathlib import Path

from sagas.definitions import RetryPolicy, SagaDefinition, Step, StepContext, register


def record(ctx: StepContext) -> dict:
    return {"step": ctx.step, "attempt": ctx.attempt}


def undo(ctx: StepContext) -> None:
    return None


FAST = RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1)


def snapshot_v1() -> SagaDefinition:
    return SagaDefinition(
        name="snapshot_demo",
        steps=[
            Step("first", record, undo, retry=FAST),
            Step("second", record, undo, retry=FAST, on_exhausted="pause"),
        ],
    )


def snapshot_v2() -> SagaDefinition:
    return SagaDefinition(
        name="snapshot_demo",
        steps=[
            Step("first", record, undo, retry=FAST),
            Step("renamed", record, undo, retry=FAST),
            Step("added", record, undo, retry=FAST),
        ],
    )


register(snapshot_v1())


def deadline_demo(*, pivot: bool) -> SagaDefinition:
    """Two steps; the second fails transiently until its fault is removed (it pauses)."""
    return SagaDefinition(
        name="deadline_pivot" if pivot else "deadline_demo",
        steps=[
            Step("first", record, undo, retry=FAST, pivot=pivot),
            Step("second", record, undo, retry=FAST, on_exhausted="pause"),
        ],
        deadline=60,
    )


register(deadline_demo(pivot=False))
register(deadline_demo(pivot=True))


# -- the engine's failure paths (tests/test_failure_paths.py) --------------------------------


def hang(ctx: StepContext) -> None:
    """A step that ignores its soft time limit: only the hard one stops it."""
    from sagas.testing.faults import hang

    hang()


def needs_first_output(ctx: StepContext) -> None:
    """A compensation that reads an earlier step's output, as real ones do."""
    if ctx.outputs.get("first", {}).get("step") != "first":
        raise LookupError("the output of step 'first' is missing from the context")


def decline(ctx: StepContext) -> None:
    from sagas.exceptions import BusinessError

    raise BusinessError("Declined.", code="declined")


def wait_at_gate(ctx: StepContext) -> dict:
    """Stay in flight until the test creates the file named `gate` in the input (`hold`
    seconds at most, default 30).

    Creates `<gate>.started` first, so the test knows the step is running.
    """
    gate = Path(ctx.input["gate"])
    Path(f"{gate}.started").touch()
    deadline = time.monotonic() + ctx.input.get("hold", 30)
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"gate_opened": gate.exists()}


register(
    SagaDefinition(
        name="three_steps",
        steps=[Step(name, record, undo, retry=FAST) for name in ("first", "second", "third")],
    )
)
register(
    SagaDefinition(
        name="one_per_account",
        steps=[Step(name, record, undo, retry=FAST) for name in ("first", "second")],
        key="account.id",
        one_in_flight_per_key=True,
    )
)
register(
    SagaDefinition(
        name="six_steps",
        steps=[Step(f"step_{i}", record, undo, retry=FAST) for i in range(6)],
    )
)
register(
    SagaDefinition(
        name="hung_step",
        steps=[
            Step("first", record, undo, retry=FAST),
            Step("hangs", hang, undo, retry=FAST, time_limit=1),
        ],
    )
)
register(
    SagaDefinition(
        name="context_in_compensation",
        steps=[
            Step("first", record, undo, retry=FAST),
            Step(
                "second",
                record,
                needs_first_output,
                retry=FAST,
                compensation_retry=RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1),
            ),
            Step("third", decline, undo, retry=FAST),
        ],
        # The earlier step is compensated while `second` waits for an operator.
        continue_compensation_on_failure=True,
    )
)
register(
    SagaDefinition(
        name="first_step_retries",
        steps=[
            Step(
                "first",
                record,
                undo,
                retry=RetryPolicy(max_attempts=3, backoff=3.0, backoff_max=3.0, jitter=False),
            ),
            Step("second", record, undo, retry=FAST),
        ],
    )
)


def stale_transient() -> SagaDefinition:
    """A step whose transient exception class a deploy removed (registered by its test only:
    `manage.py check` rightly refuses it, `sagas.E001`)."""
    return SagaDefinition(
        name="stale_transient",
        steps=[
            Step("first", record, undo, retry=FAST),
            Step(
                "second",
                decline,
                undo,
                retry=RetryPolicy(max_attempts=3, transient=("tests.sagadefs.RemovedError",)),
                on_exhausted="pause",
            ),
        ],
    )


register(
    SagaDefinition(
        name="gated_demo",
        steps=[
            Step("gated", wait_at_gate, undo, retry=FAST, time_limit=40),
            Step("after", record, undo, retry=FAST),
        ],
    )
)
register(
    SagaDefinition(
        name="hung_compensation",
        steps=[
            Step(
                "first",
                record,
                hang,
                retry=FAST,
                compensation_retry=RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1),
                compensation_time_limit=1,
            ),
            Step("second", decline, undo, retry=FAST),
        ],
    )
)
register(
    SagaDefinition(
        name="declines_second",
        steps=[Step("first", record, undo, retry=FAST), Step("second", decline, undo)],
    )
)


# -- the test kit's own tests (tests/test_testkit.py) ------------------------------------------


def take_one(ctx: StepContext) -> dict:
    """Take one of the product named in the input out of stock."""
    from django.db.models import F

    from inventory.models import Product

    Product.objects.filter(sku=ctx.input["sku"]).update(stock_on_hand=F("stock_on_hand") - 1)
    return {"taken": 1}


def give_back(ctx: StepContext) -> None:
    from django.db.models import F

    from inventory.models import Product

    taken = ctx.output["taken"]
    Product.objects.filter(sku=ctx.input["sku"]).update(stock_on_hand=F("stock_on_hand") + taken)


def forget_to_give_back(ctx: StepContext) -> None:
    """The bug: a compensation that does not undo what its action did."""


def stock_saga(name: str, compensation) -> SagaDefinition:
    return SagaDefinition(
        name=name,
        steps=[
            Step("take", take_one, compensation, retry=FAST),
            Step("after", record, undo, retry=FAST),
        ],
    )


register(stock_saga("takes_stock", give_back))
register(stock_saga("leaks_stock", forget_to_give_back))
register(
    SagaDefinition(
        name="past_a_pivot",
        steps=[
            Step("hold", record, undo, retry=FAST),
            Step("charge", record, undo, retry=FAST, compensate_failed_step=True),
            Step("commit", record, undo, retry=FAST, pivot=True),
            Step("notify", record, undo, retry=FAST, on_exhausted="pause"),
            Step("archive", record, undo, retry=FAST),
        ],
        continue_compensation_on_failure=True,
    )
)


# -- signals, metrics and traces (tests/test_signals.py, test_metrics.py, test_tracing.py) ----


def refuse_to_confirm(ctx: StepContext) -> None:
    """An `on_complete` that fails: the last step had moved to completed, in memory only."""
    from sagas.exceptions import BusinessError

    raise BusinessError("The order cannot be confirmed.", code="not_confirmed")


def flaky_once(ctx: StepContext) -> dict:
    """Fails its first attempt with a transient error, then succeeds."""
    from sagas.exceptions import TransientError

    if ctx.attempt == 1:
        raise TransientError("Try again.", code="hiccup")
    return {"step": ctx.step, "attempt": ctx.attempt}


register(
    SagaDefinition(
        name="refuses_to_confirm",
        steps=[Step("first", record, undo, retry=FAST), Step("last", record, undo, retry=FAST)],
        on_complete=refuse_to_confirm,
    )
)
register(
    SagaDefinition(
        name="flaky_then_fine",
        steps=[
            Step("flaky", flaky_once, undo, retry=FAST),
            Step("after", record, undo, retry=FAST),
        ],
    )
)


def open_a_span(ctx: StepContext) -> dict:
    """An action that traces work of its own, as an instrumented client would."""
    from opentelemetry import trace

    with trace.get_tracer("tests").start_as_current_span("inner work"):
        return {"step": ctx.step}


register(
    SagaDefinition(
        name="traced",
        steps=[Step("flaky", flaky_once, undo, retry=FAST), Step("inner", open_a_span, undo)],
    )
)


# -- a bug or a deploy never undoes paid work (tests/test_safe_defaults.py) -------------------
# The definitions are registered by the tests, in their own process: a worker runs a saga's
# steps from the import paths stored in its rows, and needs only these functions.


def has_a_bug(ctx: StepContext) -> dict:
    """A programming error: the input has no such key."""
    return {"total": ctx.input["no_such_key"]}


class BadGatewayResponse(Exception):
    """An exception whose message a project lists as safe to show staff."""


def raises_a_safe_message(ctx: StepContext) -> None:
    raise BadGatewayResponse("the gateway answered 502 Bad Gateway")


def leaks_a_secret(ctx: StepContext) -> None:
    raise RuntimeError("password=hunter2 rejected by the upstream")


def fails_to_undo(ctx: StepContext) -> None:
    from sagas.exceptions import TransientError

    raise TransientError("The refund service is down.", code="refund_unavailable")


# -- attempts that die or whose own statement fails (tests/test_outside_the_lock.py) ---------


def crash(ctx: StepContext) -> None:
    """Note the run, then die as an out-of-memory kill would: nothing commits."""
    import os
    import signal

    with Path(ctx.input["runs"]).open("a") as runs:
        runs.write(f"{ctx.step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def undo_crash(ctx: StepContext) -> None:
    with Path(ctx.input["runs"]).open("a") as runs:
        runs.write(f"undo {ctx.step}\n")


def times_out(ctx: StepContext) -> None:
    """A query of the action's own that outlives its statement timeout (SQLSTATE 57014)."""
    from django.db import connection

    with Path(ctx.input["runs"]).open("a") as runs:
        runs.write(f"{ctx.step}\n")
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = '50ms'")
        cursor.execute("SELECT pg_sleep(1)")


THREE = RetryPolicy(max_attempts=3, backoff=0.05, backoff_max=0.1)
register(
    SagaDefinition(
        name="crash_loop",
        steps=[
            Step("first", record, undo_crash, retry=FAST),
            Step("dies", crash, undo_crash, retry=THREE),
        ],
    )
)
register(
    SagaDefinition(
        name="own_statement_fails",
        steps=[
            Step("first", record, undo_crash, retry=FAST),
            Step("slow_query", times_out, undo_crash, retry=THREE),
        ],
    )
)


def slow_charge(ctx: StepContext) -> dict:
    """A card charge whose provider answers late: it lands (the file says so) once the gate
    opens, whatever became of the attempt's database session meanwhile."""
    log = Path(ctx.input["runs"])
    with log.open("a") as runs:
        runs.write("charge started\n")
    gate = Path(ctx.input["gate"])
    deadline = time.monotonic() + 2.5
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with log.open("a") as runs:
        runs.write("charged\n")
    return {"charged": True}


def refund(ctx: StepContext) -> None:
    with Path(ctx.input["runs"]).open("a") as runs:
        runs.write("refunded\n")


register(
    SagaDefinition(
        name="late_charge",
        steps=[
            Step("first", record, undo, retry=FAST),
            Step("charge", slow_charge, refund, compensate_failed_step=True, time_limit=3),
        ],
    )
)


def stuck_in_a_query(ctx: StepContext) -> None:
    """A query that outlives the attempt, its soft time limit ignored: the hard kill ends the
    process while PostgreSQL still runs the query, holding the saga's lock."""
    from celery.exceptions import SoftTimeLimitExceeded
    from django.db import connection

    with Path(ctx.input["runs"]).open("a") as runs:
        runs.write(f"{ctx.step}\n")
    while True:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(60)")
        except SoftTimeLimitExceeded:
            continue  # as code that swallows every exception would


register(
    SagaDefinition(
        name="stuck_in_a_query",
        steps=[
            Step("first", record, undo_crash, retry=FAST),
            Step("query", stuck_in_a_query, undo_crash, time_limit=1, retry=RetryPolicy(1)),
        ],
    )
)


def declined(ctx: StepContext) -> None:
    from sagas.exceptions import BusinessError

    raise BusinessError("The card was declined.", code="card_declined")


def note_step_failed(sender, saga_id, step, error_code, event_id=None, **kwargs) -> None:
    """A receiver of `step_failed`, in the worker: notes each signal in the saga's file. With
    `die_in_receiver` (a marker file not there yet), its process dies first, once: after the
    commit, before the signals are sent."""
    import os

    from sagas.models import Saga

    found = Saga.objects.filter(pk=saga_id).values_list("input", flat=True).first() or {}
    marker = found.get("die_in_receiver")
    if marker and not Path(marker).exists():
        Path(marker).touch()
        os._exit(137)
    if found.get("signals"):
        with Path(found["signals"]).open("a") as signals:
            signals.write(f"step_failed {step} {error_code} {event_id}\n")


def _receive() -> None:
    from sagas.signals import step_failed

    step_failed.connect(note_step_failed, dispatch_uid="tests.sagadefs.note_step_failed")


_receive()
register(
    SagaDefinition(
        name="declined_once",
        steps=[
            Step("first", record, undo_crash, retry=FAST),
            Step("charge", declined, undo_crash, retry=FAST),
        ],
    )
)


# -- waits (tests/test_waits.py) ---------------------------------------------------------------


def sees_the_payment(ctx: StepContext) -> dict:
    """After the wait: what its event carried, as later steps see it."""
    return {"confirmed": ctx.outputs["confirmation"]}


def undo_reservation(ctx: StepContext) -> None:
    if ctx.input.get("runs"):
        with Path(ctx.input["runs"]).open("a") as runs:
            runs.write(f"undo {ctx.step}\n")


def has_a_reference(payload) -> None:
    from django.core.exceptions import ValidationError

    if not isinstance(payload, dict) or not payload.get("reference"):
        raise ValidationError("A confirmation has a reference.")


def waits_for(name: str, *, timeout: float = 30, on_timeout: str | None = None) -> None:
    from sagas.definitions import Wait

    register(
        SagaDefinition(
            name=name,
            key="order",
            steps=[
                Step("reserve", record, undo_reservation, retry=FAST),
                Wait(
                    "confirmation",
                    event="payment_confirmed",
                    timeout=timeout,
                    on_timeout=on_timeout,
                    validate=has_a_reference,
                    max_payload_bytes=1000,
                ),
                Step("ship", sees_the_payment, undo, retry=FAST),
            ],
        )
    )


waits_for("waits_for_payment")
waits_for("waits_briefly", timeout=1)
waits_for("waits_briefly_then_pauses", timeout=1, on_timeout="pause")


def _timer() -> None:
    from sagas.definitions import Wait

    register(
        SagaDefinition(
            name="cools_off",
            steps=[Wait("cooling_off", timeout=1), Step("charge", record, undo, retry=FAST)],
        )
    )


_timer()


def hands_over_the_url(ctx: StepContext) -> dict:
    """As a step that gives a payment provider the URL of its webhook, before the wait."""
    return {"webhook": ctx.signal_url("payment_confirmed")}


def _webhook() -> None:
    from sagas.definitions import Wait

    register(
        SagaDefinition(
            name="pays_by_webhook",
            steps=[
                Step("charge", hands_over_the_url, undo_reservation, retry=FAST),
                Wait("confirmation", event="payment_confirmed", timeout=60),
                Step("ship", sees_the_payment, undo, retry=FAST),
            ],
        )
    )


_webhook()


def _more_waits() -> None:
    from sagas.definitions import Wait

    register(
        SagaDefinition(
            name="two_waits",
            steps=[
                Wait("first_wait", event="first", timeout=3600),
                Step("a", record, undo, retry=FAST),
                Wait("second_wait", event="second", timeout=3600),
                Step("b", record, undo, retry=FAST),
            ],
        )
    )
    register(
        SagaDefinition(
            name="half_step_after_a_wait",
            steps=[
                Step("a", record, undo, retry=FAST),
                Wait("w", event="go", timeout=3600),
                Step("b", decline, undo, retry=FAST, compensate_failed_step=True),
            ],
        )
    )


_more_waits()


def is_a_big_order(ctx: StepContext) -> bool:
    return float(ctx.input.get("total", 0)) > 100


def a_broken_condition(ctx: StepContext) -> bool:
    raise KeyError("no such field")


def when_the_reservation_says(ctx: StepContext):
    from datetime import datetime

    return datetime.fromisoformat(ctx.outputs["reserve"]["until"])


def reserves_until(ctx: StepContext) -> dict:
    """A reservation that says until when the saga waits (an ISO time in the input)."""
    return {"until": ctx.input["until"]}


def _approvals() -> None:
    from sagas.definitions import Approval, Wait

    register(
        SagaDefinition(
            name="needs_approval",
            key="order",
            steps=[
                Step("reserve", record, undo_reservation, retry=FAST),
                Approval("review", timeout=3600),
                Step("ship", record, undo, retry=FAST),
            ],
        )
    )
    register(
        SagaDefinition(
            name="reviews_big_orders",
            key="order",
            steps=[
                Step("reserve", record, undo_reservation, retry=FAST),
                Approval("review", condition=is_a_big_order),
                Step("ship", record, undo, retry=FAST),
            ],
        )
    )
    register(
        SagaDefinition(
            name="waits_until_told",
            steps=[
                Step("reserve", reserves_until, undo_reservation, retry=FAST),
                Wait("hold", until=when_the_reservation_says),
                Step("charge", record, undo, retry=FAST),
            ],
        )
    )
    register(
        SagaDefinition(
            name="broken_condition",
            steps=[
                Step("reserve", record, undo_reservation, retry=FAST),
                Wait("w", event="go", condition=a_broken_condition),
                Step("ship", record, undo, retry=FAST),
            ],
        )
    )


_approvals()


def _admin_waits() -> None:
    """For tests/test_admin_waits.py: an approval with no timeout, and one past a pivot."""
    from sagas.definitions import Approval

    register(
        SagaDefinition(
            name="approval_without_timeout",
            key="order",
            steps=[
                Step("reserve", record, undo_reservation, retry=FAST),
                Approval("review"),
                Step("ship", record, undo, retry=FAST),
            ],
        )
    )
    register(
        SagaDefinition(
            name="approval_after_pivot",
            key="order",
            steps=[
                Step("charge", record, undo, retry=FAST, pivot=True),
                Approval("review", timeout=3600),
                Step("ship", record, undo, retry=FAST),
            ],
        )
    )


_admin_waits()


def breaks(ctx: StepContext) -> dict:
    """A bug: an exception the step did not declare pauses its saga (the default)."""
    raise KeyError("a bug")


register(
    SagaDefinition(
        name="breaks_at_the_end",
        steps=[Step("first", record, undo, retry=FAST), Step("last", breaks, undo, retry=FAST)],
    )
)


def always(ctx: StepContext) -> bool:
    return True


def _conditional_waits() -> None:
    from sagas.definitions import Wait

    register(
        SagaDefinition(
            name="waits_if_told_then_declines",
            steps=[
                Step("a", record, undo, retry=FAST),
                Wait("w", event="go", condition=always),
                Step("b", decline, undo, retry=FAST),
            ],
        )
    )


_conditional_waits()


def cannot_undo(ctx: StepContext) -> None:
    from sagas.exceptions import TransientError

    raise TransientError("The provider refuses the refund.", code="refund_refused")


def fixed_if_told(ctx: StepContext) -> bool:
    """A condition with a bug until its fix is deployed (a file the test makes)."""
    if not Path(ctx.input["fixed"]).exists():
        raise KeyError("a bug")
    return True


def _review_fixes() -> None:
    from sagas.definitions import Wait

    register(
        SagaDefinition(
            name="skipped_then_halted",
            steps=[
                Step("a", record, undo_reservation, retry=FAST),
                Step("b", breaks, undo_reservation, retry=FAST),
                Step("c", record, cannot_undo, retry=FAST, compensation_retry=FAST),
                Step("d", decline, undo, retry=FAST),
            ],
        )
    )
    register(
        SagaDefinition(
            name="condition_fixed_later",
            steps=[
                Step("a", record, undo, retry=FAST),
                Wait("w", event="go", condition=fixed_if_told),
                Step("b", record, undo, retry=FAST),
            ],
        )
    )


_review_fixes()


# -- groups and children (tests/test_groups.py, tests/test_children.py) ----------------------

# Registered in the workers too (SAGAS_MODULES names this module).
from tests import childdefs, groupdefs  # noqa: E402, F401
