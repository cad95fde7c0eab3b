"""The test kit itself (`sagas.testing`): its cases follow from a definition, it passes a sound
saga, and it fails, for the right reason, when a saga or the engine breaks a guarantee."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from inventory.models import Product
from orders.sagas import ORDER_FULFILMENT
from sagas.models import Saga
from sagas.testing import CeleryWorker, FailureMatrix
from sagas.testing.worker import SAGA_TASKS, queue_length
from tests.conftest import celery_app, worker_options
from tests.factories import ProductFactory

# -- the cases follow from the definition -------------------------------------------------------


def test_the_order_sagas_cases():
    assert [case.id for case in FailureMatrix(ORDER_FULFILMENT).cases()] == [
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
