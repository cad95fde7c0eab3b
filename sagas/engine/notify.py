"""What the engine did, told after its transaction commits: to signals, metrics and traces.

The engine records every transition as an event (`sagas.engine.unit.Unit.event`). When it
writes them, it hands the events that someone wants here, and they leave in one
`transaction.on_commit` callback: never for a change that rolled back, and not at all when
no one wants any of them (a step's hot path then pays a look at its one or two events).

Who wants what: the signals of `sagas.signals` want the kinds they announce, while a receiver
is connected; observers (`sagas.metrics`, `sagas.tracing`, turned on by their settings) want
the kinds they declare. Traces also need a span while an attempt runs, so that what its action
does nests in it: that is the `tracer`. A leaf module: the engine imports it, and it imports
only the signals and the models.

Signals are sent at least once (the outbox pattern): a transition whose events have a receiver
writes a `SagaNotice` in its transaction, deleted here once they are sent; what a crash or a
lost COMMIT answer left unsent, the relay sends (`sagas.engine.relay`). Observers (metrics,
traces) are told in-process only: a process that dies between a commit and its callbacks
loses their counts and spans of that transition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from django.db import DatabaseError, connection, transaction

from .. import signals
from ..models import SagaNotice

logger = logging.getLogger("sagas")


class Event(Protocol):
    """An event as the engine wrote it (`sagas.engine.rows.EventRow`)."""

    @property
    def step_index(self) -> int | None: ...
    @property
    def step_name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def detail(self) -> dict[str, Any]: ...
    @property
    def created_at(self) -> Any: ...


class Observer(Protocol):
    """Told of committed events of the `kinds` it wants, in the process that committed them."""

    kinds: frozenset[str]

    def committed(self, saga: Any, events: Sequence[Event]) -> None:
        """`saga` is the saga's row as the transaction wrote it (id, name, status, error_code,
        error_message, created_at, ...)."""

    def swept(self, seconds: float, recovered: int, dead_lettered: int) -> None:
        """A sweep of the recovery sweeper ended (`sagas.engine.sweeper.sweep`)."""

    def signal_received(self, saga: Any, *, refused: bool) -> None:
        """A signal for `saga` was stored (`sagas.engine.waits.signal`; not a repeat of an
        idempotency key). `refused`: refused as it came without the saga's lock (a step held
        it), so that no `signal_refused` event tells of it."""


class Tracer(Protocol):
    """Spans of a saga and of its attempts while they run (`sagas.tracing`)."""

    def begin_saga(self, saga: Any) -> str:
        """Start the saga's span; return its context to store on the saga's row."""

    def attempt(self, saga: Any, step: Any, *, compensation: bool) -> AbstractContextManager[Any]:
        """The span of an attempt of a step's action (or compensation), current while it runs."""


observers: list[Observer] = []
_observed: frozenset[str] = frozenset()
# Set by `sagas.tracing.install()`; None: no span, and the engine pays one attribute read.
tracer: Tracer | None = None


def add_observer(observer: Observer) -> None:
    global _observed
    if observer not in observers:
        observers.append(observer)
    _observed = frozenset().union(*(o.kinds for o in observers))


def remove_observer(observer: Observer) -> None:
    global _observed
    if observer in observers:
        observers.remove(observer)
    _observed = frozenset().union(*(o.kinds for o in observers))


def wanted(events: Iterable[Event]) -> list[Event]:
    """The events that someone wants to hear of: observed, or announced to a receiver."""
    observed, announced = _observed, signals.BY_KIND
    return [
        e
        for e in events
        if e.kind in observed or (e.kind in announced and announced[e.kind].receivers)
    ]


def signalled(events: Iterable[Event]) -> bool:
    """Whether a signal with a receiver announces one of `events`: then their transaction
    writes a `SagaNotice`, for the relay to send them if this process never does."""
    announced = signals.BY_KIND
    return any(e.kind in announced and announced[e.kind].receivers for e in events)


def on_commit(
    saga: Any, events: Sequence[Event], *, ids: Sequence[int] = (), notice: int = 0
) -> None:
    """Tell of `events` once the current transaction commits; nothing if no one wants them.
    `ids`: the events' ids, in order (the `event_id` their signals send); `notice`: the
    `SagaNotice` written with them, deleted once they are told."""
    numbered = {id(e): i for e, i in zip(events, ids, strict=False)}
    told = wanted(events)
    if told:
        told_ids = [numbered.get(id(e)) for e in told]

        # A function, not a `partial`: Django logs a robust callback's failure by its
        # `__qualname__`, which a partial has not (Django ticket #36487).
        def tell() -> None:
            committed(saga, told, told_ids, notice)

        transaction.on_commit(tell, robust=True)


def committed(
    saga: Any, events: Sequence[Event], ids: Sequence[int | None] = (), notice: int = 0
) -> None:
    """The events are committed: send the signals, then tell the observers. A receiver's or an
    observer's error is logged, never raised: the change is done, and the engine goes on.
    Then the notice of the signals is deleted: they are sent."""
    signals.announce(saga, events, ids)
    for observer in list(observers):
        mine = [e for e in events if e.kind in observer.kinds]
        if not mine:
            continue
        try:
            observer.committed(saga, mine)
        except Exception:
            logger.exception("sagas: observer %r failed on saga %s", observer, saga.id)
    if notice:
        sent(notice)


def sent(notice: int) -> None:
    """Delete a `SagaNotice` whose signals are sent. If that fails, the relay sends them
    again: at least once."""
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {SagaNotice._meta.db_table} WHERE id = %s", [notice])
    except DatabaseError:
        logger.warning("sagas: notice %s sent, but not deleted: the relay sends it again", notice)


def signal_received(saga: Any, *, refused: bool = False) -> None:
    """Tell the observers of a signal stored for `saga` once the current transaction commits
    (`Observer.signal_received`)."""
    if observers:

        def tell_received() -> None:  # a function, not a partial (see `on_commit`)
            _received(saga, refused)

        transaction.on_commit(tell_received, robust=True)


def _received(saga: Any, refused: bool) -> None:
    for observer in list(observers):
        try:
            observer.signal_received(saga, refused=refused)
        except Exception:
            logger.exception("sagas: observer %r failed on a signal of saga %s", observer, saga.pk)


def swept(seconds: float, recovered: int, dead_lettered: int) -> None:
    for observer in list(observers):
        try:
            observer.swept(seconds, recovered, dead_lettered)
        except Exception:
            logger.exception("sagas: observer %r failed after a sweep", observer)
