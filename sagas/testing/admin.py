"""The admin of injected faults (tests and drills)."""

from django.contrib import admin

from .models import Fault


@admin.register(Fault)
class FaultAdmin(admin.ModelAdmin):
    """Faults to inject into steps (tests and drills)."""

    list_display = ("step_name", "point", "effect", "remaining", "saga", "taken_by", "created_at")
    list_filter = ("point", "effect", "step_name")
    search_fields = ("step_name", "saga__id")
    raw_id_fields = ("saga",)
    readonly_fields = ("taken_by", "created_at")
