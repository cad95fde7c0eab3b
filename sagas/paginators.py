"""A paginator for tables of millions of rows: it counts what it shows, not the whole table."""

from __future__ import annotations

from contextlib import suppress
from functools import cached_property
from typing import Any

from django.core.paginator import Paginator

from . import conf

LARGEST_LIMIT = 2**62


class BoundedPaginator(Paginator):
    """Django's `Paginator`, but `count` stops `SAGAS_LIST_COUNT_LIMIT` rows past the page
    asked for (`reach`): counting a list of a million sagas reads a million index entries,
    counting this far reads a few thousand. When more rows match, `count` is that bound and
    `bounded` is true: every page up to it, and the one after, can be reached.
    """

    def __init__(self, object_list: Any, per_page: int | str, *, reach: int = 1, **kwargs: Any):
        super().__init__(object_list, per_page, **kwargs)
        self.reach = max(1, reach)
        self.bounded = False

    def validate_number(self, number: Any) -> int:
        # DRF asks for a page without saying which first: the number it asks for is the reach.
        if "count" not in self.__dict__:
            with suppress(TypeError, ValueError):
                self.reach = max(self.reach, int(number))
        return super().validate_number(number)

    @cached_property
    def count(self) -> int:
        # (A page number past any table's size must not overflow PostgreSQL's LIMIT.)
        limit = min(self.reach * self.per_page + conf.list_count_limit(), LARGEST_LIMIT)
        rows: Any = self.object_list
        if hasattr(rows, "order_by"):  # a queryset: a count of a LIMIT, in the database
            rows = rows.order_by()
        counted = (
            len(rows[: limit + 1]) if isinstance(rows, list | tuple) else rows[: limit + 1].count()
        )
        self.bounded = counted > limit
        return min(counted, limit)
