"""The framework's settings: every `SAGAS_*` Django setting is read here, with its default.

Each is read when it is used, not at import, so a changed setting (a test's override) applies.
The docs list them in `docs/reference/settings.md` ("Settings of the framework").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .durations import parse_duration


def hard_time_limit_grace() -> int:
    """`SAGAS_HARD_TIME_LIMIT_GRACE`, default 10: seconds between a step's soft time limit
    (raised in the action) and the hard kill of a process that ignores it."""
    return int(getattr(settings, "SAGAS_HARD_TIME_LIMIT_GRACE", 10))


def recovery_stale_after() -> timedelta:
    """`SAGAS_RECOVERY_STALE_AFTER`, default 300 (seconds): a saga in flight with no progress
    for this long is re-dispatched by the sweeper.

    Keep it above the longest retry countdown of any step, or the sweeper re-sends a step
    that is only waiting for its retry (harmless, but noisy).
    """
    return timedelta(seconds=float(getattr(settings, "SAGAS_RECOVERY_STALE_AFTER", 300)))


def relay_after() -> timedelta:
    """`SAGAS_RELAY_AFTER`, default 30 (seconds): a transition's signals still unsent this
    long after its commit (its process died, or the COMMIT's answer was lost) are sent by the
    next sweep (`sagas.engine.relay`)."""
    return timedelta(seconds=float(getattr(settings, "SAGAS_RELAY_AFTER", 30)))


def signal_url_max_age() -> int:
    """`SAGAS_SIGNAL_URL_MAX_AGE`, default 2,592,000 (30 days): seconds a signed signal URL
    (`ctx.signal_url(...)`) is taken after it was made."""
    return int(getattr(settings, "SAGAS_SIGNAL_URL_MAX_AGE", 30 * 86400))


def approval_link_max_age() -> int:
    """`SAGAS_APPROVAL_LINK_MAX_AGE`, default 604,800 (7 days): seconds an approver's signed
    link (`ctx.approval_url(...)`) is taken after it was made."""
    return int(getattr(settings, "SAGAS_APPROVAL_LINK_MAX_AGE", 7 * 86400))


def approval_link_sign_in() -> bool:
    """`SAGAS_APPROVAL_LINK_SIGN_IN`, default True: whoever opens an approver's link must sign
    in, as a user with `sagas.approve_saga`, to decide. False: the link alone is the
    credential (whoever holds it decides, recorded as the approver it was made for)."""
    return bool(getattr(settings, "SAGAS_APPROVAL_LINK_SIGN_IN", True))


def base_url() -> str:
    """`SAGAS_BASE_URL`, default "" (none): the site's base URL, such as
    "https://shop.example.com", for the absolute signal URLs a step makes."""
    return str(getattr(settings, "SAGAS_BASE_URL", "") or "")


def recovery_max_attempts() -> int:
    """`SAGAS_RECOVERY_MAX_ATTEMPTS`, default 5: after this many recoveries in a row without
    progress a saga goes to `failed` for an operator (dead letter)."""
    return int(getattr(settings, "SAGAS_RECOVERY_MAX_ATTEMPTS", 5))


def modules() -> tuple[str, ...]:
    """`SAGAS_MODULES`, default none: modules that register saga definitions, imported when
    the app is ready in every process (web, worker, beat), so that a worker can run any saga
    a web process starts."""
    return tuple(getattr(settings, "SAGAS_MODULES", ()))


def admin_links_hook() -> Callable[[Any], Iterable[tuple[str, str]]] | None:
    """`SAGAS_ADMIN_LINKS`, default none: the import path of a function that takes a saga and
    gives (label, url) pairs, the links from the saga's admin page to its domain objects.
    Without it the page has no "Related objects" section."""
    path = getattr(settings, "SAGAS_ADMIN_LINKS", None)
    return import_string(path) if path else None


def list_count_limit() -> int:
    """Rows a list (the admin's saga list, the API's lists) counts past the page it shows;
    past them it says "more than" (`sagas.paginators.BoundedPaginator`)."""
    return int(getattr(settings, "SAGAS_LIST_COUNT_LIMIT", 1000))


def admin_search_fields() -> tuple[str, ...]:
    """`SAGAS_ADMIN_SEARCH_FIELDS`, default none: lookups of a saga that the admin's search
    looks in besides the saga's id and name, such as `input__order_id` (a key of the saga's
    input). Business data differs from saga to saga: the project names what to search."""
    return tuple(getattr(settings, "SAGAS_ADMIN_SEARCH_FIELDS", ()))


def retention() -> timedelta | None:
    """`SAGAS_RETENTION`, default None (off): how long a finished saga (completed or
    compensated) is kept before the `sagas.purge` task deletes it with its steps and events.
    A duration such as `"30d"`, a number of seconds, or a `timedelta`."""
    value = getattr(settings, "SAGAS_RETENTION", None)
    if value is None or isinstance(value, timedelta):
        return value
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value <= 0:
                raise ValueError("it must be more than 0")
            return timedelta(seconds=value)
        return parse_duration(str(value))
    except ValueError as exc:
        raise ImproperlyConfigured(f"SAGAS_RETENTION = {value!r}: {exc}") from None


def metrics() -> bool:
    """`SAGAS_METRICS`, default False: count what the engine does for Prometheus
    (`sagas.metrics`; needs the `metrics` extra, prometheus-client)."""
    return bool(getattr(settings, "SAGAS_METRICS", False))


def metrics_worker_port() -> int | None:
    """`SAGAS_METRICS_WORKER_PORT`, default none: with metrics on, a Celery worker's main
    process serves its processes' metrics on this port (`/metrics`); none, no server."""
    port = getattr(settings, "SAGAS_METRICS_WORKER_PORT", None)
    return int(port) if port not in (None, "") else None


