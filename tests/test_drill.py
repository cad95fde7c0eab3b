"""The fault-injection drill, short form: faults on real servers, invariants must hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.embedded
@pytest.mark.parametrize("redis", ["unix socket", "tcp"])
def test_short_drill_loses_nothing(redis):
    """80 sagas; 3 worker kills, 1 Redis restart, 1 PostgreSQL restart, crashes after commit,
    hung steps killed at their hard time limit, error callbacks lost and sent twice."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    args = [
        *("--sagas", "80", "--worker-kills", "3", "--redis-restarts", "1"),
        *("--postgres-restarts", "1", "--crash-faults", "4"),
        *("--hung-steps", "2", "--lost-callbacks", "2", "--timeout", "240"),
    ]
    if redis == "tcp":
        args.append("--redis-tcp")
    result = subprocess.run(
        [sys.executable, "-m", "sagaproject.drill", *args],
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
    assert int(report["hung attempts killed at their hard time limit"]) >= 1
    assert int(report["error callbacks lost (worker died first)"]) >= 1
