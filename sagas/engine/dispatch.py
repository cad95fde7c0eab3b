"""Sending a saga's chains to the broker, by task name.

A leaf module: the engine decides what to send and calls these after its commit; the tasks
(`sagas.tasks`) run what arrives. Neither imports the other.

Every task of a chain carries the saga's epoch (in its id too, which its error callback reads):
a message of an older epoch finds the saga has moved on and does nothing.
"""

from __future__ import annotations

from celery import Signature, chain, current_app

from .. import conf

RUN_STEP = "sagas.run_step"
COMPENSATE_STEP = "sagas.compensate_step"
ON_STEP_FAILURE = "sagas.on_step_failure"
ON_COMPENSATION_FAILURE = "sagas.on_compensation_failure"
CHAIN_FAILED = "sagas.chain_failed"
BULK_ACTION_BATCH = "sagas.bulk_action_batch"
CHILD_ENDED = "sagas.child_ended"
REPAIR = "sagas.repair"


def task_id(saga_id: str, epoch: int, index: int, member: int | None = None) -> str:
    """The Celery task id of step `index`'s message in the saga's chain of `epoch`: unique, as
    every chain raises the epoch, and telling an error callback which task of its chain failed.
    A group's member's: `<saga>:<epoch>:<stage>.<member>`."""
    if member is not None:
        return f"{saga_id}:{epoch}:{index}.{member}"
    return f"{saga_id}:{epoch}:{index}"


def _parsed(failed_task_id: str) -> tuple[str, int, str] | None:
    """(saga id, epoch, stage part) of a task id of a saga's chain (`task_id`), else None."""
    parts = failed_task_id.split(":")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def _task_of(failed_task_id: str, saga_id: str, epoch: int) -> str | None:
    """The stage part of a task id of the saga's chain of `epoch`, else None."""
    parsed = _parsed(failed_task_id)
    return parsed[2] if parsed is not None and parsed[:2] == (saga_id, epoch) else None


def failed_member(failed_task_id: str, saga_id: str, epoch: int) -> tuple[int, int] | None:
    """The (stage, member) of a group's member whose task failed, from its task id."""
    stage, _, member = (_task_of(failed_task_id, saga_id, epoch) or "").partition(".")
    return (int(stage), int(member)) if stage.isdigit() and member.isdigit() else None


def failed_index(failed_task_id: str, saga_id: str, epoch: int) -> int | None:
    """The step whose task failed, from the id an error callback receives (None for a task
    id of another form)."""
    stage = _task_of(failed_task_id, saga_id, epoch) or ""
    return int(stage) if stage.isdigit() else None


# The error callback each task of a chain names, by the chain's task.
CALLBACKS = {RUN_STEP: ON_STEP_FAILURE, COMPENSATE_STEP: ON_COMPENSATION_FAILURE}


def failed_chain(failed_task_id: str, task: str | None) -> tuple[str, int, str] | None:
    """The (saga id, epoch, error callback) of the chain whose task `task` (its name) of id
    `failed_task_id` failed; None for a task id or a task of another form."""
    parsed, callback = _parsed(failed_task_id), CALLBACKS.get(task or "")
    if parsed is None or callback is None:
        return None
    return parsed[0], parsed[1], callback


def _signature(
    task: str, saga_id: str, index: int, epoch: int, time_limit: int, member: int | None = None
) -> Signature:
    # A soft time limit raised inside the action (retried as transient), and a hard one a
    # little later that kills the process if the action ignores the first.
    kwargs: dict[str, int] = {"epoch": epoch}
    if member is not None:
        kwargs["member"] = member
    return current_app.signature(
        task,
        args=(saga_id, index),
        kwargs=kwargs,
        immutable=True,
        soft_time_limit=time_limit,
        time_limit=time_limit + conf.hard_time_limit_grace(),
        task_id=task_id(saga_id, epoch, index, member),
        # Not the app's thread id, which Celery would store in every signature of the chain:
        # each message is sent with its sender's (`send_task`), and no result is awaited.
        reply_to="",
    )


