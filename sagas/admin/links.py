"""Links from a saga's admin page to the domain objects of the saga.

The project names a function in the `SAGAS_ADMIN_LINKS` setting that gives them: this app never
imports a domain app.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from .. import conf
from ..models import Saga


def admin_links(saga: Saga) -> list[tuple[str, str]]:
    """(label, url) pairs for the domain objects of a saga, from the `SAGAS_ADMIN_LINKS` hook."""
    hook = conf.admin_links_hook()
    return list(hook(saga)) if hook is not None else []


def link_list(links: Iterable[tuple[str, str]]) -> SafeString:
    """(label, url) pairs as a list of links."""
    return format_html(
        '<ul class="saga-links">{}</ul>',
        format_html_join("", '<li><a href="{}">{}</a></li>', ((u, t) for t, u in links)),
    )
