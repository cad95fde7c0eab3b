"""The framework's settings: each read through `sagas.conf`, with the default the docs give."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from sagas import conf

ROOT = Path(__file__).resolve().parent.parent
# The framework and the reference saga's apps: none of them reads a SAGAS_* setting itself.
READERS = ("sagas", "orders", "payments", "inventory", "shipping")
DEFAULTS = [
    ("SAGAS_HARD_TIME_LIMIT_GRACE", conf.hard_time_limit_grace, 10),
    ("SAGAS_RECOVERY_STALE_AFTER", conf.recovery_stale_after, timedelta(seconds=300)),
    ("SAGAS_RECOVERY_MAX_ATTEMPTS", conf.recovery_max_attempts, 5),
    ("SAGAS_RELAY_AFTER", conf.relay_after, timedelta(seconds=30)),
    ("SAGAS_BASE_URL", conf.base_url, ""),
    ("SAGAS_SIGNAL_URL_MAX_AGE", conf.signal_url_max_age, 30 * 86400),
    ("SAGAS_APPROVAL_LINK_MAX_AGE", conf.approval_link_max_age, 7 * 86400),
    ("SAGAS_APPROVAL_LINK_SIGN_IN", conf.approval_link_sign_in, True),
    ("SAGAS_MODULES", conf.modules, ()),
    ("SAGAS_ADMIN_LINKS", conf.admin_links_hook, None),
    ("SAGAS_ADMIN_SEARCH_FIELDS", conf.admin_search_fields, ()),
    ("SAGAS_RETENTION", conf.retention, None),
    ("SAGAS_METRICS", conf.metrics, False),
    ("SAGAS_METRICS_WORKER_PORT", conf.metrics_worker_port, None),
    ("SAGAS_METRICS_WORKER_ADDRESS", conf.metrics_worker_address, "0.0.0.0"),
    ("SAGAS_METRICS_TOKEN", conf.metrics_token, ""),
    ("SAGAS_TRACING", conf.tracing, False),
    ("SAGAS_BULK_MAX_SAGAS", conf.bulk_max_sagas, 10_000),
    ("SAGAS_BULK_BATCH_SIZE", conf.bulk_batch_size, 100),
    ("SAGAS_LIST_COUNT_LIMIT", conf.list_count_limit, 1000),
    ("SAGAS_ON_UNEXPECTED_ERROR", conf.on_unexpected_error, "pause"),
    ("SAGAS_RENAMED_CALLABLES", conf.renamed_callables, {}),
    ("SAGAS_SHOWN_EXCEPTIONS", conf.shown_exceptions, ()),
    ("SAGAS_RECONCILE_WINDOW", conf.reconcile_window, timedelta(days=1)),
    ("SAGAS_RECONCILE_AFTER", conf.reconcile_after, timedelta(seconds=60)),
    ("SAGAS_RECONCILE_EVERY", conf.reconcile_every, timedelta(hours=1)),
    ("SAGAS_RECONCILE_BATCH", conf.reconcile_batch_size, 200),
    ("SAGAS_RECONCILE_BUDGET", conf.reconcile_budget, timedelta(seconds=0.5)),
]


def conf_setting_names() -> set[str]:
    return set(re.findall(r'"(SAGAS_[A-Z_]+)"', (ROOT / "sagas" / "conf.py").read_text()))


@pytest.mark.parametrize(("name", "read", "default"), DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_the_default_of_an_unset_setting(settings, name, read, default):
    if hasattr(settings, name):
        delattr(settings, name)
    assert read() == default


def test_a_set_setting_is_read_when_used(settings):
    settings.SAGAS_HARD_TIME_LIMIT_GRACE = "3"
    settings.SAGAS_RECOVERY_STALE_AFTER = 7.5
    settings.SAGAS_RECOVERY_MAX_ATTEMPTS = "2"
    settings.SAGAS_RELAY_AFTER = "4"
    settings.SAGAS_MODULES = ["tests.sagadefs"]
    settings.SAGAS_ADMIN_LINKS = "orders.admin_links.saga_links"
    settings.SAGAS_ADMIN_SEARCH_FIELDS = ["input__order_id"]
    settings.SAGAS_RETENTION = "30d"
    settings.SAGAS_METRICS_WORKER_PORT = "9808"
    settings.SAGAS_METRICS_TOKEN = None
    settings.SAGAS_BULK_MAX_SAGAS = "500"
    settings.SAGAS_BULK_BATCH_SIZE = 20
    settings.SAGAS_LIST_COUNT_LIMIT = "50"
    settings.SAGAS_RECONCILE_WINDOW = "12h"
    settings.SAGAS_RECONCILE_AFTER = 0
    settings.SAGAS_RECONCILE_EVERY = timedelta(minutes=5)
    settings.SAGAS_RECONCILE_BATCH = "50"
    assert conf.hard_time_limit_grace() == 3
    assert conf.recovery_stale_after() == timedelta(seconds=7.5)
    assert conf.recovery_max_attempts() == 2
    assert conf.relay_after() == timedelta(seconds=4)
    assert conf.modules() == ("tests.sagadefs",)
    assert conf.admin_search_fields() == ("input__order_id",)
    assert conf.retention() == timedelta(days=30)
    assert conf.metrics_worker_port() == 9808
    assert conf.metrics_token() == ""
    assert (conf.bulk_max_sagas(), conf.bulk_batch_size()) == (500, 20)
    assert conf.list_count_limit() == 50
    assert conf.reconcile_window() == timedelta(hours=12)
    assert (conf.reconcile_after(), conf.reconcile_every()) == (timedelta(0), timedelta(minutes=5))
    assert conf.reconcile_batch_size() == 50
    settings.SAGAS_RECONCILE_WINDOW = 0
    assert conf.reconcile_window() is None  # the sweeper's checks are off
    from orders.admin_links import saga_links

    assert conf.admin_links_hook() is saga_links


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SAGAS_ON_UNEXPECTED_ERROR", "ignore"),
        ("SAGAS_RENAMED_CALLABLES", ["shop.steps.old"]),
        ("SAGAS_RENAMED_CALLABLES", {"shop.steps.old": 3}),
        ("SAGAS_RECONCILE_AFTER", "soon"),
        ("SAGAS_RECONCILE_WINDOW", -5),
    ],
)
def test_a_bad_value_is_refused_with_a_clear_message(settings, name, value):
    setattr(settings, name, value)
    readers = {
        "SAGAS_ON_UNEXPECTED_ERROR": conf.on_unexpected_error,
        "SAGAS_RECONCILE_AFTER": conf.reconcile_after,
        "SAGAS_RECONCILE_WINDOW": conf.reconcile_window,
    }
    read = readers.get(name, conf.renamed_callables)
    with pytest.raises(ImproperlyConfigured, match=name):
        read()


def test_every_setting_of_conf_is_tested_here():
    assert conf_setting_names() == {name for name, _, _ in DEFAULTS}


def test_no_module_reads_a_sagas_setting_but_conf():
    read = re.compile(r"settings\.SAGAS_|getattr\(\s*settings\s*,\s*[\"']SAGAS_")
    readers = [
        str(path.relative_to(ROOT))
        for folder in READERS
        for path in (ROOT / folder).rglob("*.py")
        if path != ROOT / "sagas" / "conf.py" and read.search(path.read_text())
    ]
    assert readers == []


def test_every_setting_is_in_the_docs_settings_table_with_its_default():
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    section = page.split("## Settings of the framework", 1)[1].split("\n#", 1)[0]
    documented = set(re.findall(r"^\| `(SAGAS_[A-Z_]+)` \| [^|]+ \|", section, re.MULTILINE))
    assert documented == conf_setting_names()
