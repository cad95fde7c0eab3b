"""Signed URLs that reach one wait of one saga: what a step hands to an external system (a
payment provider's webhook), which posts the event to it without credentials of ours.

A token is `django.core.signing`'s, with a salt of its own and a timestamp: it names the saga
and the wait's event, not the saga's epoch (a sweeper's re-send or an operator's retry does
not void a URL already handed out), and it expires `SAGAS_SIGNAL_URL_MAX_AGE` seconds after it
was made. Tokens signed with a key in `SECRET_KEY_FALLBACKS` are still taken, so a rotation of
`SECRET_KEY` voids none before its time.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.core import signing
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse

from . import conf

SALT = "sagas.signal-url"


class BadSignalToken(Exception):
    """The token is forged, tampered with or expired (`expired` says which)."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def signal_token(saga_id: UUID | str, event: str) -> str:
    """A token for the wait of `event` in the saga."""
    return signing.dumps({"s": str(saga_id), "e": event}, salt=SALT, compress=True)


def read_signal_token(token: str) -> tuple[str, str]:
    """The (saga id, event) a token names; `BadSignalToken` if it is not one of ours, or too
    old."""
    try:
        value: Any = signing.loads(token, salt=SALT, max_age=conf.signal_url_max_age())
    except signing.SignatureExpired as exc:
        raise BadSignalToken("This signal URL has expired.", expired=True) from exc
    except signing.BadSignature as exc:
        raise BadSignalToken("This signal URL is not valid.") from exc
    if not isinstance(value, dict) or not isinstance(value.get("s"), str):
        raise BadSignalToken("This signal URL is not valid.")
    if not isinstance(value.get("e"), str):
        raise BadSignalToken("This signal URL is not valid.")
    return value["s"], value["e"]


def signal_path(saga_id: UUID | str, event: str) -> str:
    """The path of the saga's signal URL for `event` (`sagas:signal-url`, in the project's
    URLconf)."""
    return reverse("sagas:signal-url", kwargs={"token": signal_token(saga_id, event)})


def signal_url(saga_id: UUID | str, event: str) -> str:
    """The absolute signal URL, on `SAGAS_BASE_URL` (a worker has no request to take it
    from)."""
    base = conf.base_url()
    if not base:
        raise ImproperlyConfigured(
            "SAGAS_BASE_URL is not set: an absolute signal URL needs the site's base URL, "
            'such as "https://shop.example.com"'
        )
    return base.rstrip("/") + signal_path(saga_id, event)
