"""The test project's sagas: a transfer between two accounts, with nothing but its outputs."""

from sagas import RetryPolicy, SagaDefinition, Step, StepContext, register

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