# A task of a chain: the stage's index, its time limit, and a group's member's position (or None).
Entry = tuple[int, int, int | None]


def _send(
    task: str,
    saga_id: str,
    epoch: int,
    entries: list[Entry],
    countdown: float,
) -> None:
    signatures = [
        _signature(task, saga_id, index, epoch, limit, member) for index, limit, member in entries
    ]
    # Celery calls `chain_failed` where the task failed, with its exception; it sends the
    # chain's error callback (`CALLBACKS`) on as a message, with the exception's class
    # (`sagas.tasks.chain_failed`). Celery copies it into every task of the chain, and each
    # message carries the rest of the chain: so it names nothing, and `chain_failed` reads the
    # saga, the epoch and the callback from the failed task's id and name (`failed_chain`).
    chained = chain(*signatures).on_error(current_app.signature(CHAIN_FAILED))
    if countdown:
        chained.apply_async(countdown=countdown)
    else:
        chained.apply_async()


def send_steps(saga_id: str, epoch: int, steps: list[tuple[int, int]], countdown: float) -> None:
    """Send `run_step` for each (index, time limit) in order, as one chain."""
    entries: list[Entry] = [(index, limit, None) for index, limit in steps]
    _send(RUN_STEP, saga_id, epoch, entries, countdown)


def send_members(
    saga_id: str, epoch: int, index: int, members: list[tuple[int, int]], countdown: float
) -> None:
    """Send `run_step` for each (member, time limit) of the group at stage `index`, each as a
    task of its own (with the error callback a chain has): they run at the same time."""
    for member, limit in members:
        _send(RUN_STEP, saga_id, epoch, [(index, limit, member)], countdown)


def send_compensations(saga_id: str, epoch: int, entries: list[Entry], countdown: float) -> None:
    """Send `compensate_step` for each (index, time limit, member) in the order given
    (reverse), as one chain."""
    _send(COMPENSATE_STEP, saga_id, epoch, entries, countdown)


def send_member_compensations(
    saga_id: str, epoch: int, entries: list[Entry], countdown: float
) -> None:
    """Send `compensate_step` for each (index, time limit, member) of a group that compensates
    concurrently, each as a task of its own (with the error callback a chain has)."""
    for entry in entries:
        _send(COMPENSATE_STEP, saga_id, epoch, [entry], countdown)


def send_error_callback(
    callback: str,
    task_id: str,
    saga_id: str,
    epoch: int,
    cause: str,
    countdown: float = 0.0,
) -> None:
    """Send a chain's error callback (`ON_STEP_FAILURE` or `ON_COMPENSATION_FAILURE`): the
    failed task's id, and the class of the exception that failed it."""
    signature = current_app.signature(
        callback, args=(task_id, saga_id), kwargs={"epoch": epoch, "cause": cause}
    )
    signature.apply_async(countdown=countdown) if countdown else signature.apply_async()


def send_bulk_batch(bulk_action_id: int) -> None:
    """Send `bulk_action_batch`: the next batch of a bulk action's sagas."""
    current_app.signature(BULK_ACTION_BATCH, args=(bulk_action_id,)).apply_async()


def send_child_ended(parent_id: str, stage: int, member: int | None = None) -> None:
    """Send `child_ended`: the child of the parent's `stage` (of its group's `member`, if a
    member started it) ended, or stopped."""
    args = (parent_id, stage) if member is None else (parent_id, stage, member)
    current_app.signature(CHILD_ENDED, args=args).apply_async()


def send_repair(saga_id: str, index: int, actor: str, time_limit: int) -> None:
    """Send `repair`: run step `index`'s compensation again, as an operator chose, within the
    compensation's time limit."""
    current_app.signature(
        REPAIR,
        args=(saga_id, index),
        kwargs={"actor": actor},
        soft_time_limit=time_limit,
        time_limit=time_limit + conf.hard_time_limit_grace(),
    ).apply_async()
