"""The sagas of an object, on the object's own admin page: found by the sagas' business key.

A project adds them to the admin of the model that its sagas are about, in one line:

    class OrderAdmin(admin.ModelAdmin):
        sagas = sagas_of_object()  # a saga's key is the order's id
        readonly_fields = ("sagas",)  # (and in `fields`, if the admin lists them)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from ..models import Saga
from .display import EMPTY, timestamp

Key = str | Callable[[Any], Any] | None


def object_key(obj: Any, key: Key) -> str | None:
    """The business key that the sagas of `obj` carry: its primary key by default, else an
    attribute of it (dotted) or a function of it."""
    if key is None:
        value = obj.pk
    elif callable(key):
        value = key(obj)
    else:
        value = obj
        for part in key.split("."):
            value = getattr(value, part, None)
    return None if value is None else str(value)


def sagas_of_object(
    *, key: Key = None, name: str | None = None, description: str = "sagas", shown: int = 5
) -> Callable[[Any, Any], SafeString | str]:
    """A read-only field for a model admin: the latest `shown` sagas whose key is the
    object's (of the definition `name`, or of any), each linked to its page, and a link to
    all of them in the saga list.

    `key` reads the object's key: None for its primary key, an attribute path
    (`"order.number"`) or a function of the object.
    """

    @admin.display(description=description)
    def sagas(model_admin: Any, obj: Any) -> SafeString | str:
        value = object_key(obj, key) if obj is not None and obj.pk is not None else None
        if value is None:
            return EMPTY
        found = Saga.objects.filter(business_key=value)
        if name is not None:
            found = found.filter(name=name)
        latest = list(found.order_by("-created_at")[:shown])
        if not latest:
            return EMPTY
        return format_html(
            '<ul class="saga-links">{}</ul><a href="{}">All sagas of the key {}</a>',
            format_html_join(
                "",
                # Plain text: the saga admin's styles are not on the object's page.
                '<li><a href="{}">{}</a>: {}, started {}</li>',
                (
                    (
                        reverse("admin:sagas_saga_change", args=[saga.pk]),
                        saga.name,
                        saga.get_status_display(),
                        timestamp(saga.created_at),
                    )
                    for saga in latest
                ),
            ),
            _changelist(value, name),
            value,
        )

    return sagas


def _changelist(key: str, name: str | None) -> str:
    query = {"business_key": key, **({"name": name} if name is not None else {})}
    return f"{reverse('admin:sagas_saga_changelist')}?{urlencode(query)}"
