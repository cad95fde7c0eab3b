"""Admin for sagas: status at a glance, the steps and timeline of each, and the operator actions.

One module a job: `saga` (the list and a saga's page, with its inlines), `display` (how facts
are shown), `diagram` (the step diagram), `actions` (retry, compensate and resolve, confirmed
first), `skip` (mark a stage as done by hand, after a preview), `bulk` (retry or compensate
every saga a filter matches, or mark a stage of each as done, and the bulk actions' pages),
`links` (links to the domain objects of a saga, from the `SAGAS_ADMIN_LINKS` setting, so this
app never imports a domain app), `objects` (the other way: the sagas of an object, found by
their business key, for a project's own admins) and `readonly` (`ReadOnlyAdminMixin`, for the
admins and inlines of rows that only code writes, in this app and in projects). The public
names are here.
"""

from django.contrib import admin

from ..models import BulkAction, Saga
from .actions import OperatorActionsAdmin
from .bulk import BulkActionAdmin, SagaBulkActionsMixin
from .objects import sagas_of_object
from .readonly import ReadOnlyAdminMixin
from .saga import SagaAdmin, SagaEventInline, SagaStepInline

__all__ = [
    "BulkActionAdmin",
    "OperatorActionsAdmin",
    "ReadOnlyAdminMixin",
    "SagaAdmin",
    "SagaBulkActionsMixin",
    "SagaEventInline",
    "SagaStepInline",
    "sagas_of_object",
]

admin.site.register(Saga, SagaAdmin)
admin.site.register(BulkAction, BulkActionAdmin)
