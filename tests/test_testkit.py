"""The test kit itself (`sagas.testing`): its cases follow from a definition, it passes a sound
saga, and it fails, for the right reason, when a saga or the engine breaks a guarantee; the
same for sagas that wait, and for approvals."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from inventory.models import Product
from orders.sagas import ORDER_FULFILMENT
from sagas.definitions import Approval, OnTimeout, SagaDefinition, Step, Wait
from sagas.models import Saga
from sagas.testing import CeleryWorker, FailureMatrix
from sagas.testing.worker import SAGA_TASKS, queue_length
from tests import sagadefs
from tests.conftest import celery_app, worker_options
from tests.factories import ProductFactory

# -- the cases follow from the definition -------------------------------------------------------


def test_the_order_sagas_cases():
    cases = FailureMatrix(ORDER_FULFILMENT).cases()
    assert [case.id for case in cases if case.scenario is None] == [  # its waits' come after
        "create_order fails for good",
        "charge_payment fails for good",
        "reserve_inventory fails for good",
        "schedule_shipment fails for good",
        "create_order retries exhausted (compensate)",
        "charge_payment retries exhausted (pause)",
        "reserve_inventory retries exhausted (compensate)",
        "schedule_shipment retries exhausted (compensate)",
        "release_inventory fails for good (compensation of reserve_inventory)",
        "refund_payment fails for good (compensation of charge_payment)",
        "cancel_order fails for good (compensation of create_order)",
        "every message delivered twice",
        "every message delivered twice, schedule_shipment fails for good",
    ]


def test_the_kit_asks_for_its_app_when_it_is_not_installed():
    from django.core.exceptions import ImproperlyConfigured
    from django.test.utils import modify_settings

    with (
        modify_settings(INSTALLED_APPS={"remove": ["sagas.testing"]}),
        pytest.raises(
            ImproperlyConfigured, match=re.escape('add "sagas.testing" to INSTALLED_APPS')
        ),
    ):
        FailureMatrix(ORDER_FULFILMENT)


def test_what_a_case_expects_follows_the_policy():
    matrix = FailureMatrix("past_a_pivot")
    # A step marked compensate_failed_step is undone too, first.
    charge = matrix.case("charge fails for good").expected
    assert (charge.status, charge.compensated) == ("compensated", ("charge", "hold"))
    assert charge.steps["charge"] == "compensated" and charge.attempts == {"charge": 1}
    # Past the pivot a failure pauses, whatever the step's policy, and nothing is undone.
    archive = matrix.case("archive retries exhausted (pause, after the pivot)").expected
    assert (archive.status, archive.compensated, archive.attempts) == ("failed", (), {"archive": 2})
    assert archive.steps == {
        "hold": "completed",
        "charge": "completed",
        "commit": "completed",
        "notify": "completed",
        "archive": "failed",
    }
    # The last failure that still compensates is at the pivot; with
    # continue_compensation_on_failure the earlier step is still undone.
    refund = matrix.case("undo fails for good (compensation of charge)").expected
    assert (refund.status, refund.error_code) == ("failed", "compensation_failed")
    assert refund.steps["charge"] == "compensation_failed" and refund.compensated == ("hold",)
    assert refund.compensation_attempts == {"charge": 8}  # the default compensation policy


# -- the pytest plugin, as a project opts in ---------------------------------------------------


def test_the_plugin_takes_the_app_from_pytests_configuration(pytester):
    pytester.makeini("[pytest]\nsagas_celery_app = proj\n")
    pytester.makepyfile(
        """
        def test_options(saga_worker_options):
            assert saga_worker_options["app"] == "proj"
            assert saga_worker_options["queue"].startswith("sagas-test-")
        """
    )
    plugin = ("-p", "sagas.testing.pytest_plugin", "-p", "no:django", "-p", "no:cacheprovider")
    pytester.runpytest_subprocess(*plugin).assert_outcomes(passed=1)

    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess(*plugin)
    result.stdout.fnmatch_lines(["*set sagas_celery_app = *in pytest's configuration*"])


# -- a sound saga passes every case --------------------------------------------------------------


@FailureMatrix("past_a_pivot").parametrize()
def test_a_saga_with_a_pivot_passes_its_matrix(saga_db, case):
    case.run(saga_db).assert_guarantees()


def product_input() -> dict:
    return {"sku": ProductFactory(stock_on_hand=10).sku}


def stock_is_back(saga: Saga) -> None:
    """What the stock sagas promise: one is out of stock exactly while their first step holds
    it (completed and not undone), whatever the saga's end."""
    on_hand = Product.objects.get(sku=saga.input["sku"]).stock_on_hand
    take = saga.steps.get(name="take")
    expected = 9 if take.status in ("completed", "compensating", "compensation_failed") else 10
    assert on_hand == expected, f"{on_hand} in stock, expected {expected}"


