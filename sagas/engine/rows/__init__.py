"""The rows the engine reads and writes, as plain objects, and the SQL it sends.

A step's hot path is: the transaction's BEGIN (psycopg sends it alone), the saga's lock and
the read of its steps in one round trip (`read`), the step's own statements, then the changed
rows and the events in one statement sent with the COMMIT (`write`). No queryset is built and
no model instance made on that path: a row is an object with the table's columns as
attributes (`objects`), and the statements are built from the models' fields once. Where the
project allows prepared statements (`prepare_threshold` in the database's OPTIONS), psycopg
prepares them (`cursors`). The steps' definitions are read and parsed once per definition
version and process (`definitions`).
"""

from .definitions import Definition, definitions, policy
from .objects import EventRow, Row, SagaRow, Sql, StepRow
from .read import (
    completed_steps,
    database_now,
    last_cause,
    read_locked,
    read_locked_with_members,
    read_member_locked,
)
from .write import execute_as_one, insert_events_sql, insert_saga, store_version, update_sql

__all__ = [
    "Definition",
    "EventRow",
    "Row",
    "SagaRow",
    "Sql",
    "StepRow",
    "completed_steps",
    "database_now",
    "definitions",
    "execute_as_one",
    "insert_events_sql",
    "insert_saga",
    "last_cause",
    "policy",
    "read_locked",
    "read_locked_with_members",
    "read_member_locked",
    "store_version",
    "update_sql",
]
