"""The embedded path: no DATABASE_URL or CELERY_BROKER_URL, real servers from PyPI packages."""

from __future__ import annotations

import json
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
    # Both servers were stopped at the end: nothing is left running in the data folder.
    postmaster = tmp_path / "data" / "postgres" / "postmaster.pid"
    assert not (tmp_path / "data" / "redis" / "redis.sock").exists()
    assert not postmaster.exists()

    # A process killed while it used the server never released it: the next one to leave
    # still stops the server.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    handles = tmp_path / "data" / "postgres" / ".handle_pids.json"
    handles.write_text(json.dumps([dead.pid]))
    join = "from sagaproject import embedded; print(embedded.postgres_url())"
    subprocess.run([sys.executable, "-c", join], cwd=ROOT, env=env, check=True, timeout=120)
    assert not postmaster.exists(), handles.read_text()
