"""Sphinx configuration of the documentation site: MyST Markdown pages, the Furo theme.

`make docs` builds it with warnings as errors; `.readthedocs.yaml` builds it on Read the Docs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

# autodoc imports the framework's modules, which need Django's app registry. The reference
# project's settings start embedded PostgreSQL and Redis servers where these are unset; the
# build never connects to either, so placeholders keep it free of servers.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")
os.environ.setdefault("DATABASE_URL", "postgres://localhost/docs")
os.environ.setdefault("CELERY_BROKER_URL", "redis://localhost:6379/0")
django.setup()

import sagas  # noqa: E402

project = "django-sagas"
author = "django-sagas contributors"
copyright = "2026, django-sagas contributors"
release = sagas.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    # The REST API's endpoints, from its OpenAPI schema (docs/_ext/sagas_openapi.py).
    "sagas_openapi",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]

# Links to a page's heading (`page.md#heading`), as GitHub renders them.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# The docstrings use Markdown's `code`, which reStructuredText reads as a default role.
default_role = "literal"

# Intersphinx fetches each inventory over the network. This machine and CI's reach package
# registries only, where that fetch fails (a warning, fatal with -W), so the mapping is used
# only where SAGAS_DOCS_INTERSPHINX is set: .readthedocs.yaml sets it.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
if os.environ.get("SAGAS_DOCS_INTERSPHINX"):
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "django": (
            "https://docs.djangoproject.com/en/stable/",
            "https://docs.djangoproject.com/en/stable/_objects/",
        ),
        "celery": ("https://docs.celeryq.dev/en/stable/", None),
    }

html_theme = "furo"
html_title = "django-sagas"
