"""The project as it runs in production: static files, the API docs offline, deploy settings."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from django.conf import settings
from django.contrib.staticfiles import finders
from rest_framework.test import APIClient


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
