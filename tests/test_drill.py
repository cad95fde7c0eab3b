"""The fault-injection drill, short form: faults on real servers, invariants must hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.embedded
def test_short_drill_loses_nothing():
    """100 sagas, 3 worker kills, 1 Redis restart, 1 PostgreSQL restart, crashes after commit."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sagaproject.drill",
            "--sagas",
            "100",
            "--worker-kills",
            "3",
            "--redis-restarts",
            "1",
            "--postgres-restarts",
            "1",
            "--crash-faults",
            "4",
            "--timeout",
            "240",
        ],
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
