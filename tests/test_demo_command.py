"""`make demo`'s command (`demo_orders`): how it tells that no worker ran anything."""

from __future__ import annotations

from orders.management.commands.demo_orders import Command
from sagas.models import SagaStep
from sagas.services import saga_start


def test_the_demo_tells_no_worker_from_the_saga_rows(db):
    # A saga is created running; only its stages say whether a worker took it.
    saga, _ = saga_start(name="snapshot_demo", input={})
    assert saga.status == "running"
    assert not Command._any_step_began({saga.pk: saga})

    SagaStep.objects.filter(saga=saga, index=0).update(status="running", attempts=1)
    assert Command._any_step_began({saga.pk: saga})
