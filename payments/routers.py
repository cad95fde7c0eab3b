"""Sends the simulated gateway's ledger to a database connection of its own."""

from __future__ import annotations

from typing import Any

from django.db import models

GATEWAY_DB = "gateway"
GATEWAY_MODELS = frozenset(
    {"payments.gatewaycharge", "payments.gatewayattempt", "payments.gatewayoutage"}
)


class GatewayRouter:
    """Gateway models read and write on the `gateway` alias; everything migrates on `default`.

    Both aliases name the same database: the second connection only keeps the gateway's writes
    out of the calling step's transaction. Migrating on `default` alone creates each table once.
    """

    def db_for_read(self, model: type[models.Model], **hints: Any) -> str | None:
        return GATEWAY_DB if model._meta.label_lower in GATEWAY_MODELS else None

    def db_for_write(self, model: type[models.Model], **hints: Any) -> str | None:
        return GATEWAY_DB if model._meta.label_lower in GATEWAY_MODELS else None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return db == "default"
