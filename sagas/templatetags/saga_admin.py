"""Template tags of the saga admin: the list's date drill-down, read through an index; the
breadcrumbs' markup of the running Django."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import django
from django import template
from django.contrib.admin.templatetags.admin_list import date_hierarchy, date_hierarchy_tag
from django.db.models import Max, Min
from django.utils import timezone

register = template.Library()


# Whether the running Django's admin writes its breadcrumbs as a list (`<ol class="breadcrumbs">`
# of `<li>`, from 6.1, whose stylesheet styles only that) rather than as a `<div
# class="breadcrumbs">` of links between `&rsaquo;` (up to 6.0).
BREADCRUMBS_AS_LIST = django.VERSION >= (6, 1)


@register.simple_tag
def breadcrumbs_as_list() -> bool:
    """`BREADCRUMBS_AS_LIST`, for admin/sagas/saga/breadcrumbs.html."""
    return BREADCRUMBS_AS_LIST


def _next(moment: datetime, kind: str) -> datetime:
    """The start of the period after the one that starts at `moment`."""
    if kind == "day":
        return timezone.make_aware(moment.replace(tzinfo=None) + timedelta(days=1))
    if kind == "month":
        year, month = divmod(moment.month, 12)
        return moment.replace(year=moment.year + year, month=month + 1)
    return moment.replace(year=moment.year + 1)


def _start(moment: datetime, kind: str) -> datetime:
    moment = timezone.localtime(moment).replace(hour=0, minute=0, second=0, microsecond=0)
    if kind in ("month", "year"):
        moment = moment.replace(day=1)
    if kind == "year":
        moment = moment.replace(month=1)
    return timezone.make_aware(moment.replace(tzinfo=None))


class ProbedDates:
    """The list's queryset as the date drill-down reads it, but the years, months or days that
    hold sagas are found by probing each (the first and last by the index, then one `EXISTS` a
    period, at most 31), not by `SELECT DISTINCT date_trunc(...)` over every row in the range:
    on a table of millions of sagas that read them all at every page view."""

    def __init__(self, queryset: Any) -> None:
        self.queryset = queryset

    def aggregate(self, *args: Any, **kwargs: Any) -> Any:
        return self.queryset.aggregate(*args, **kwargs)

    def datetimes(self, field: str, kind: str, **kwargs: Any) -> list[datetime]:
        bounds = self.queryset.order_by().aggregate(first=Min(field), last=Max(field))
        if bounds["first"] is None:
            return []
        found: list[datetime] = []
        period = _start(bounds["first"], kind)
        while period <= bounds["last"]:
            end = _next(period, kind)
            if self.queryset.filter(**{f"{field}__gte": period, f"{field}__lt": end}).exists():
                found.append(period)
            period = end
        return found

    dates = datetimes


class ChangeListProbingDates:
    """A change list whose queryset is read through `ProbedDates`."""

    def __init__(self, changelist: Any) -> None:
        self._changelist = changelist
        self.queryset = ProbedDates(changelist.queryset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._changelist, name)


def saga_date_hierarchy(changelist: Any) -> Any:
    probing: Any = ChangeListProbingDates(changelist)
    return date_hierarchy(probing)


@register.tag(name="saga_date_hierarchy")
def saga_date_hierarchy_tag(parser: Any, token: Any) -> Any:
    # Django's own tag (its template, overridable per model), with the probing function: the
    # node's constructor differs between Django versions, the node's `func` does not.
    node = date_hierarchy_tag(parser, token)
    node.func = saga_date_hierarchy
    return node
