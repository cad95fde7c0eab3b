"""`make run`: set up the local stack and run the web server, Celery worker and beat together.

Starts the embedded PostgreSQL and Redis when `DATABASE_URL` / `CELERY_BROKER_URL` are unset,
migrates, collects the static files when DEBUG is off, seeds the demo catalog and the local
development users, then runs every process in the foreground until Ctrl-C, and stops them (and
the embedded servers) cleanly.
"""

from __future__ import annotations

import os
import shlex
import sys

import django


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


def processes(port: str, concurrency: str) -> dict[str, str]:
    from sagaproject import embedded

    python = shlex.quote(sys.executable)
    # In the local data folder, which data_dir() creates: with servers of your own, nothing else
    # makes it, and beat cannot open a schedule in a missing folder (it exits, and the stack too).
    schedule = shlex.quote(str(embedded.data_dir() / "celerybeat-schedule"))
    return {
        "web": f"{python} manage.py runserver 127.0.0.1:{port} --noreload",
        "worker": (
            f"{python} -m celery -A sagaproject worker -l info -c {concurrency} "
            "-n worker@%h --without-gossip --without-mingle"
        ),
        "beat": f"{python} -m celery -A sagaproject beat -l info -s {schedule}",
    }


def main() -> int:
    from honcho.manager import Manager

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")
    # The stack serves plain http on 127.0.0.1, also with DEBUG off: no redirect to https, and
    # cookies that come back over http. (Exported, like the servers' URLs, to every process.)
    os.environ.setdefault("DJANGO_SECURE_SSL_REDIRECT", "0")
    os.environ.setdefault("DJANGO_SECURE_COOKIES", "0")
    django.setup()  # starts the embedded servers if needed and exports their URLs
    from sagaproject import embedded

    setup_local_data()
    port = os.environ.get("PORT", "8000")
    manager = Manager()
    for name, command in processes(port, os.environ.get("WORKER_CONCURRENCY", "2")).items():
        manager.add_process(name, command, env=dict(os.environ))
    print(f"Web server: http://127.0.0.1:{port}/admin/ (admin/admin). Ctrl-C stops everything.")
    try:
        manager.loop()
    finally:
        embedded.stop_redis_if_started()
        embedded.stop_postgres()
    # Ctrl-C (SIGINT) and SIGTERM are how a user stops the stack: a clean exit.
    return 0 if manager.returncode in (None, 130, 143) else manager.returncode


if __name__ == "__main__":
    sys.exit(main())
