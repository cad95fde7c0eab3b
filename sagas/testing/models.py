"""Faults to inject into steps, for tests and drills: installed only with this app."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from sagas.models import Saga


class FaultPoint(models.TextChoices):
    BEFORE_ACTION = "before_action", "Before the action"
    AFTER_ACTION = "after_action", "After the action, before its commit"
    AFTER_COMMIT = "after_commit", "After the commit, before the acknowledgement"
    BEFORE_COMPENSATION = "before_compensation", "Before the compensation"
    AFTER_FINAL_FAILURE = (
        "after_final_failure",
        "After a final failure's commit, before the error callback is sent",
    )


class FaultEffect(models.TextChoices):
    BUSINESS_ERROR = "business_error", "Raise a business error"
    TRANSIENT_ERROR = "transient_error", "Raise a transient error"
    CRASH = "crash", "Kill the worker process"
    HANG = "hang", "Hang, ignoring the soft time limit, until the hard one kills the process"
    REPEAT_CALLBACK = "repeat_callback", "Send the chain's error callback again, 1 s later"
    REDELIVER = (
        "redeliver",
        "Deliver the message again, with the rest of its chain (a lost acknowledgement)",
    )
    REFUSE_NEXT = (
        "refuse_next",
        "The broker refuses the chain's next message (the task fails after its commit)",
    )
    LOSE_COMMIT_ANSWER = (
        "lose_commit_answer",
        "The next COMMIT's answer is lost: it commits, and the worker hears an error",
    )
    HOLD = (
        "hold",
        "Hold a group member's action until another member of its group failed for good "
        "(at most 30 s)",
    )
    FAIL_WHILE_HELD = (
        "fail_while_held",
        "Raise a business error while another member of its group is held (waiting for one "
        "at most 30 s)",
    )
    STATEMENT_TIMEOUT = (
        "statement_timeout",
        "A query of the attempt's own outlives its statement timeout (SQLSTATE 57014)",
    )


class Fault(models.Model):
    """A fault to inject into a step, for tests and drills."""

    saga = models.ForeignKey(
        Saga, null=True, blank=True, on_delete=models.CASCADE, help_text="Empty: any saga."
    )
    step_name = models.CharField(
        max_length=100,
        help_text="The step to inject into: a stage's name (a group's: each of its members), "
        "`<group>.<member>` or `<group>[<position>]` (one member), `<child stage>.<step>` (a "
        "step of the child saga that stage starts).",
    )
    point = models.CharField(max_length=40, choices=FaultPoint.choices, help_text="Where.")
    effect = models.CharField(max_length=30, choices=FaultEffect.choices, help_text="What.")
    remaining = models.PositiveIntegerField(
        null=True, blank=True, help_text="How many more times it fires; empty: every time."
    )
    taken_by = models.PositiveIntegerField(
        null=True, blank=True, help_text="The worker process (pid) that last took it."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "injected fault"
        constraints = [
            models.CheckConstraint(
                condition=Q(point__in=FaultPoint.values), name="fault_point_valid"
            ),
            models.CheckConstraint(
                condition=Q(effect__in=FaultEffect.values), name="fault_effect_valid"
            ),
        ]
        indexes = [models.Index(fields=["step_name"], name="fault_step_idx")]

    def __str__(self) -> str:
        return f"{self.effect} at {self.point} of {self.step_name}"
