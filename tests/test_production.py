"""The project as it runs in production: static files, the API docs offline, deploy settings."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from rest_framework.test import APIClient

from tests.conftest import (
    ARTIFACTS,
    ROOT,
    answers,
    free_port,
    running_server,
    wait_for,
    worker_env,
)


class AssetLinks(HTMLParser):
    """The URLs a page loads: every `src` and `href`."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def asset_urls(html: str) -> list[str]:
    links = AssetLinks()
    links.feed(html)
    return links.urls


def test_api_docs_load_only_local_static_files():
    """Swagger UI comes from the project's static files, not a CDN: it works offline."""
    response = APIClient().get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    urls = asset_urls(html)
    assert urls, html
    assert not re.search(r"https?://|//cdn|@latest", html), html
    for url in urls:
        assert url.startswith(settings.STATIC_URL), url
        path = url.removeprefix(settings.STATIC_URL).split("?")[0]
        assert finders.find(path), f"{url}: no static file {path}"


def production_env(**overrides: str) -> dict[str, str]:
    """The environment of a production process: DEBUG off, a strong secret key."""
    return {
        **worker_env(),
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        **overrides,
    }


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.django_db
def test_static_files_are_served_with_debug_off(tmp_path: Path):
    """As in production: collectstatic, then the web server itself serves the admin's styles
    and the API docs' Swagger UI (WhiteNoise), with DEBUG off."""
    # Plain http on 127.0.0.1: a TLS proxy in front would redirect to https instead.
    env = production_env(
        DJANGO_STATIC_ROOT=str(tmp_path / "static"), DJANGO_SECURE_SSL_REDIRECT="0"
    )
    collected = manage(env, "collectstatic", "--noinput")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    with running_server(env, ARTIFACTS / "production-server.log") as base:
        status, content_type, css = get(base + "/static/admin/css/base.css")
        assert status == 200 and content_type.startswith("text/css") and css
        _, _, page = get(base + "/api/docs/")
        urls = asset_urls(page.decode())
        assert urls and all(url.startswith("/static/") for url in urls), urls
        for url in urls:
            status, _, body = get(base + url)
            assert status == 200 and body, url
        _, _, login = get(base + "/admin/login/")
        stylesheets = [url for url in asset_urls(login.decode()) if url.endswith(".css")]
        assert stylesheets
        for url in stylesheets:
            assert get(base + url)[0] == 200, url


def test_check_deploy_passes_with_debug_off_and_a_secret_key():
    result = manage(production_env(), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_debug_off_with_the_development_secret_key_refuses_to_start():
    env = production_env()
    del env["DJANGO_SECRET_KEY"]
    result = manage(env, "check")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "DJANGO_SECRET_KEY" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("value", "threshold"), [(None, "5"), ("", "None"), ("1", "1"), ("off", None)]
)
def test_prepared_statements_are_set_from_the_environment(value, threshold):
    env = production_env()
    if value is not None:
        env["DATABASE_PREPARE_THRESHOLD"] = value
    code = "from django.conf import settings as s; "
    code += "print(s.DATABASES['default']['OPTIONS']['prepare_threshold'])"
    result = manage(env, "shell", "-c", code)
    if threshold is None:  # a clear message, not a traceback of int()
        assert result.returncode != 0
        assert "DATABASE_PREPARE_THRESHOLD must be a whole number" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == threshold


def resolved_settings(env: dict[str, str]) -> dict[str, object]:
    """The security settings that `env` gives, as a fresh process reads them."""
    names = [
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS",
        "SECURE_HSTS_PRELOAD",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_PROXY_SSL_HEADER",
    ]
    code = (
        "import json; from django.conf import settings; "
        f"print(json.dumps({{n: getattr(settings, n) for n in {names!r}}}))"
    )
    result = manage(env, "shell", "-c", code)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_https_settings_are_on_in_production_off_locally_and_set_from_the_environment():
    production = resolved_settings(production_env())
    assert production == {
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 3600,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_PROXY_SSL_HEADER": None,
    }
    local = resolved_settings({**worker_env(), "DJANGO_DEBUG": "1"})
    assert local == {
        "SECURE_SSL_REDIRECT": False,
        "SECURE_HSTS_SECONDS": 0,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False,
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_PROXY_SSL_HEADER": None,
    }
    behind_a_proxy = production_env(
        DJANGO_SECURE_SSL_REDIRECT="0",
        DJANGO_SECURE_HSTS_SECONDS="31536000",
        DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS="0",
        DJANGO_SECURE_HSTS_PRELOAD="0",
        DJANGO_SECURE_COOKIES="0",
        DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
    )
    assert resolved_settings(behind_a_proxy) == {
        "SECURE_SSL_REDIRECT": False,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False,
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
    }


def log_in_to_admin(base: str) -> str:
    """Log in as admin/admin through the login form, as a browser over plain http would;
    returns the admin index page. A Secure cookie would not come back over http (CSRF 403)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(base + "/admin/login/", timeout=10).read()
    csrf = next(cookie.value for cookie in jar if cookie.name == "csrftoken")
    form = urllib.parse.urlencode(
        {"username": "admin", "password": "admin", "csrfmiddlewaretoken": csrf, "next": "/admin/"}
    )
    with opener.open(base + "/admin/login/", form.encode(), timeout=10) as response:
        return response.read().decode()


@pytest.mark.django_db(transaction=True, databases=["default", "gateway"])
@pytest.mark.parametrize("debug", ["1", "0"], ids=["debug on", "debug off"])
def test_make_run_serves_the_admin_with_its_styles_over_plain_http(tmp_path: Path, debug: str):
    """`make run` (sagaproject.stack) with DEBUG on, and with DEBUG off and a secret key: the
    admin logs in over http://127.0.0.1 and has its styles (DEBUG off: collected first)."""
    port = str(free_port())
    env = production_env(
        DJANGO_DEBUG=debug,
        DJANGO_STATIC_ROOT=str(tmp_path / "static"),
        SAGAS_DATA_DIR=str(tmp_path / "data"),  # beat's schedule: a folder that does not exist
        PORT=port,
        WORKER_CONCURRENCY="1",
        # A queue of its own: its worker and beat take none of the other tests' messages.
        CELERY_TASK_DEFAULT_QUEUE=f"test-stack-{uuid.uuid4().hex[:8]}",
    )
    base = f"http://127.0.0.1:{port}"
    log = ARTIFACTS / f"stack-debug-{debug}.log"
    with log.open("w") as output:
        stack = subprocess.Popen(
            [sys.executable, "-m", "sagaproject.stack"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as Ctrl-C would
        )
    try:
        wait_for(
            lambda: stack.poll() is not None or answers(base + "/admin/login/"),
            timeout=120,
            what="make run's web server",
        )
        assert stack.poll() is None, log.read_text()[-3000:]
        assert "Site administration" in log_in_to_admin(base)
        status, content_type, _ = get(base + "/static/admin/css/base.css")
        assert status == 200 and content_type.startswith("text/css")
        assert (tmp_path / "static" / "admin").exists() == (debug == "0")
        # Beat keeps its schedule in the data folder (SAGAS_DATA_DIR), which the stack creates.
        wait_for(
            lambda: stack.poll() is not None or any((tmp_path / "data").glob("celerybeat-*")),
            timeout=30,
            what="beat to open its schedule",
        )
        assert stack.poll() is None, log.read_text()[-3000:]
    finally:
        os.killpg(stack.pid, signal.SIGINT)
        try:
            stack.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
            stack.wait()
