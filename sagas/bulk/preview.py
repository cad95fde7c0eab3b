"""A bulk action's preview: how many sagas match its filter, and what it will do to them, in
groups of sagas with the same plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.contrib.postgres.aggregates import ArrayAgg

from .. import engine
from ..engine import Plan
from ..exceptions import BulkActionRefused
from ..models import BulkOperation, Saga
from .filters import BulkFilter
from .skip import BulkSkip

# Saga ids shown with each group, for an operator to look at.
SAMPLE = 5


@dataclass(frozen=True)
class PlanGroup:
    """Sagas of one definition for which the action has the same plan."""

    name: str
    plan: Plan
    count: int
    sample: tuple[UUID, ...]


@dataclass(frozen=True)
class BulkPreview:
    action: str
    count: int
    limit: int
    groups: tuple[PlanGroup, ...]

    @property
    def allowed(self) -> int:
        """Sagas the action will be taken on, if none changes before its batch reaches it."""
        return sum(group.count for group in self.groups if group.plan.allowed)


def too_many(limit: int) -> BulkActionRefused:
    return BulkActionRefused(
        f"More than {limit:,} sagas match this filter; a bulk action takes at most {limit:,} "
        "(SAGAS_BULK_MAX_SAGAS). Narrow the filter, for instance by time range."
    )


def matching_ids(bulk_filter: BulkFilter, limit: int) -> list[UUID]:
    """The ids of the sagas the filter matches, oldest first; refused beyond `limit`."""
    sagas = bulk_filter.sagas().order_by("created_at", "pk")
    ids = list(sagas.values_list("pk", flat=True)[: limit + 1])
    if len(ids) > limit:
        raise too_many(limit)
    return ids


def preview(
    *, action: str, bulk_filter: BulkFilter, limit: int, skip: BulkSkip | None = None
) -> BulkPreview:
    """What `action` would do to each saga the filter matches, from `saga_plan`, in groups;
    a skip (`action` "skip") marks the stage `skip` names, its output checked by each group.

    A plan depends only on the saga's status and direction and its steps' names, statuses and
    definitions: sagas alike in these (read in one query) share one, made for the first of
    them. Plans are made without the saga's lock, so a preview never waits for a running
    step; when the batch reaches a saga, the action's own plan, under the lock, decides.
    """
    skip = checked_skip(action, skip)
    shapes: dict[tuple[Any, ...], list[UUID]] = {}
    for saga_id, name, *shape in _shapes(bulk_filter, limit):
        shapes.setdefault((name, *shape), []).append(saga_id)
    groups: dict[tuple[str, Plan], list[UUID]] = {}
    for (name, *shape), ids in shapes.items():
        try:
            if skip is not None:
                plan = skip.plan(ids[0], shape[STEP_NAMES])
            else:
                plan = engine.plan(ids[0], action, locked=False)
        except Saga.DoesNotExist:  # deleted since: its batch will skip it
            plan = Plan(action, False, "The saga no longer exists.")
        groups.setdefault((name, plan), []).extend(ids)
    ordered = sorted(groups.items(), key=lambda item: (not item[0][1].allowed, -len(item[1])))
    return BulkPreview(
        action=action,
        count=sum(len(ids) for ids in shapes.values()),
        limit=limit,
        groups=tuple(
            PlanGroup(name=name, plan=plan, count=len(ids), sample=tuple(ids[:SAMPLE]))
            for (name, plan), ids in ordered
        ),
    )


def checked_skip(action: str, skip: BulkSkip | None) -> BulkSkip | None:
    """A skip's stage and output, required with the action "skip" and refused with another
    (`BulkActionRefused`)."""
    if action != BulkOperation.SKIP:
        if skip is not None:
            raise BulkActionRefused(f"A stage and an output are a skip's, not a {action}'s.")
        return None
    if skip is None:
        raise BulkActionRefused("Name the stage to mark as done.")
    if problems := skip.problems():
        raise BulkActionRefused(" ".join(f"{field}: {text}" for field, text in problems.items()))
    return skip


# Where a shape (`_shapes`, after the saga's id and name) has its stages' names.
STEP_NAMES = 3


def _shapes(bulk_filter: BulkFilter, limit: int) -> list[tuple[Any, ...]]:
    """(id, name, status, direction, definition version, step names, step statuses) of each
    matching saga, newest first. A saga without a definition version (one made by hand)
    is a shape of its own: its steps' definitions may differ from another's of its name."""
    rows = list(
        bulk_filter.sagas()
        .order_by("-created_at", "pk")
        .annotate(
            step_names=ArrayAgg("steps__name", order_by="steps__index"),
            step_statuses=ArrayAgg("steps__status", order_by="steps__index"),
        )
        .values_list(
            "pk",
            "name",
            "status",
            "direction",
            "definition_version",
            "step_names",
            "step_statuses",
        )[: limit + 1]
    )
    if len(rows) > limit:
        raise too_many(limit)
    return [
        (pk, name, status, direction, version or pk, tuple(names), tuple(statuses))
        for pk, name, status, direction, version, names, statuses in rows
    ]