@FailureMatrix("takes_stock", make_input=product_input, invariant=stock_is_back).parametrize()
def test_a_saga_that_undoes_what_it_did_passes_its_matrix(saga_db, case):
    case.run(saga_db).assert_guarantees()


# -- it fails when a guarantee is broken -----------------------------------------------------------


def broken(result) -> list[str]:
    """The problems the kit reports, checking that assert_guarantees() fails with them."""
    with pytest.raises(AssertionError) as failure:
        result.assert_guarantees()
    problems = result.problems()
    assert problems, "the kit failed without saying why"
    assert all(problem.split("\n")[0] in str(failure.value) for problem in problems)
    assert f"case {result.case.id!r}" in str(failure.value)
    return problems


def test_a_compensation_that_does_not_undo_its_action_fails_the_invariant(saga_db):
    matrix = FailureMatrix("leaks_stock", make_input=product_input, invariant=stock_is_back)
    result = matrix.case("after fails for good").run(saga_db)

    # The framework did its part (it ran the compensation, in order, once); the saga's own
    # compensation did not undo its action, and only the user's invariant can see that.
    assert result.compensated == ["take"]
    assert [p.split("\n")[0] for p in broken(result)] == [
        "the invariant failed: 9 in stock, expected 10"
    ]


@pytest.fixture(scope="module")
def broken_engine(django_db_setup) -> Iterator[CeleryWorker]:
    """A worker whose engine has two bugs (tests/broken_engine.py), on a queue of its own."""
    options = worker_options(1, 2, name="broken-engine")
    options |= {"queue": f"test-broken-{uuid.uuid4().hex[:8]}", "include": ["tests.broken_engine"]}
    with CeleryWorker(**options) as worker:
        yield worker


def on_broken_engine(how: str) -> FailureMatrix:
    return FailureMatrix("three_steps", make_input=lambda: {"break_engine": how}, timeout=30)


def test_compensations_in_the_wrong_order_fail_the_kits_guarantees(transactional_db, broken_engine):
    result = on_broken_engine("wrong_order").case("third fails for good").run(broken_engine)
    assert result.compensated == ["first", "second"]
    assert broken(result) == [
        "compensations ran in the order ['first', 'second'], not the reverse of the steps'"
    ]


def test_a_compensation_run_twice_fails_the_kits_guarantees(transactional_db, broken_engine):
    case = on_broken_engine("twice").case("every message delivered twice, third fails for good")
    problems = broken(case.run(broken_engine))
    twice = [re.fullmatch(r"(\w+) was compensated (\d) times", p) for p in problems]
    assert all(twice), problems  # nothing else broke
    assert {m.group(1) for m in twice if m} == {"first", "second"}


def test_the_broken_engine_runs_other_sagas_soundly(transactional_db, broken_engine):
    """The two failures above come from the bugs, not from the worker they run on."""
    matrix = on_broken_engine("")
    for case in ("third fails for good", "every message delivered twice, third fails for good"):
        matrix.case(case).run(broken_engine).assert_guarantees()


# -- the kit's worker follows the project's task_routes -------------------------------------------


