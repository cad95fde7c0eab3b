"""The read-only admin: for rows that only code writes, such as a saga's and its steps'."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest


class ReadOnlyAdminMixin:
    """Shows rows in the admin and never adds, changes or deletes them there.

    For a ModelAdmin or an inline of rows that the engine or a service writes: a saga's rows,
    and the domain rows a saga's steps write (an order, a payment, a reservation). An edit
    made in a form would bypass the code that keeps them consistent. Put it before the admin
    class among the bases:

        class PaymentAdmin(ReadOnlyAdminMixin, admin.ModelAdmin): ...

    Who may see the rows is unchanged (the model's view permission); the admin shows them on
    its view-only pages. Override a method to allow one thing back, as the saga admin does to
    let a superuser delete a finished saga.
    """

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
