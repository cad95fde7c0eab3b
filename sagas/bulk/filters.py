"""Which sagas a bulk action takes: a filter of their status, definition, error, step and times."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from django.db.models import Exists, OuterRef, QuerySet
from django.utils.dateparse import parse_datetime

from ..models import Saga, SagaStatus, SagaStep

# The saga column that holds a business key (an order number, a customer reference), where
# sagas have one: the filter takes it as soon as the model has it, and refuses it before.
BUSINESS_KEY = "business_key"

TIMES = ("created_from", "created_before", "updated_from", "updated_before")


def sagas_have_business_key() -> bool:
    return any(field.name == BUSINESS_KEY for field in Saga._meta.get_fields())


@dataclass(frozen=True)
class BulkFilter:
    """Every field given must match; an empty filter matches every saga.

    `failed_step` is the name of the step a saga stopped at: the one that failed (or whose
    compensation did), or the one in progress. Times are ranges: `*_from` inclusive,
    `*_before` exclusive.
    """

    status: str = ""
    name: str = ""
    error_code: str = ""
    failed_step: str = ""
    created_from: datetime | None = None
    created_before: datetime | None = None
    updated_from: datetime | None = None
    updated_before: datetime | None = None
    business_key: str = ""

    def sagas(self) -> QuerySet[Saga]:
        lookups = {
            "status": self.status,
            "name": self.name,
            "error_code": self.error_code,
            "created_at__gte": self.created_from,
            "created_at__lt": self.created_before,
            "updated_at__gte": self.updated_from,
            "updated_at__lt": self.updated_before,
            BUSINESS_KEY: self.business_key,
        }
        sagas = Saga.objects.filter(**{k: v for k, v in lookups.items() if v not in ("", None)})
        if self.failed_step:
            stopped_at = SagaStep.objects.filter(
                saga=OuterRef("pk"), index=OuterRef("current_step"), name=self.failed_step
            )
            sagas = sagas.filter(Exists(stopped_at))
        return sagas

    def problems(self) -> dict[str, str]:
        """Why the filter cannot be used, by field: the API's and the admin's field errors."""
        problems = {}
        if self.status and self.status not in SagaStatus.values:
            problems["status"] = f"Not a saga status: {self.status}."
        for start, end in (TIMES[:2], TIMES[2:]):
            first, last = getattr(self, start), getattr(self, end)
            if first is not None and last is not None and first >= last:
                problems[end] = f"Must be later than {start}."
        if self.business_key and not sagas_have_business_key():
            problems[BUSINESS_KEY] = "This project's sagas have no business key."
        return problems

    def as_json(self) -> dict[str, str]:
        """The fields given, times in ISO 8601: what a bulk action records."""
        given = {field.name: getattr(self, field.name) for field in fields(self)}
        return {
            name: value.isoformat() if isinstance(value, datetime) else value
            for name, value in given.items()
            if value not in ("", None)
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BulkFilter:
        values: dict[str, Any] = {
            name: parse_datetime(value) if name in TIMES else value for name, value in data.items()
        }
        return cls(**values)

    def describe(self) -> str:
        """In one line: `status failed · name order_fulfilment · created from 2026-11-26 ...`."""
        parts = [f"{name.replace('_', ' ')} {value}" for name, value in self.as_json().items()]
        return " · ".join(parts) or "every saga"