def test_the_kit_knows_every_task_of_the_framework():
    """The tasks the kit's worker follows through the app's routes are all the framework's."""
    import sagas.tasks  # noqa: F401  (registers them)

    assert set(SAGA_TASKS) == {name for name in celery_app.tasks if name.startswith("sagas.")}


@dataclass
class Routes:
    queue: str  # where the project's routes send the saga tasks
    env: dict[str, str]  # for a worker of the project with those routes


@pytest.fixture
def routes_elsewhere() -> Iterator[Routes]:
    """The project routes the saga tasks to a queue of their own (Celery's `task_routes`), in
    this process and in the workers a test starts (tests/settings.py); no worker listens there
    unless the kit's does."""
    routes = Routes(queue=f"test-routed-{uuid.uuid4().hex[:8]}", env={})
    setting = {"sagas.*": {"queue": routes.queue}}
    routes.env["TEST_CELERY_TASK_ROUTES"] = json.dumps(setting)
    amqp, before = celery_app.amqp, (celery_app.conf.task_routes, celery_app.amqp.router)
    celery_app.conf.task_routes = setting
    amqp.flush_routes()
    del amqp.router  # built again from the routes above
    try:
        assert amqp.router.route({}, "sagas.run_step")["queue"].name == routes.queue
        yield routes
    finally:
        celery_app.conf.task_routes, amqp.router = before
        amqp.flush_routes()


@pytest.mark.django_db(transaction=True)
def test_the_kits_worker_takes_the_saga_tasks_the_project_routes_elsewhere(routes_elsewhere):
    """On a queue of its own (the plugin's way), the worker takes every saga task, from this
    process (`routed()`) and from itself, and none is left where the routes send them."""
    options = worker_options(1, 2, name="routed", env=routes_elsewhere.env)
    options["queue"] = f"test-kit-{uuid.uuid4().hex[:8]}"
    matrix = FailureMatrix("three_steps", timeout=30)
    with CeleryWorker(**options) as worker:
        assert worker.queues() == [options["queue"]]
        with worker.routed():
            assert celery_app.amqp.router.route({}, "sagas.run_step")["queue"].name == worker.queue
        for case in ("third fails for good", "every message delivered twice"):
            matrix.case(case).run(worker).assert_guarantees()
    assert (
        celery_app.amqp.router.route({}, "sagas.run_step")["queue"].name == routes_elsewhere.queue
    )
    assert queue_length(celery_app, routes_elsewhere.queue) == 0


@pytest.mark.django_db(transaction=True)
def test_a_worker_on_the_apps_own_queues_listens_where_the_routes_send_the_saga_tasks(
    routes_elsewhere,
):
    """Without a queue of its own, the worker listens on the app's default queue and on every
    queue the routes send a saga task to."""
    default = f"test-default-{uuid.uuid4().hex[:8]}"
    env = {**routes_elsewhere.env, "CELERY_TASK_DEFAULT_QUEUE": default}
    options = {**worker_options(1, 2, name="routed-default", env=env), "queue": None}
    before, celery_app.conf.task_default_queue = celery_app.conf.task_default_queue, default
    try:
        with CeleryWorker(**options) as worker:
            assert worker.queues(celery_app) == [default, routes_elsewhere.queue]
            case = FailureMatrix("three_steps", timeout=30).case("third fails for good")
            case.run(worker).assert_guarantees()
    finally:
        celery_app.conf.task_default_queue = before


# -- sagas with waits ------------------------------------------------------------------------------

CONFIRMED = {"reference": "3ds-1"}


def waits_then(name: str, *, on_timeout: OnTimeout, pivot: bool = False) -> SagaDefinition:
    """Reserve, wait for the payment's confirmation (a timeout that does `on_timeout`), ship;
    the reservation a pivot if `pivot`."""
    return SagaDefinition(
        name=name,
        steps=[
            Step("reserve", sagadefs.record, sagadefs.undo, retry=sagadefs.FAST, pivot=pivot),
            Wait(
                "confirmation",
                event="payment_confirmed",
                timeout=3600,
                on_timeout=on_timeout,
                validate=sagadefs.has_a_reference,
                max_payload_bytes=1000,
            ),
            Step("ship", sagadefs.sees_the_payment, sagadefs.undo, retry=sagadefs.FAST),
        ],
    )


