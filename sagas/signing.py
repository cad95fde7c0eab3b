"""Signed URLs that reach one wait of one saga: what a step hands to an external system (a
payment provider's webhook), which posts the event to it without credentials of ours; and an
approver's link to one approval of one saga (`approval_url`), which opens a page where they
approve or reject it.

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
APPROVAL_SALT = "sagas.approval-link"


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
    return _absolute(signal_path(saga_id, event))


def _absolute(path: str) -> str:
    base = conf.base_url()
    if not base:
        raise ImproperlyConfigured(
            "SAGAS_BASE_URL is not set: an absolute signed URL needs the site's base URL, "
            'such as "https://shop.example.com"'
        )
    return base.rstrip("/") + path


def approval_token(saga_id: UUID | str, stage: str, approver: str = "") -> str:
    """A token for the approval `stage` of the saga, made for `approver` (a name or an
    address, recorded as who decided when the link alone is the credential)."""
    value = {"s": str(saga_id), "a": stage, "u": approver}
    return signing.dumps(value, salt=APPROVAL_SALT, compress=True)


def read_approval_token(token: str) -> tuple[str, str, str]:
    """The (saga id, approval, approver) a link's token names; `BadSignalToken` if it is not
    one of ours, or older than `SAGAS_APPROVAL_LINK_MAX_AGE`."""
    try:
        value: Any = signing.loads(token, salt=APPROVAL_SALT, max_age=conf.approval_link_max_age())
    except signing.SignatureExpired as exc:
        raise BadSignalToken("This approval link has expired.", expired=True) from exc
    except signing.BadSignature as exc:
        raise BadSignalToken("This approval link is not valid.") from exc
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in "sau"):
        raise BadSignalToken("This approval link is not valid.")
    return value["s"], value["a"], value["u"]


def approval_url(saga_id: UUID | str, stage: str, approver: str = "") -> str:
    """The absolute link to the approver's page of the approval `stage`, on `SAGAS_BASE_URL`:
    opening it (GET) shows the saga and the decision's consequences and changes nothing; only
    the page's form (a POST, with its CSRF token) approves or rejects."""
    path = reverse(
        "sagas:approval-link", kwargs={"token": approval_token(saga_id, stage, approver)}
    )
    return _absolute(path)
