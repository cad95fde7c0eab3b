"""The definition API and the snapshot of a saga's steps into its rows."""

from __future__ import annotations

import pytest

from sagas.definitions import RetryPolicy, SagaDefinition, Step, register
from sagas.exceptions import DefinitionError, InvalidTransition
from sagas.models import EventKind, SagaStep
from sagas.services import saga_retry, saga_start
from sagas.testing.models import Fault, FaultEffect, FaultPoint
from tests import sagadefs
from tests.conftest import wait_final


def test_definition_rejects_bad_policies():
    with pytest.raises(DefinitionError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(DefinitionError):
        Step("x", sagadefs.record, on_exhausted="explode")  # type: ignore[arg-type]
    with pytest.raises(DefinitionError):
        SagaDefinition("empty", steps=[])
    with pytest.raises(DefinitionError):
        SagaDefinition("dup", steps=[Step("a", sagadefs.record), Step("a", sagadefs.record)])


def test_validate_reports_an_unimportable_action():
    definition = SagaDefinition("typo", steps=[Step("a", "tests.sagadefs.no_such_function")])
    with pytest.raises(DefinitionError, match=r"no_such_function' does not import"):
        definition.validate()


def test_backoff_grows_exponentially_and_is_capped():
    policy = RetryPolicy(max_attempts=10, backoff=1, backoff_max=5, jitter=False)
    assert [policy.countdown(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    jittered = RetryPolicy(max_attempts=10, backoff=1, backoff_max=5)
    assert all(0 <= jittered.countdown(3) <= 4 for _ in range(50))


def test_a_saga_finishes_with_the_steps_it_started_with(saga_db):
    register(sagadefs.snapshot_v1())
    # The second step fails until an operator retries: the saga pauses there.
    fault = Fault.objects.create(
        step_name="second", point=FaultPoint.BEFORE_ACTION, effect=FaultEffect.TRANSIENT_ERROR
    )
    old, _ = saga_start(name="snapshot_demo", input={})
    assert wait_final(old.pk).status == "failed"

    # A deploy changes the definition while the old saga waits.
    register(sagadefs.snapshot_v2())
    fault.delete()
    saga_retry(saga_id=old.pk)
    assert wait_final(old.pk).status == "completed"
    assert list(SagaStep.objects.filter(saga=old).values_list("name", flat=True)) == [
        "first",
        "second",
    ]

    new, _ = saga_start(name="snapshot_demo", input={})
    assert wait_final(new.pk).status == "completed"
    assert list(SagaStep.objects.filter(saga=new).values_list("name", flat=True)) == [
        "first",
        "renamed",
        "added",
    ]
    register(sagadefs.snapshot_v1())


def test_retry_refuses_a_saga_that_has_not_failed(saga_db):
    saga, _ = saga_start(name="snapshot_demo", input={})
    assert wait_final(saga.pk).status == "completed"
    with pytest.raises(InvalidTransition):
        saga_retry(saga_id=saga.pk)
    kinds = list(saga.events.values_list("kind", flat=True))
    assert kinds == [
        EventKind.SAGA_STARTED,
        EventKind.STEP_COMPLETED,
        EventKind.STEP_COMPLETED,
        EventKind.SAGA_COMPLETED,
    ]