PAUSES = FailureMatrix(
    waits_then("waits_then_pauses", on_timeout="pause"),
    payloads={"payment_confirmed": CONFIRMED},
    invalid_payloads={"payment_confirmed": [{"reference": ""}, lambda saga: [saga.pk.hex]]},
    timeout=30,
)


def test_the_cases_of_a_wait_follow_its_definition():
    wait_cases = [case.id for case in PAUSES.cases() if case.scenario is not None]
    assert wait_cases == [
        "payment_confirmed sent early",
        "payment_confirmed sent on time",
        "payment_confirmed sent twice",
        "payment_confirmed sent with an invalid payload",
        "payment_confirmed fails the wait",
        "payment_confirmed never sent (timeout: pause)",
        "payment_confirmed sent after the timeout",
        "payment_confirmed sent as the timeout fires",
        "aborted while waiting for payment_confirmed",
    ]
    # A step failing after the wait: the wait completed before it, and stays so.
    ship = PAUSES.case("ship fails for good").expected
    assert ship.steps == {"reserve": "compensated", "confirmation": "completed", "ship": "failed"}
    paused = PAUSES.case("payment_confirmed never sent (timeout: pause)").expected
    assert (paused.status, paused.error_code, paused.compensated) == (
        "failed",
        "wait_timed_out",
        (),
    )
    assert paused.steps == {"reserve": "completed", "confirmation": "failed", "ship": "pending"}
    # A signal that fails the wait compensates, whatever the timeout would do.
    failed = PAUSES.case("payment_confirmed fails the wait").expected
    assert (failed.status, failed.error_code, failed.compensated) == (
        "compensated",
        "kit_failed",
        ("reserve",),
    )
    assert failed.steps == {"reserve": "compensated", "confirmation": "failed", "ship": "pending"}

    # Past a pivot, a timeout that compensates pauses; an operator's abort still undoes it all.
    pivot = FailureMatrix(waits_then("waits_past_a_pivot", on_timeout="compensate", pivot=True))
    never = pivot.case("payment_confirmed never sent (timeout: pause, after the pivot)").expected
    assert (never.status, never.compensated) == ("failed", ())
    failed = pivot.case("payment_confirmed fails the wait after the pivot").expected
    assert (failed.status, failed.error_code, failed.compensated) == ("failed", "kit_failed", ())
    aborted = pivot.case("aborted while waiting for payment_confirmed").expected
    assert (aborted.status, aborted.compensated) == ("compensated", ("reserve",))
    assert aborted.steps == {"reserve": "compensated", "confirmation": "pending", "ship": "pending"}

    # A timer's time passes; a wait without a timeout is never late.
    timer = FailureMatrix("cools_off")
    assert [c.id for c in timer.cases() if c.scenario] == ["cooling_off times out"]
    forever = SagaDefinition(
        name="waits_forever",
        steps=[Wait("w", event="go"), Step("after", sagadefs.record, retry=sagadefs.FAST)],
    )
    assert [c.id for c in FailureMatrix(forever).cases() if c.scenario] == [
        "go sent early",
        "go sent on time",
        "go sent twice",
        "go sent with an invalid payload",
        "go fails the wait",
        "aborted while waiting for go",
    ]


