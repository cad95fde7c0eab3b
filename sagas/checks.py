"""Django system checks: what the framework's guarantees need, checked by `manage.py check`.

- `sagas.E001`: a registered definition's callable or exception class does not import.
- `sagas.E003`: `SAGAS_RENAMED_CALLABLES` is not a mapping of paths, or it loops.
- `sagas.E004`: `SAGAS_ON_UNEXPECTED_ERROR` is not one of pause, compensate, retry.
- `sagas.E005`: a definition's child stage names a saga that is not registered, its children
  form a cycle, or they nest too deep (`sagas.definitions.Child`).
- `sagas.W001`: `task_acks_late` is off.
- `sagas.W002`: `task_reject_on_worker_lost` is off.
- `sagas.W003`: `worker_prefetch_multiplier` is not 1.
- `sagas.W004`: Redis's `visibility_timeout` is not longer than a step may take.
- `sagas.W005`: a serializer other than JSON is accepted or used.
- `sagas.W006`: the Celery app does not use `sagas.broker:BrokerAMQP` (with Redis).
- `sagas.W007`: the worker pool cannot stop a step at its hard time limit (also logged by a
  worker started with such a pool, which the checks cannot see).
- `sagas.W008`: unfinished sagas store an import path that does not import (a check of the
  `database` tag: `manage.py check --database default`; `migrate` runs it too, so it warns
  rather than stops a migration).
- `sagas.W009`: a definition sets `one_in_flight_per_key`, and unfinished sagas that started
  before it did are outside its unique index (a `database` check too).
- `sagas.W010`: a definition has a wait, and beat's schedule (`CELERY_BEAT_SCHEDULE`) does not
  send `sagas.wake`, which ends the waits whose timeout is due within seconds.

The Celery settings are read from the current Celery app: the project's, which its package
imports (`mysite/__init__.py`), configured from Django's settings (`CELERY_` prefix).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from celery import current_app
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError
from kombu import Connection

from . import conf
from .definitions import Wait, import_callable, registered, steps_in, stored_paths
from .exceptions import CodeMissing, DefinitionError

logger = logging.getLogger("sagas")

# https://docs.celeryq.dev/en/stable/userguide/configuration.html
CELERY_DOCS = "https://docs.celeryq.dev/en/stable/userguide/configuration.html"
# kombu's default visibility timeout for Redis, in seconds.
REDIS_VISIBILITY_TIMEOUT = 3600
# The pools that kill a process at its hard time limit (billiard's).
HARD_LIMIT_POOLS = ("prefork",)


def _missing(paths: Iterable[str]) -> Iterable[CodeMissing]:
    for path in sorted(set(paths)):
        try:
            import_callable(path)
        except CodeMissing as missing:
            yield missing


def _why(missing: CodeMissing) -> str:
    """What importing it raised: `ModuleNotFoundError`, or the error of a module that fails as
    it loads (a `SyntaxError`, a `RuntimeError`)."""
    return type(missing.__cause__).__name__ if missing.__cause__ is not None else "unknown"


def _renamed_invalid() -> checks.Error | None:
    try:
        for path in conf.renamed_callables():
            import_callable(path)
    except (ImproperlyConfigured, DefinitionError) as exc:
        return checks.Error(
            str(exc),
            hint="Map each old import path to its new one: {'old.module.name': 'new.module.name'}.",
            id="sagas.E003",
        )
    except CodeMissing:
        pass  # a new path that does not import: E001 or W008 names it where it is used
    return None


@checks.register("sagas")
def check_definitions(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Every callable of every registered definition imports (`SagaDefinition.validate`)."""
    invalid = _renamed_invalid()
    if invalid is not None:
        return [invalid]
    policy = _policy_invalid()
    return policy + [
        checks.Error(
            f"Saga {name!r}: {missing} ({_why(missing)}).",
            hint="A saga that reaches it pauses for an operator. Fix the path, or map the old "
            "one to the new one in SAGAS_RENAMED_CALLABLES.",
            obj=name,
            id="sagas.E001",
        )
        for name, definition in sorted(registered().items())
        for missing in _missing(definition.paths())
    ]


