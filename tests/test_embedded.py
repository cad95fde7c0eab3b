"""The embedded path: no DATABASE_URL or CELERY_BROKER_URL, real servers from PyPI packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.embedded
def test_a_saga_completes_on_the_embedded_servers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(
        SAGAS_DATA_DIR=str(tmp_path / "data"),
        CELERY_TASK_DEFAULT_QUEUE="embedded-smoke",
        PYTHONUNBUFFERED="1",
    )
    result = subprocess.run(
        [sys.executable, "-m", "tests.embedded_smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "redis+socket://" in output and "host=" in output
    assert "saga status: completed" in output
    # Both servers were stopped at the end: nothing is left listening in the data folder.
    assert not (tmp_path / "data" / "redis" / "redis.sock").exists()