def test_payloads_are_for_the_events_the_saga_waits_for_not_its_approvals():
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match=re.escape("payloads for ['payment_confirmd']")):
        FailureMatrix("waits_for_payment", payloads={"payment_confirmd": CONFIRMED})
    with pytest.raises(ImproperlyConfigured, match=re.escape("invalid_payloads for ['nope']")):
        FailureMatrix("waits_for_payment", invalid_payloads={"nope": [{}]})
    reviewed = SagaDefinition(
        name="reviewed",
        steps=[Approval("review", timeout=60), Step("go", sagadefs.record, retry=sagadefs.FAST)],
    )
    assert "review approved" in [case.id for case in FailureMatrix(reviewed).cases()]
    decision = {"decision": "approved"}
    with pytest.raises(ImproperlyConfigured, match=re.escape("an approval's payload is its")):
        FailureMatrix(reviewed, payloads={"review": decision})


@pytest.mark.parametrize("case", [c for c in PAUSES.cases() if c.scenario is not None], ids=str)
def test_a_saga_that_waits_passes_its_matrix(saga_db, case):
    result = case.run(saga_db)
    result.assert_guarantees()
    if result.saga.status == "completed":  # the payload, as the step after the wait saw it
        ship = next(step for step in result.steps if step.name == "ship")
        assert ship.output == {"confirmed": CONFIRMED}


def test_a_wait_that_takes_a_payload_it_should_refuse_fails_the_kits_guarantees(saga_db):
    """The wait checks no payload (no `validate`): the one the user says is invalid ends it."""
    lax = SagaDefinition(
        name="waits_laxly",
        steps=[
            Wait("confirmation", event="payment_confirmed", timeout=3600),
            Step("ship", sagadefs.sees_the_payment, retry=sagadefs.FAST),
        ],
    )
    matrix = FailureMatrix(
        lax,
        payloads={"payment_confirmed": CONFIRMED},
        invalid_payloads={"payment_confirmed": [{"reference": ""}]},
        timeout=30,
    )
    problems = broken(matrix.case("payment_confirmed sent with an invalid payload").run(saga_db))
    assert problems[:2] == [
        "the payment_confirmed sent invalid was consumed, not invalid",
        "after the invalid payloads, confirmation no longer waited",
    ]
    assert "2 signals of payment_confirmed stored, expected 1" in problems
    assert any(p.startswith("the payment_confirmed sent on time was refused") for p in problems)


def test_an_engine_that_loses_a_signal_sent_early_fails_the_kits_guarantees(saga_db, monkeypatch):
    """The saga's first stage is a wait, which this process begins as the start commits: with
    the signals kept for it out of its sight, the wait does not consume the one sent early."""
    monkeypatch.setattr("sagas.engine.waits.kept_for", lambda saga_id, event: [])
    matrix = FailureMatrix("two_waits", timeout=30)
    problems = broken(matrix.case("first sent early").run(saga_db))
    assert problems == [
        "the saga waited at first_wait though its event came before the wait began (and was kept)",
        "the first sent early ended discarded, not consumed",
    ]


def test_a_wait_its_condition_skips_fails_its_cases_saying_so(saga_db):
    """The wait waits only for big orders: a small one's cases of the wait say it was skipped;
    a big one's pass."""

    def matrix(total: int) -> FailureMatrix:
        definition = SagaDefinition(
            name="waits_for_big_orders",
            steps=[
                Step("reserve", sagadefs.record, sagadefs.undo, retry=sagadefs.FAST),
                Wait(
                    "confirmation",
                    event="payment_confirmed",
                    timeout=3600,
                    condition=sagadefs.is_a_big_order,
                ),
                Step("ship", sagadefs.record, retry=sagadefs.FAST),
            ],
        )
        return FailureMatrix(definition, make_input=lambda: {"total": total}, timeout=30)

    small = broken(matrix(5).case("payment_confirmed sent on time").run(saga_db))
    assert (
        "the wait confirmation was skipped (its condition was false for this input): give the "
        "matrix an input for which the saga waits there"
    ) in small
    matrix(500).case("payment_confirmed sent on time").run(saga_db).assert_guarantees()


