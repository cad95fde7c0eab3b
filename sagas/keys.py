"""One saga in flight per key, turned on for sagas already in flight.

The partial unique index `saga_one_in_flight_per_key` covers the unfinished sagas whose row
says `one_in_flight_per_key` (copied from their definition when they start). A deploy that
turns the option on leaves the sagas then in flight outside it: a second saga for one of their
keys could start and do the work twice. `outside_the_index` finds them (`sagas.W009`), and
`bring_under_the_index` (`manage.py sagas_one_in_flight`) brings them in, but for keys that
already have more than one saga in flight, which an operator settles first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import Count, QuerySet
from django.db.models.expressions import RawSQL

from .models import FINAL_STATUSES, Saga, SagaStatus

UNFINISHED = [s for s in SagaStatus.values if s not in FINAL_STATUSES]


def outside_the_index(name: str) -> QuerySet[Saga]:
    """Unfinished sagas of definition `name`, with a key, that the unique index leaves out."""
    return (
        Saga.objects.filter(name=name, status__in=UNFINISHED, business_key__isnull=False)
        .exclude(options__contains={"one_in_flight_per_key": True})
        .order_by()
    )


@dataclass
class Report:
    brought: int = 0
    # Keys with more than one unfinished saga: the sagas' ids, oldest first.
    crowded: dict[str, list[str]] = field(default_factory=dict)


def bring_under_the_index(name: str, *, dry_run: bool = False) -> Report:
    """Mark the unfinished sagas of `name` as one in flight per key, but those of keys with
    more than one unfinished saga (reported). In one transaction; a saga started meanwhile
    for one of their keys makes it fail with IntegrityError (run it again)."""
    report = Report()
    unfinished = Saga.objects.filter(name=name, status__in=UNFINISHED, business_key__isnull=False)
    crowded = (
        unfinished.values("business_key")
        .annotate(count=Count("id"))
        .filter(count__gt=1)
        .values_list("business_key", flat=True)
    )
    for key in crowded.order_by("business_key"):
        ids = (
            unfinished.filter(business_key=key).order_by("created_at").values_list("pk", flat=True)
        )
        report.crowded[str(key)] = [str(pk) for pk in ids]
    outside = outside_the_index(name).exclude(business_key__in=list(report.crowded))
    if dry_run:
        report.brought = outside.count()
        return report
    with transaction.atomic():
        report.brought = outside.update(
            options=RawSQL("options || %s::jsonb", ['{"one_in_flight_per_key": true}'])
        )
    return report
