"""The stages' definitions are the same for every saga started from the same definition: they
are stored once per version (`sagas.models.DefinitionVersion`), which the saga row names by its
digest (`definition_version`), and a process reads and parses each version once. A saga whose
version is not stored (one started before they were, or made by hand) has them in its rows."""

from __future__ import annotations

from functools import cache
from typing import Any

from django.db import connection

from ...definitions import RetryPolicy
from ...models import DefinitionVersion, SagaStep, version_steps
from .objects import SagaRow


class Definition(dict[str, Any]):
    """A step's definition (the JSON in its row), with its retry policies parsed beside it."""

    __slots__ = ("policies",)

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.policies: dict[str, RetryPolicy] = {}


_definitions: dict[str, tuple[Definition, ...]] = {}


def definitions(saga: SagaRow) -> tuple[Definition, ...]:
    """The stage definitions the saga started with, read at most once per definition version
    and process: from the stored version, else from its stage rows (a saga made by hand,
    without a version: every time)."""
    version = saga.definition_version
    cached = _definitions.get(version) if version else None
    if cached is not None:
        return cached
    stored = version_steps(version) if version else None
    if stored is not None:
        loaded = tuple(Definition(step) for step in stored)
    else:
        with connection.cursor() as cursor:
            cursor.execute(_definitions_sql(), [saga.id])
            values = [value for (value,) in cursor.fetchall()]
        if any(value is None for value in values):
            raise DefinitionVersion.DoesNotExist(
                f"saga {saga.id}: no definition version {version!r}, nor definitions in its rows"
            )
        field = SagaStep._meta.get_field("stored_definition")
        loaded = tuple(
            Definition(field.from_db_value(value, None, connection))  # type: ignore[attr-defined,arg-type]
            for value in values
        )
    if version:
        _definitions[version] = loaded
    return loaded


@cache
def _definitions_sql() -> str:
    q = connection.ops.quote_name
    table = q(SagaStep._meta.db_table)
    column = q(str(SagaStep._meta.get_field("stored_definition").column))
    return f"SELECT {column} FROM {table} WHERE saga_id = %s ORDER BY {q('index')}"


def policy(definition: dict[str, Any], key: str) -> RetryPolicy:
    """A step's retry policy (`retry` or `compensation_retry`), parsed once per definition."""
    if not isinstance(definition, Definition):
        return RetryPolicy.from_dict(definition[key])
    if key not in definition.policies:
        definition.policies[key] = RetryPolicy.from_dict(definition[key])
    return definition.policies[key]