@checks.register("sagas")
def check_children(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Every child stage of every registered definition names a registered saga, with no
    cycle and at most `MAX_CHILD_DEPTH` deep (`SagaDefinition.check_children`)."""
    found: list[checks.CheckMessage] = []
    for name, definition in sorted(registered().items()):
        try:
            definition.check_children()
        except DefinitionError as exc:
            found.append(
                checks.Error(
                    str(exc),
                    hint="A saga that reaches the stage pauses for an operator (child_not_begun).",
                    obj=name,
                    id="sagas.E005",
                )
            )
    return found


def _policy_invalid() -> list[checks.CheckMessage]:
    try:
        conf.on_unexpected_error()
    except ImproperlyConfigured as exc:
        return [
            checks.Error(
                str(exc),
                hint="A worker that meets an unexpected error pauses its saga until it is fixed.",
                id="sagas.E004",
            )
        ]
    return []


@checks.register(checks.Tags.database)
def check_stored_paths(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Unfinished sagas store import paths (their steps' callables, as they started): each
    must import, or such a saga pauses when it reaches it. Run it before and after a deploy:
    `manage.py check --database default`."""
    if not databases or "default" not in databases or _renamed_invalid() is not None:
        return []
    try:
        users = _stored_paths_in_use()
    except DatabaseError as exc:  # not migrated yet (`migrate` runs this check first), or down
        if not _tables_exist():
            return []
        return [
            checks.Warning(
                f"The unfinished sagas' import paths could not be read ({type(exc).__name__}).",
                hint="Run `manage.py check --database default` again once `migrate` has run.",
                id="sagas.W008",
            )
        ]
    return [
        checks.Warning(
            f"'{missing.path}' does not import ({_why(missing)}), and "
            f"{_sagas(users[missing.path])} store it.",
            hint="Such a saga pauses when it reaches it. Bring the code back, or map the path "
            "to its new one in SAGAS_RENAMED_CALLABLES, then retry the paused sagas.",
            id="sagas.W008",
        )
        for missing in _missing(users)
    ]


@checks.register(checks.Tags.database)
def check_keys_in_flight(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Sagas in flight that a definition's one-in-flight index leaves out (`sagas.keys`)."""
    if not databases or "default" not in databases:
        return []
    from .keys import outside_the_index

    found: list[checks.CheckMessage] = []
    for definition in registered().values():
        if not definition.one_in_flight_per_key:
            continue
        try:
            count = outside_the_index(definition.name).count()
        except DatabaseError:  # not migrated yet, or down: check_stored_paths says so
            return []
        if count:
            found.append(
                checks.Warning(
                    f"{count} unfinished sagas of {definition.name} started before "
                    "one_in_flight_per_key was set: its unique index leaves them out, and a "
                    "second saga for one of their keys could start.",
                    hint=f"Run `manage.py sagas_one_in_flight {definition.name}`: it brings them "
                    "under the index and lists the keys that already have two in flight.",
                    id="sagas.W009",
                )
            )
    return found


def _tables_exist() -> bool:
    from django.db import connection

    from .models import Saga

    try:
        return Saga._meta.db_table in connection.introspection.table_names()
    except DatabaseError:
        return False


def _sagas(names: dict[str, int]) -> str:
    count = sum(names.values())
    noun = "unfinished saga" if count == 1 else "unfinished sagas"
    return f"{count} {noun} ({', '.join(sorted(names))})"


def _stored_paths_in_use() -> dict[str, dict[str, int]]:
    """Each import path stored by unfinished sagas: how many sagas of each definition."""
    from django.db.models import Count

    from .models import FINAL_STATUSES, Saga, SagaStatus, SagaStep

    unfinished = Saga.objects.filter(
        status__in=[s for s in SagaStatus.values if s not in FINAL_STATUSES]
    )
    users: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    versions = unfinished.values("name", "definition_version").annotate(count=Count("id"))
    for version in versions.order_by():
        one = unfinished.filter(
            name=version["name"], definition_version=version["definition_version"]
        )
        steps = (
            SagaStep.objects.filter(saga__in=one[:1])
            .with_definition()
            .values_list("stage_definition", flat=True)
        )
        for path in stored_paths(list(steps)):
            users[path][version["name"]] += version["count"]
    completions = unfinished.values("name", "options__on_complete").annotate(count=Count("id"))
    for completion in completions.order_by():
        if completion["options__on_complete"]:
            users[completion["options__on_complete"]][completion["name"]] += completion["count"]
    return users


# -- the Celery settings the guarantees rely on ---------------------------------------------


def _warning(message: str, hint: str, id: str) -> checks.Warning:
    return checks.Warning(message, hint=hint, id=id)


@checks.register("sagas")
def check_celery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The Celery settings the guarantees rely on (`docs/explanation/guarantees.md`)."""
    app = current_app
    config = app.conf
    found: list[checks.CheckMessage] = []
    if not config.task_acks_late:
        found.append(
            _warning(
                "CELERY_TASK_ACKS_LATE is off: a step's message is acknowledged before it runs, "
                "and lost with a worker that dies while it runs.",
                f"Set CELERY_TASK_ACKS_LATE = True ({CELERY_DOCS}#task-acks-late).",
                "sagas.W001",
            )
        )
    if not config.task_reject_on_worker_lost:
        found.append(
            _warning(
                "CELERY_TASK_REJECT_ON_WORKER_LOST is off: the message of a step whose worker "
                "process died is acknowledged, not delivered again.",
                f"Set CELERY_TASK_REJECT_ON_WORKER_LOST = True "
                f"({CELERY_DOCS}#task-reject-on-worker-lost).",
                "sagas.W002",
            )
        )
    if config.worker_prefetch_multiplier != 1:
        found.append(
            _warning(
                f"CELERY_WORKER_PREFETCH_MULTIPLIER is {config.worker_prefetch_multiplier}: a "
                "worker holds more messages than it runs, and a crash strands them all until "
                "they are delivered again.",
                "Set CELERY_WORKER_PREFETCH_MULTIPLIER = 1 "
                f"({CELERY_DOCS}#worker-prefetch-multiplier).",
                "sagas.W003",
            )
        )
    redis = _is_redis(app)
    if redis:
        found += _visibility_timeout(config)
    found += _serializers(config)
    if redis and not _has_broker_fix(app):
        found.append(
            _warning(
                "The Celery app does not use the framework's broker connection: a worker whose "
                "Redis restarts while a step runs can exit with an AttributeError.",
                'Create it as Celery("mysite", amqp="sagas.broker:BrokerAMQP").',
                "sagas.W006",
            )
        )
    pool = str(config.worker_pool or "prefork")
    if pool not in HARD_LIMIT_POOLS:
        found.append(_pool_warning(pool))
    return found


# Beat's own schedulers, which read `beat_schedule`; another (django-celery-beat's, from the
# database) has a schedule the checks cannot see.
SETTINGS_SCHEDULERS = ("celery.beat:PersistentScheduler", "celery.beat.PersistentScheduler")


@checks.register("sagas")
def check_wake_scheduled(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """A project whose sagas wait has beat send `sagas.wake` (`docs/howto/waits.md`)."""
    waiting = sorted(
        name
        for name, definition in registered().items()
        if any(isinstance(step, Wait) for step in definition.steps)
    )
    config = current_app.conf
    if not waiting or str(config.beat_scheduler) not in SETTINGS_SCHEDULERS:
        return []
    tasks = {entry.get("task") for entry in (config.beat_schedule or {}).values()}
    if "sagas.wake" in tasks:
        return []
    names = ", ".join(waiting[:3]) + (f" and {len(waiting) - 3} more" if len(waiting) > 3 else "")
    return [
        _warning(
            f"Sagas wait ({names}), and CELERY_BEAT_SCHEDULE does not send sagas.wake: a wait's "
            "timeout ends only at the next sweep, and so does a signal kept while its saga "
            "was busy.",
            'Add "sagas-wake": {"task": "sagas.wake", "schedule": 2.0, "options": {"expires": '
            "10}} to CELERY_BEAT_SCHEDULE.",
            "sagas.W010",
        )
    ]


def _is_redis(app: Any) -> bool:
    """Whether the broker is Redis, as kombu reads its URL (`redis+socket://` too, and a list
    of URLs for failover); no connection is made. A URL kombu cannot read is judged by its
    scheme: a check never raises."""
    url = app.conf.broker_url
    if not url:
        return False
    try:
        transport = Connection(url).transport_cls
    except (KeyError, ValueError):
        first = url[0] if isinstance(url, list | tuple) else str(url)
        transport = str(first).split(":", 1)[0]
    return transport in ("redis", "rediss", "sentinel")


def _has_broker_fix(app: Any) -> bool:
    from .broker import BrokerAMQP

    return isinstance(app.amqp, BrokerAMQP)


def longest_step() -> int:
    """Seconds a step's message may stay unacknowledged: its longest attempt (time limit and
    the hard kill's grace) or its longest retry countdown, over every registered definition."""
    grace = conf.hard_time_limit_grace()
    longest = 0
    for definition in registered().values():
        for step in (s for stage in definition.steps for s in steps_in(stage)):
            limit = max(step.time_limit, step.compensation_time_limit or 0) + grace
            wait = max(step.retry.longest_wait(), step.compensation_retry.longest_wait())
            longest = max(longest, int(limit), int(wait))
    return longest


def _visibility_timeout(config: Any) -> list[checks.CheckMessage]:
    options = config.broker_transport_options or {}
    timeout = float(options.get("visibility_timeout", REDIS_VISIBILITY_TIMEOUT))
    needed = longest_step()
    if timeout > needed:
        return []
    return [
        _warning(
            f"Redis's visibility_timeout ({timeout:g} s) is not longer than a step may take "
            f"({needed} s: its time limit and the hard kill's grace, or its retry countdown): "
            "Redis delivers such a step's message again while it still runs.",
            'Raise CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] above it '
            "(https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/"
            "redis.html#visibility-timeout).",
            "sagas.W004",
        )
    ]


def _serializers(config: Any) -> list[checks.CheckMessage]:
    accepted = {str(c).rsplit("/", 1)[-1] for c in (config.accept_content or ())}
    if accepted <= {"json"} and config.task_serializer == "json":
        return []
    return [
        _warning(
            f"Celery accepts {sorted(accepted)} and sends {config.task_serializer!r}: anything "
            "but JSON lets whoever can write to the broker run code in the workers, and the "
            "engine's messages are JSON.",
            'Set CELERY_ACCEPT_CONTENT = ["json"] and CELERY_TASK_SERIALIZER = "json" '
            "(https://docs.celeryq.dev/en/stable/userguide/security.html#serializers).",
            "sagas.W005",
        )
    ]


def _pool_warning(pool: str) -> checks.Warning:
    return _warning(
        f"The worker pool is {pool!r}: only the prefork pool kills a step that ignores its time "
        "limit, so a hung step would hold its saga and its worker for ever.",
        "Run workers with the prefork pool (Celery's default): leave CELERY_WORKER_POOL unset, "
        "and do not pass --pool.",
        "sagas.W007",
    )


def check_worker_pool(sender: Any = None, **kwargs: Any) -> None:
    """A worker started with another pool (`--pool threads`) says so in its log: the command
    line is out of the checks' sight (`celery.signals.worker_init`)."""
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if name and "prefork" not in name:
        warning = _pool_warning(name.rsplit(".", 1)[-1])
        logger.error("%s: %s %s", warning.id, warning.msg, warning.hint)
