"""Sagas for Django on Celery: ordered steps with compensations, kept in PostgreSQL.

What a project needs is importable from here:

    from sagas import RetryPolicy, SagaDefinition, Step, StepContext, register, saga_start
    from sagas import BusinessError, TransientError, SagaBusy, SagaKeyInFlight

These names import lazily (on first use, `sagas.lazy`), because this package is imported
before Django's app registry is ready (by `sagas.apps`, by settings), and the services import
the models.

A map of the package:

- `definitions`: the declarative definition API (`SagaDefinition`, `Step`, `Wait`,
  `Approval`, `Group`, `Child`, `RetryPolicy`, `StepContext`, `register`) and the registry of
  definitions.
- `services`: the public Python API: start a saga, send it a signal, approve or reject
  it, preview and run the operator actions (retry, compensate, resolve or skip a step),
  bulk actions. The admin, the API and the commands call these and nothing else.
- `exceptions`: what step actions raise to tell the engine what went wrong (`BusinessError`,
  `TransientError`), and what the services raise (`SagaBusy`, `SagaKeyInFlight`, ...).
- `engine/`: every saga and step transition, under the saga's row lock, and its plumbing:
  `rows` (the SQL it sends), `dispatch` (a saga's chains to the broker, after the commit),
  `notify` (committed events to signals, metrics and traces), `relay` (the signals a crash
  left unsent), `waits` (stages that wait for an event or a time), `waker` (ends due waits
  within seconds: `sagas.wake`), `sweeper` (re-dispatches sagas whose messages were lost, and
  ends due waits too), `hooks` (where the test kit injects
  faults).
- `tasks`: the Celery tasks of the engine: they pass ids and call `engine`.
- `models`: sagas, their stage rows, signals and the append-only event log, the source of
  truth.
- `retention`: deletes finished sagas in short batches (`manage.py sagas_purge`).
- `signals`: Django signals of a saga's life, sent after the commit of each change.
- `admin/`: the admin: status at a glance, each saga's steps and timeline, operator actions.
- `api/` and `urls`: the REST API (the `api` extra), with its bounded JSON parser.
- `bulk/`: retry or compensate every saga that matches a filter, or mark a stage of each as
  done, after a preview.
- `metrics/`: Prometheus metrics (`SAGAS_METRICS`; the `metrics` extra).
- `tracing`: OpenTelemetry traces, one per saga (`SAGAS_TRACING`; the `tracing` extra).
- `checks`: Django system checks of what the framework's guarantees need.
- `conf`: every `SAGAS_*` setting, with its default.
- `testing/`: the test kit: real workers, injected faults, a failure matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import exports

if TYPE_CHECKING:
    from .bulk import BulkFilter, BulkSkip
    from .definitions import (
        Approval,
        Child,
        Discrepancy,
        Group,
        ReconcileContext,
        Repair,
        RetryPolicy,
        SagaDefinition,
        Step,
        StepContext,
        Wait,
        get_definition,
        register,
        registered,
    )
    from .exceptions import (
        BulkActionRefused,
        BulkPreviewOutdated,
        BusinessError,
        DefinitionError,
        InvalidTransition,
        SagaBusy,
        SagaError,
        SagaKeyError,
        SagaKeyInFlight,
        SignalError,
        StepError,
        TransientError,
    )
    from .services import (
        bulk_action_preview,
        bulk_action_start,
        saga_approve,
        saga_compensate,
        saga_plan,
        saga_reconcile,
        saga_reject,
        saga_repair,
        saga_retry,
        saga_signal,
        saga_skip,
        saga_start,
        saga_step_resolve,
    )

__version__ = "0.1.0"

_WHERE = {
    # Defining sagas.
    "Approval": "definitions",
    "Child": "definitions",
    "Group": "definitions",
    "RetryPolicy": "definitions",
    "SagaDefinition": "definitions",
    "Step": "definitions",
    "Wait": "definitions",
    "StepContext": "definitions",
    "Discrepancy": "definitions",
    "Repair": "definitions",
    "ReconcileContext": "definitions",
    "get_definition": "definitions",
    "register": "definitions",
    "registered": "definitions",
    # Starting them, and the operator actions.
    "saga_start": "services",
    "saga_plan": "services",
    "saga_retry": "services",
    "saga_compensate": "services",
    "saga_step_resolve": "services",
    "saga_skip": "services",
    "saga_signal": "services",
    "saga_approve": "services",
    "saga_reject": "services",
    "saga_reconcile": "services",
    "saga_repair": "services",
    "bulk_action_preview": "services",
    "bulk_action_start": "services",
    "BulkFilter": "bulk",
    "BulkSkip": "bulk",
    # Raised by step actions, or by the services.
    "SagaError": "exceptions",
    "StepError": "exceptions",
    "BusinessError": "exceptions",
    "TransientError": "exceptions",
    "DefinitionError": "exceptions",
    "InvalidTransition": "exceptions",
    "SagaBusy": "exceptions",
    "SagaKeyError": "exceptions",
    "SagaKeyInFlight": "exceptions",
    "SignalError": "exceptions",
    "BulkActionRefused": "exceptions",
    "BulkPreviewOutdated": "exceptions",
}

__all__ = [
    "Approval",
    "BulkActionRefused",
    "BulkFilter",
    "BulkPreviewOutdated",
    "BulkSkip",
    "BusinessError",
    "Child",
    "DefinitionError",
    "Discrepancy",
    "Group",
    "InvalidTransition",
    "ReconcileContext",
    "Repair",
    "RetryPolicy",
    "SagaBusy",
    "SagaDefinition",
    "SagaError",
    "SagaKeyError",
    "SagaKeyInFlight",
    "SignalError",
    "Step",
    "StepContext",
    "StepError",
    "TransientError",
    "Wait",
    "bulk_action_preview",
    "bulk_action_start",
    "get_definition",
    "register",
    "registered",
    "saga_approve",
    "saga_compensate",
    "saga_plan",
    "saga_reconcile",
    "saga_reject",
    "saga_repair",
    "saga_retry",
    "saga_signal",
    "saga_skip",
    "saga_start",
    "saga_step_resolve",
]


__getattr__, __dir__ = exports(__name__, _WHERE, __all__)
