"""Who may act on sagas: the same rule for the admin and the API."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_permission_codename

from .models import OperatorAction, Saga


def may_operate(user: Any, action: OperatorAction | str) -> bool:
    """Whether `user` holds the permission for `action` (`sagas.retry_saga`, ...)."""
    codename = get_permission_codename(action, Saga._meta)
    return bool(user.has_perm(f"{Saga._meta.app_label}.{codename}"))
