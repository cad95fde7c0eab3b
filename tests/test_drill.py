"""The fault-injection drill, short form: faults on real servers, invariants must hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# The full mix over TCP (as `make run` reaches Redis); over the unix socket, what depends on
# the transport only: a Redis restart under load, and a worker killed; that one with the order
# saga's group and child saga (`--shapes`).
MIXES = {
    "tcp": [
        *("--sagas", "80", "--worker-kills", "3", "--redis-restarts", "1"),
        *("--postgres-restarts", "1", "--crash-faults", "4"),
        *("--hung-steps", "2", "--lost-callbacks", "2", "--session-kills", "1"),
        *("--poison-steps", "1", "--lost-commit-answers", "2", "--statement-timeouts", "2"),
        *("--timeout", "240", "--redis-tcp"),
    ],
    "unix socket": [
        *("--sagas", "30", "--worker-kills", "1", "--redis-restarts", "1"),
        *("--postgres-restarts", "0", "--crash-faults", "1", "--hung-steps", "0"),
        *("--lost-callbacks", "0", "--session-kills", "0", "--poison-steps", "0"),
        *("--lost-commit-answers", "0", "--statement-timeouts", "0", "--timeout", "180"),
        # The order saga with its group (each line reserved at once) and its child saga.
        "--shapes",
    ],
}


@pytest.mark.embedded
@pytest.mark.parametrize("redis", list(MIXES))
def test_short_drill_loses_nothing(redis):
    """Over TCP, 80 sagas: 3 worker kills, 1 Redis restart, 1 PostgreSQL restart, crashes
    after commit, hung steps killed at their hard time limit, error callbacks lost and sent
    twice, steps' sessions ended mid-call, a poison step, COMMIT answers lost, statements
    timed out. Over the unix socket, a shorter run of what depends on the transport. Both
    with the waits: 3-D Secure orders confirmed by the gateway's webhook and by the drill's
    signals at random times (before the wait, during it, after it, twice), abandoned ones
    that time out, and reviews approved and rejected: no signal lost, none applied twice."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    result = subprocess.run(
        [sys.executable, "-m", "sagaproject.drill", *MIXES[redis]],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    print(output[-6000:])
    assert result.returncode == 0, output[-6000:]
    assert "drill: passed" in output
    report = dict(
        line.strip("│ ").rsplit("│", 1) for line in output.splitlines() if line.count("│") == 3
    )
    report = {key.strip(): value.strip() for key, value in report.items()}
    for invariant in (
        "signals lost",
        "signals applied twice (or waits ended twice)",
        "stages begun before the wait before them ended",
    ):
        assert report[invariant] == "0", invariant
    # Every kind of saga is in a short run (each scenario first, once): the waits were waited.
    assert int(report["waits ended: payment_confirmation: wait_completed"]) >= 1
    assert int(report["waits ended: payment_confirmation: wait_timed_out"]) >= 1
    assert (
        int(report.get("waits ended: review: wait_completed", 0))
        + int(report.get("waits ended: review: wait_failed", 0))
        >= 1
    )
    assert int(report.get("the drill's confirmations answered refused", 0)) >= 1
    if redis == "tcp":
        assert int(report["hung attempts killed at their hard time limit"]) >= 1
        assert int(report["error callbacks lost (worker died first)"]) >= 1
