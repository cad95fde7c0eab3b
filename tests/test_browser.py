"""The admin in a real browser: an operator finds a paused saga, retries it, and sees it complete;
and retries every failed saga of a definition at once, in bulk, and follows its progress.

Headless Chromium (Debian's `chromium` package, /usr/bin/chromium) driven by Playwright, against
a real `runserver` process and real Celery workers on the test database. Playwright's bundled
browsers are not used (no `playwright install`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from orders.services import order_submit
from payments.gateway import gateway_recover
from sagas.models import Saga
from tests.conftest import (
    ADDRESS,
    ARTIFACTS,
    ROOT,
    running_server,
    wait_final,
    wait_for,
    worker_env,
)
from tests.factories import ProductFactory, saga_rows

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}
PASSWORD = "browser test password 1"

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        f"Chromium is not installed at {CHROMIUM} (apt-get install chromium); "
        "the browser test runs whenever it is, and always in CI",
        allow_module_level=True,
    )

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])


@pytest.fixture
def web_server(saga_db) -> Iterator[str]:
    """`manage.py runserver` on a free port, on the test database and the workers' queue."""
    env = {**worker_env(), "DJANGO_DEBUG": "1"}  # DEBUG: the admin's CSS without collectstatic
    with running_server(env, ARTIFACTS / "runserver.log", "/admin/login/") as base:
        yield base


def in_browser(name: str, steps: Callable[[Page], None]) -> None:
    """Run `steps` in a fresh headless Chromium page; on failure, save a screenshot first.

    Playwright's sync API runs an event loop in this thread, in which Django refuses database
    queries: the steps use only the browser, and the test reads the database before and after.
    """
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(15_000)
            try:
                steps(page)
            except BaseException:
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
                (ARTIFACTS / f"{name}-failure.html").write_text(page.content())
                raise
        finally:
            browser.close()


def log_in(page: Page, base: str, username: str) -> None:
    page.goto(f"{base}/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()
    expect(page.locator("#user-tools")).to_contain_text(username)


def submit(*, token: str = "tok_ok", country: str = "GB") -> Saga:
    product = ProductFactory(stock_on_hand=10)
    saga, _ = order_submit(
        customer=None,
        items=[{"sku": product.sku, "quantity": 1}],
        shipping_address={**ADDRESS, "country": country},
        payment_token=token,
    )
    return saga


def test_operator_retries_a_paused_saga_in_the_browser(web_server):
    get_user_model().objects.create_superuser("operator", "operator@example.com", PASSWORD)
    paused = wait_final(submit(token="tok_timeout").pk)
    assert paused.status == "failed"
    gateway_recover()  # the outage is over: the retry can succeed
    detail = web_server + reverse("admin:sagas_saga_change", args=[paused.pk])

    def operator(page: Page) -> None:
        log_in(page, web_server, "operator")
        page.goto(web_server + reverse("admin:sagas_saga_changelist"))
        page.locator("#changelist-filter").get_by_role("link", name="Failed", exact=True).click()
        expect(page).to_have_url(re.compile(r"status__exact=failed"))
        page.locator(f'input[name="_selected_action"][value="{paused.pk}"]').check()
        page.select_option('select[name="action"]', "retry_sagas")
        page.click('button[name="index"]')

        # The confirmation page says what will run, and nothing has changed yet.
        plan = page.locator("table.saga-plan")
        expect(plan).to_contain_text("Resume from the failed step.")
        expect(plan.locator(".saga-plan-run li")).to_have_text(
            ["charge_payment", "reserve_inventory", "payment_confirmation", "schedule_shipment"]
        )
        expect(plan).to_contain_text("Failed")
        page.click('input[type=submit][value="Yes, retry"]')
        expect(page.locator(".messagelist")).to_contain_text("Retried 1 saga.")

        page.goto(detail)
        badge = page.locator("div.form-row.field-status_badge .saga-badge")

        def completed() -> bool:
            page.reload()
            return badge.text_content() == "Completed"

        wait_for(completed, timeout=30, what="the detail page to show the saga completed")
        # Its four steps, and the 3-D Secure wait its card skipped.
        expect(page.locator(".saga-diagram .saga-node-completed")).to_have_count(5)
        expect(page.locator("#events-group")).to_contain_text("Operator retried")

    in_browser("retry", operator)
    assert Saga.objects.get(pk=paused.pk).status == "completed"


def test_operator_retries_failed_sagas_in_bulk_in_the_browser(web_server):
    get_user_model().objects.create_superuser("operator", "operator@example.com", PASSWORD)
    failed = [saga_rows("three_steps", stopped_at=1) for _ in range(2)]
    saga_rows("three_steps", status="completed")  # not failed: the list's filter leaves it out

    def operator(page: Page) -> None:
        log_in(page, web_server, "operator")
        page.goto(web_server + reverse("admin:sagas_saga_changelist"))
        page.locator("#changelist-filter").get_by_role("link", name="Failed", exact=True).click()
        expect(page).to_have_url(re.compile(r"status__exact=failed"))
        page.get_by_role("link", name="Retry or compensate all matching…").click()

        # The preview: how many match, and what retrying them will run; nothing changed yet.
        retry = page.locator("#bulk-retry")
        expect(retry.locator("h2")).to_have_text("Retry: 2 of 2 matching sagas")
        expect(retry.locator(".saga-plan-run li")).to_have_text(["second", "third"])
        expect(page.locator("#id_status")).to_have_value("failed")
        retry.locator('input[type=submit][value="Retry 2 sagas"]').click()

        # The bulk action's page, which reloads itself until the workers are done.
        expect(page.locator(".messagelist")).to_contain_text("started on 2 sagas")
        counts = page.locator(".saga-bulk-counts")
        expect(counts).to_have_text("2 of 2: 2 done, 0 skipped, 0 failed", timeout=30_000)
        expect(page.locator("div.field-status_badge .saga-badge")).to_have_text("Completed")

    in_browser("bulk-retry", operator)
    for saga in failed:
        assert wait_final(saga.pk).status == "completed"


@pytest.mark.skipif(
    not os.environ.get("SAGAS_DOCS_SCREENSHOT"),
    reason="regenerates docs/admin-saga.png; run with SAGAS_DOCS_SCREENSHOT=1",
)
def test_docs_screenshot_of_a_compensated_saga(web_server):
    get_user_model().objects.create_superuser("operator", "operator@example.com", PASSWORD)
    # Two gateway retries, then an undeliverable address: a timeline worth showing.
    saga = wait_final(submit(token="tok_transient_2", country="AQ").pk)
    assert saga.status == "compensated"
    target = ROOT / "docs" / "admin-saga.png"
    target.parent.mkdir(exist_ok=True)

    def screenshot(page: Page) -> None:
        log_in(page, web_server, "operator")
        page.goto(web_server + reverse("admin:sagas_saga_change", args=[saga.pk]))
        page.click("#toggle-nav-sidebar")  # the page's full width for the picture
        expect(page.locator("#main")).not_to_have_class(re.compile("shifted"))
        expect(page.locator(".saga-diagram")).to_be_visible()
        page.screenshot(path=str(target), full_page=True)

    in_browser("docs-screenshot", screenshot)