def metrics_worker_address() -> str:
    """`SAGAS_METRICS_WORKER_ADDRESS`, default "0.0.0.0": the address the worker's metrics
    server listens on."""
    return str(getattr(settings, "SAGAS_METRICS_WORKER_ADDRESS", "0.0.0.0"))


def metrics_token() -> str:
    """`SAGAS_METRICS_TOKEN`, default none: a scraper of the web process's `/metrics` view must
    send `Authorization: Bearer <token>`; without one the view answers anyone who reaches it."""
    return str(getattr(settings, "SAGAS_METRICS_TOKEN", "") or "")


def tracing() -> bool:
    """`SAGAS_TRACING`, default False: a span per saga, step and compensation attempt through
    OpenTelemetry's API (`sagas.tracing`; needs the `tracing` extra)."""
    return bool(getattr(settings, "SAGAS_TRACING", False))


def bulk_max_sagas() -> int:
    """`SAGAS_BULK_MAX_SAGAS`, default 10000: the most sagas one bulk action (retry or
    compensate every saga matching a filter) may take. A filter that matches more is refused
    with a message to narrow it: one action on a whole table is more likely a mistake than an
    intent, and its preview and snapshot must fit one request."""
    return int(getattr(settings, "SAGAS_BULK_MAX_SAGAS", 10_000))


def bulk_batch_size() -> int:
    """`SAGAS_BULK_BATCH_SIZE`, default 100: sagas a bulk action's task acts on per message
    before it sends the next one, so that a bulk action never holds a worker process for long
    and the sagas' own steps get their turn between its batches. A saga whose step is running
    holds its batch up to 5 s before it is skipped: keep a batch's worst case (100 busy sagas,
    500 s) within the Celery task time limit (the reference project's is 15 min)."""
    return int(getattr(settings, "SAGAS_BULK_BATCH_SIZE", 100))