def test_a_failing_signal_past_a_pivot_pauses_the_saga(saga_db):
    matrix = FailureMatrix(
        waits_then("fails_past_a_pivot", on_timeout="compensate", pivot=True), timeout=30
    )
    result = matrix.case("payment_confirmed fails the wait after the pivot").run(saga_db)
    result.assert_guarantees()
    assert (result.saga.status, result.saga.error_code) == ("failed", "kit_failed")


def test_an_engine_that_ignores_a_failing_signal_fails_the_kits_guarantees(saga_db, monkeypatch):
    """The engine drops the signal's `fail`: the wait completes as if confirmed."""
    from sagas.engine import waits

    signal = waits.signal

    def ignores_fail(saga_id, event, **options):
        return signal(saga_id, event, **{**options, "fail": None})

    monkeypatch.setattr("sagas.engine.waits.signal", ignores_fail)
    problems = broken(PAUSES.case("payment_confirmed fails the wait").run(saga_db))
    assert problems[:2] == [
        "the saga ended completed, expected compensated",
        "its error code is '', expected 'kit_failed'",
    ]
    assert "the failed confirmation has the error '', not 'kit_failed'" in problems


# -- approvals -------------------------------------------------------------------------------------


def order_input() -> dict:
    return {"order": uuid.uuid4().hex}


REVIEWED = FailureMatrix("needs_approval", make_input=order_input, timeout=30)


def test_the_cases_of_an_approval_follow_its_definition():
    assert [case.id for case in REVIEWED.cases() if case.scenario is not None] == [
        "review approved",
        "review rejected",
        "review approved twice",
        "review approved, then rejected",
        "review decided before the saga waits for it",
        "review never decided (timeout: compensate)",
        "review decided as the timeout fires",
        "aborted while waiting for review",
    ]
    rejected = REVIEWED.case("review rejected").expected
    assert (rejected.status, rejected.error_code, rejected.compensated) == (
        "compensated",
        "approval_rejected",
        ("reserve",),
    )
    assert rejected.steps == {"reserve": "compensated", "review": "failed", "ship": "pending"}
    race = REVIEWED.case("review decided as the timeout fires")
    assert (race.expected.status, race.if_timed_out and race.if_timed_out.error_code) == (
        "completed",
        "wait_timed_out",
    )

    # Past a pivot, a rejection pauses the saga, as the timeout does; nothing is undone.
    pivot = FailureMatrix("approval_after_pivot")
    paused = pivot.case("review rejected after the pivot").expected
    assert (paused.status, paused.error_code, paused.compensated) == (
        "failed",
        "approval_rejected",
        (),
    )
    assert paused.steps == {"charge": "completed", "review": "failed", "ship": "pending"}
    assert "review never decided (timeout: pause, after the pivot)" in [
        case.id for case in pivot.cases()
    ]
    # Without a timeout, an approval is never late.
    forever = [c.id for c in FailureMatrix("approval_without_timeout").cases() if c.scenario]
    assert forever == [
        "review approved",
        "review rejected",
        "review approved twice",
        "review approved, then rejected",
        "review decided before the saga waits for it",
        "aborted while waiting for review",
    ]


@pytest.mark.parametrize(
    "case",
    [
        *(c for c in REVIEWED.cases() if c.scenario is not None),
        # Step cases go past the approval: the kit approves it.
        REVIEWED.case("ship fails for good"),
        REVIEWED.case("every message delivered twice"),
    ],
    ids=str,
)
def test_a_saga_with_an_approval_passes_its_matrix(saga_db, case):
    result = case.run(saga_db)
    result.assert_guarantees()
    review = next(step for step in result.steps if step.name == "review")
    if review.status == "completed":  # approved by the kit, as the timeline says
        assert review.output["decision"] == "approved"
        assert review.output["by"] == "test-kit"
        decided = [e.detail for e in result.events if e.kind == "wait_completed"]
        assert [(d["decision"], d["by"]) for d in decided] == [("approved", "test-kit")]


