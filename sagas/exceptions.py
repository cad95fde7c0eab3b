"""Exceptions that step actions raise to tell the engine what went wrong."""

from __future__ import annotations


class SagaError(Exception):
    """Base class of the framework's exceptions."""


class StepError(SagaError):
    """A failure whose code and message are safe to store and show to users.

    Subclasses set `code`; the message must not carry secrets or internal details.
    """

    code = "step_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BusinessError(StepError):
    """The action cannot succeed for this input (declined card, no stock): never retried."""

    code = "business_error"


class TransientError(StepError):
    """A passing fault (timeout, unavailable service): retried with backoff."""

    code = "transient_error"


class DefinitionError(SagaError):
    """A saga definition is invalid, or no definition has the given name."""


class CodeMissing(SagaError):
    """An import path stored for a saga (an action, a compensation, an `on_complete`, a
    transient exception class) does not import: a deploy renamed or removed it. The saga
    pauses for an operator, never compensates for it; map the old path to the new one with
    `SAGAS_RENAMED_CALLABLES`, or bring the code back, then retry."""

    code = "code_missing"

    def __init__(self, path: str, target: str | None = None) -> None:
        self.path, self.target = path, target or path
        moved = "" if self.target == path else f" (renamed to {self.target!r})"
        super().__init__(f"{path!r}{moved} does not import")
        # The safe message stored on the rows: what to look for, not the import error's text.
        self.message = (
            f"The code of {path}{moved} is missing: it was renamed or removed by a deploy. "
            "Bring it back or map its path (SAGAS_RENAMED_CALLABLES), then retry."
        )[:500]


class InvalidTransition(SagaError):
    """An operator action or a transition is not allowed in the saga's current state."""


class SagaBusy(InvalidTransition):
    """An operator action found the saga locked by a step in progress: try again shortly."""


class SagaKeyError(SagaError):
    """A saga's business key cannot be taken from its input: missing, empty or too long."""


class SagaKeyInFlight(SagaError):
    """A saga of the same definition and business key is in flight (or failed, waiting for an
    operator), and the definition allows one at a time (`one_in_flight_per_key`)."""

    def __init__(self, message: str, *, saga_id: object = None) -> None:
        super().__init__(message)
        self.saga_id = saga_id  # the saga in flight, if it was found


class BulkActionRefused(SagaError):
    """A bulk action's filter matches no saga, or more than one bulk action may take."""


class BulkPreviewOutdated(BulkActionRefused):
    """A bulk action's filter no longer matches as many sagas as its preview showed."""


class SignalError(SagaError):
    """A signal cannot be sent: no saga is found for it, several are, or none of the saga's
    waits is for its event (`saga_signal`)."""
