"""The framework's settings, read from Django settings with defaults."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings


def hard_time_limit_grace() -> int:
    """Seconds between a step's soft time limit (raised in the action) and the hard kill."""
    return int(getattr(settings, "SAGAS_HARD_TIME_LIMIT_GRACE", 10))


def recovery_stale_after() -> timedelta:
    """A saga in flight with no progress for this long is re-dispatched by the sweeper.

    Keep it above the longest retry countdown of any step, or the sweeper re-sends a step
    that is only waiting for its retry (harmless, but noisy).
    """
    return timedelta(seconds=float(getattr(settings, "SAGAS_RECOVERY_STALE_AFTER", 300)))


def recovery_max_attempts() -> int:
    """After this many recoveries a saga goes to `failed` for an operator (dead letter)."""
    return int(getattr(settings, "SAGAS_RECOVERY_MAX_ATTEMPTS", 5))