def test_a_rejection_past_a_pivot_pauses_the_saga(saga_db):
    matrix = FailureMatrix("approval_after_pivot", make_input=order_input, timeout=30)
    result = matrix.case("review rejected after the pivot").run(saga_db)
    result.assert_guarantees()
    assert (result.saga.status, result.saga.error_code) == ("failed", "approval_rejected")


def test_an_engine_that_takes_any_decision_fails_the_kits_guarantees(saga_db, monkeypatch):
    """The engine takes a decision as a plain signal: one before the saga waits is kept (and
    decides the approval as the saga reaches it), and the same one again is refused, not the
    first one's outcome."""
    from sagas.engine import waits

    def any_decision(saga_id, *, approve, actor, note="", stage=None):
        payload = {"decision": "approved" if approve else "rejected", "by": actor, "note": note}
        fail = None if approve else waits.REJECTED.as_dict()
        return waits.signal(saga_id, "review", payload=payload, fail=fail, decision=True)

    monkeypatch.setattr("sagas.engine.waits.decide", any_decision)
    # Nor does it know a decision taken again (under the saga's lock, `_same_decision`).
    monkeypatch.setattr("sagas.engine.waits._same_decision", lambda *args: None)
    early = broken(REVIEWED.case("review decided before the saga waits for it").run(saga_db))
    for problem in [
        "the saga never waited at review: a decision taken before was applied",
        "the decision on review (early) was kept, not NotWaiting",
        "2 decisions on review stored, expected 1 (the one taken once the saga waited)",
    ]:
        assert problem in early
    twice = broken(REVIEWED.case("review approved twice").run(saga_db))
    # (Refused as its wait is over, or as the saga completed: whichever it finds first.)
    assert twice[0].startswith("the decision on review (again) was refused ("), twice
    assert twice[0].endswith("), not consumed")
    assert twice[1:] == [
        "the decision on review sent again was not the first one repeated",
        "2 decisions on review stored, expected 1",
    ]


# -- groups and children -------------------------------------------------------------------------


def every_shape_input() -> dict:
    def sku() -> str:
        return str(ProductFactory(stock_on_hand=10).sku)

    return {
        "sku": sku(),
        "skus": {"a": sku(), "b": sku()},
        "child_sku": sku(),
        "lines": [sku(), sku()],
    }


def every_unit_back_or_held(saga: Saga) -> None:
    """Each product is out of stock by one exactly while the step or member that took it holds
    it (completed and not undone), whatever the saga's end."""
    from sagas.models import SagaMember

    held = ("completed", "compensating", "compensation_failed")
    holders = {saga.input["sku"]: saga.steps.get(name="first").status}
    for member in SagaMember.objects.filter(saga=saga):
        sku = member.item if member.item is not None else saga.input["skus"][member.name]
        holders[sku] = member.status
    child = Saga.objects.filter(parent=saga).first()
    if child is not None:
        holders[saga.input["child_sku"]] = child.steps.get(name="book").status
    for sku, status in holders.items():
        on_hand = Product.objects.get(sku=sku).stock_on_hand
        expected = 9 if status in held else 10
        assert on_hand == expected, f"{sku}: {on_hand} in stock, expected {expected} ({status})"


EVERY_SHAPE = FailureMatrix(
    "every_shape", make_input=every_shape_input, invariant=every_unit_back_or_held
)


def test_the_matrix_of_a_saga_with_groups_and_a_child_names_their_cases():
    ids = [case.id for case in EVERY_SHAPE.cases()]
    assert {
        "parallel.a fails for good",
        "parallel.b fails for good",
        "parallel.a and parallel.b fail for good together",
        "parallel.a completes after parallel.b failed for good",
        "lines[0] fails for good",
        "lines[0] and lines[1] fail for good together",
        "lines[0] completes after lines[1] failed for good",
        "shipping: its child saga fails (book fails for good)",
        "last fails for good",  # the parent compensates after its child completed
    } <= set(ids)


@EVERY_SHAPE.parametrize()
def test_a_saga_with_groups_and_a_child_passes_its_matrix(saga_db, case):
    case.run(saga_db).assert_guarantees()
