"""The test project's sagas, with nothing but their outputs: a transfer between two accounts,
a card payment that waits for its confirmation, and a large order that waits for a manager's
approval."""

from django.core.exceptions import ValidationError

from sagas import Approval, RetryPolicy, SagaDefinition, Step, StepContext, Wait, register

FAST = RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1)


def debit(ctx: StepContext) -> dict:
    return {"debited": ctx.input["amount"]}


def refund(ctx: StepContext) -> None:
    return None


def credit(ctx: StepContext) -> dict:
    return {"credited": ctx.input["amount"]}


def reverse(ctx: StepContext) -> None:
    return None


def notify(ctx: StepContext) -> dict:
    return {"notified": True}


register(
    SagaDefinition(
        name="transfer",
        steps=[
            Step("debit", debit, refund, retry=FAST),
            Step("credit", credit, reverse, retry=FAST),
            Step("notify", notify, retry=FAST),
        ],
        key="transfer_id",
    )
)


# -- a payment that waits for its confirmation, then cools off (the test kit's waits) -------------


def hold(ctx: StepContext) -> dict:
    return {"held": ctx.input["amount"]}


def release(ctx: StepContext) -> None:
    return None


def has_a_reference(payload: object) -> None:
    if not isinstance(payload, dict) or not payload.get("reference"):
        raise ValidationError("A confirmation has a reference.")


def capture(ctx: StepContext) -> dict:
    return {"captured": ctx.outputs["confirmed"]["reference"]}


register(
    SagaDefinition(
        name="card_payment",
        steps=[
            Step("hold", hold, release, retry=FAST),
            Wait(
                "confirmed",
                event="payment_confirmed",
                timeout=3600,
                validate=has_a_reference,
                max_payload_bytes=1000,
            ),
            Wait("cooling_off", timeout=24 * 3600),
            Step("capture", capture, retry=FAST),
        ],
        key="payment_id",
    )
)


# -- an order that waits for a manager's approval before it ships (the test kit's approvals) ------


def reserve(ctx: StepContext) -> dict:
    return {"reserved": ctx.input["order_id"]}


def unreserve(ctx: StepContext) -> None:
    return None


def authorize(ctx: StepContext) -> dict:
    return {"authorized": ctx.input["amount"]}


def void(ctx: StepContext) -> None:
    return None


def ship(ctx: StepContext) -> dict:
    decision = ctx.outputs["manager_review"]  # {"decision": "approved", "by": ..., "note": ...}
    return {"shipped": ctx.input["order_id"], "approved_by": decision["by"]}


register(
    SagaDefinition(
        name="large_order",
        steps=[
            Step("reserve", reserve, unreserve, retry=FAST),
            Step("authorize", authorize, void, retry=FAST),
            Approval("manager_review", timeout=3 * 86400),
            Step("ship", ship, retry=FAST),
        ],
        key="order_id",
    )
)
