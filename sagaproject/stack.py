"""`make run`: set up the local stack and run the web server, Celery worker and beat, supervised.

Starts the embedded PostgreSQL and Redis when `DATABASE_URL` / `CELERY_BROKER_URL` are unset,
migrates, collects the static files when DEBUG is off, seeds the demo catalog and the local
development users, then runs the processes under Supervisor's `supervisord` in the foreground,
their output on the terminal. A process that exits is started again; Ctrl-C (or SIGTERM) stops
them all, and then the embedded servers.
"""

from __future__ import annotations

import configparser
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parent.parent


def setup_local_data() -> None:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=1)
    if not settings.DEBUG:  # WhiteNoise then serves only the collected files (DEBUG on: the apps')
        call_command("collectstatic", interactive=False, verbosity=0)
    call_command("seed_catalog")
    # Local development only: well-known passwords, said so in the README.
    users = get_user_model().objects
    if not users.filter(username="admin").exists():
        users.create_superuser("admin", "admin@example.com", "admin")
    if not users.filter(username="demo").exists():
        users.create_user("demo", "demo@example.com", "demo")


def processes(port: str, concurrency: str, data: Path) -> dict[str, list[str]]:
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "sagaproject"]
    return {
        "web": [python, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        "worker": [
            *(*celery, "worker", "-l", "info", "-c", concurrency, "-n", "worker@%h"),
            *("--without-gossip", "--without-mingle"),
        ],
        "beat": [*celery, "beat", "-l", "info", "-s", str(data / "celerybeat-schedule")],
    }


def worker_stop_wait() -> int:
    """Seconds a stopping worker gets to finish its steps in flight: the longest hard time
    limit of a step or a compensation, and a little more."""
    from sagas import conf
    from sagas.definitions import Step, registered

    steps = [
        step
        for definition in registered().values()
        for step in definition.steps
        if isinstance(step, Step)  # a wait holds no worker
    ]
    limits = [max(s.time_limit, s.compensation_time_limit or 0) for s in steps]
    return max(limits, default=60) + conf.hard_time_limit_grace() + 5


def worker_metrics(data: Path) -> dict[str, str]:
    """The worker's metrics (sagas.metrics.worker): its pool processes write to a directory of
    its own, emptied here before it starts (as prometheus-client asks), and its main process
    serves them on SAGAS_METRICS_WORKER_PORT (default 9808)."""
    folder = data / "metrics" / "worker"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port = os.environ.get("SAGAS_METRICS_WORKER_PORT") or "9808"
    return {"PROMETHEUS_MULTIPROC_DIR": str(folder), "SAGAS_METRICS_WORKER_PORT": port}


def supervisord_config(
    programs: dict[str, list[str]],
    data: Path,
    stop_wait: int,
    environments: dict[str, dict[str, str]] | None = None,
) -> str:
    """Supervisor's configuration: http://supervisord.org/configuration.html"""
    config = configparser.RawConfigParser()
    config["supervisord"] = {
        "nodaemon": "true",  # in the foreground; its own log goes to the terminal too
        "logfile": str(data / "supervisord.log"),
        "pidfile": str(data / "supervisord.pid"),
    }
    if os.geteuid() == 0:
        # As root, supervisord warns that it dropped no privileges unless told to stay root.
        config["supervisord"]["user"] = "root"
    for name, command in programs.items():
        config[f"program:{name}"] = {
            "command": shlex.join(command),
            "directory": str(ROOT),
            "autorestart": "true",  # whatever made it exit
            # TERM: a worker's warm shutdown lets its steps in flight finish, then stops its
            # pool; only if that takes too long is the whole group killed (as Celery's own
            # supervisord example does).
            "stopsignal": "TERM",
            "stopwaitsecs": str(stop_wait if name == "worker" else 10),
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_logfile": "/dev/stdout",
            "stdout_logfile_maxbytes": "0",  # no rotation: it is the terminal
        }
        if environment := (environments or {}).get(name):
            config[f"program:{name}"]["environment"] = ",".join(
                f'{key}="{value}"' for key, value in environment.items()
            )
    for section in config.sections():  # supervisord expands %(name)s in values
        for key, value in config[section].items():
            config[section][key] = value.replace("%", "%%")
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")
    # The stack serves plain http on 127.0.0.1, also with DEBUG off: no redirect to https, and
    # cookies that come back over http. (Exported, like the servers' URLs, to every process.)
    os.environ.setdefault("DJANGO_SECURE_SSL_REDIRECT", "0")
    os.environ.setdefault("DJANGO_SECURE_COOKIES", "0")
    django.setup()  # starts the embedded servers if needed and exports their URLs
    from sagaproject import embedded

    setup_local_data()
    data = embedded.data_dir()  # created if missing, embedded servers or not
    port = os.environ.get("PORT", "8000")
    programs = processes(port, os.environ.get("WORKER_CONCURRENCY", "2"), data)
    config = data / "supervisord.conf"
    environments = {"worker": worker_metrics(data)}
    config.write_text(supervisord_config(programs, data, worker_stop_wait(), environments))
    os.environ["PYTHONUNBUFFERED"] = "1"  # lines reach the terminal as they are written
    print(f"Web server: http://127.0.0.1:{port}/admin/ (admin/admin). Ctrl-C stops everything.")
    metrics_port = environments["worker"]["SAGAS_METRICS_WORKER_PORT"]
    print(f"Metrics: http://127.0.0.1:{port}/metrics and the worker's on :{metrics_port}/metrics")
    sys.stdout.flush()
    # A session of its own: Ctrl-C reaches only this process, which asks supervisord once to
    # stop its processes in order.
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(config)],
        start_new_session=True,
    )
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        supervisor.send_signal(signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        returncode = supervisor.wait()
    finally:
        if supervisor.poll() is None:
            supervisor.terminate()
            supervisor.wait()
        embedded.stop_redis_if_started()
        embedded.stop_postgres()
    # Ctrl-C and SIGTERM are how a user stops the stack: a clean exit.
    return 0 if stopping else returncode


if __name__ == "__main__":
    sys.exit(main())