def renamed_callables() -> dict[str, str]:
    """`SAGAS_RENAMED_CALLABLES`, default none: old import paths of step actions,
    compensations, `on_complete` functions and transient exception classes, mapped to their new
    ones (`{"shop.steps.book_hotel": "shop.booking.reserve_hotel"}`). Sagas store the paths
    they started with: after a deploy that renames or moves one, the engine imports it under
    its new path, and sagas in flight carry on with no change to their rows."""
    value = getattr(settings, "SAGAS_RENAMED_CALLABLES", None) or {}
    if not isinstance(value, dict) or not all(
        isinstance(old, str) and isinstance(new, str) for old, new in value.items()
    ):
        raise ImproperlyConfigured(
            "SAGAS_RENAMED_CALLABLES must map old import paths (strings) to new ones"
        )
    return value


def on_unexpected_error() -> str:
    """`SAGAS_ON_UNEXPECTED_ERROR`, default "pause": what an exception that a step did not
    declare does, where neither the step nor its definition says (`Step.on_unexpected_error`):
    "pause" the saga for an operator, "compensate" it, or "retry" the step as transient."""
    value = getattr(settings, "SAGAS_ON_UNEXPECTED_ERROR", None) or "pause"
    if value not in ("pause", "compensate", "retry"):
        raise ImproperlyConfigured(
            f"SAGAS_ON_UNEXPECTED_ERROR = {value!r}: it must be pause, compensate or retry"
        )
    return str(value)


def shown_exceptions() -> tuple[str, ...]:
    """`SAGAS_SHOWN_EXCEPTIONS`, default none: import paths of exception classes whose message
    is safe to show staff (no secret, no personal data in it). A step's unexpected error of
    such a class (or a subclass) keeps its message, cut to 500 characters, in the timeline of
    the admin; any other keeps only its class. API clients never see either."""
    return tuple(getattr(settings, "SAGAS_SHOWN_EXCEPTIONS", ()))


def _duration_setting(name: str, default: float) -> timedelta:
    """A setting of a duration: seconds (0 for none), a duration such as `"24h"`, or a
    `timedelta`."""
    value = getattr(settings, name, default)
    if isinstance(value, timedelta):
        return value
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value < 0:
                raise ValueError("it must not be negative")
            return timedelta(seconds=value)
        return parse_duration(str(value))
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} = {value!r}: {exc}") from None


def reconcile_window() -> timedelta | None:
    """`SAGAS_RECONCILE_WINDOW`, default 86,400 seconds (a day; seconds, a duration such as
    `"24h"`, or a `timedelta`): how long after a saga finished the sweeper still runs its
    definition's reconciliation check. None or 0 turns the sweeper's checks off (an
    operator's still run)."""
    if getattr(settings, "SAGAS_RECONCILE_WINDOW", 86400) is None:
        return None
    return _duration_setting("SAGAS_RECONCILE_WINDOW", 86400) or None


def reconcile_after() -> timedelta:
    """`SAGAS_RECONCILE_AFTER`, default 60 seconds: how long after a saga finished its first
    check runs (what the outside world does late, it does within a while)."""
    return _duration_setting("SAGAS_RECONCILE_AFTER", 60)


def reconcile_every() -> timedelta:
    """`SAGAS_RECONCILE_EVERY`, default 3,600 seconds: how often a saga's check runs again while
    it is in the window (a discrepant one too, until it agrees)."""
    return _duration_setting("SAGAS_RECONCILE_EVERY", 3600)


def reconcile_budget() -> timedelta:
    """`SAGAS_RECONCILE_BUDGET`, default 0.5 seconds: how long one sweep spends on checks at
    most (it begins none past it; the rest wait for the next sweep), so that a slow check keeps
    no sweep long."""
    return _duration_setting("SAGAS_RECONCILE_BUDGET", 0.5)


def reconcile_batch_size() -> int:
    """`SAGAS_RECONCILE_BATCH`, default 200: the most sagas one sweep checks (with the sweep's
    schedule, the pace of the checks)."""
    value = getattr(settings, "SAGAS_RECONCILE_BATCH", 200)
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ImproperlyConfigured(f"SAGAS_RECONCILE_BATCH = {value!r}: a whole number above 0")
    return size
