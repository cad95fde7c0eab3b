"""The project as it runs in production: static files, the API docs offline, deploy settings."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from rest_framework.test import APIClient

from tests.conftest import ARTIFACTS, ROOT, running_server, worker_env


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
