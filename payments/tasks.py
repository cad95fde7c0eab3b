"""The simulated gateway's side of the world: the webhooks it posts to the shop, over HTTP."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from celery import Task, shared_task

logger = logging.getLogger("payments")

# A provider tries a webhook again while the shop does not answer, for a while: here 8 times,
# 1 s, 2 s, 4 s ... apart, at most 30 s.
WEBHOOK_ATTEMPTS = 8
WEBHOOK_TIMEOUT = 10.0


@shared_task(bind=True, name="payments.gateway_post_webhook", max_retries=WEBHOOK_ATTEMPTS - 1)
def gateway_post_webhook(self: Task, url: str, payload: dict[str, Any]) -> int | None:
    """POST `payload` as JSON to `url`, as the payment provider's webhook; tried again while
    the shop cannot be reached or answers 5xx. Idempotent: the shop answers the same payload
    sent again with its first answer. Returns the answer's status."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "simulated-gateway/1"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        if error.code < 500:  # 409: the wait is over; 404, 410: a bad or expired URL
            logger.warning("The shop refused the gateway's webhook: %s", error.code)
            return int(error.code)
        reason: object = error.code
    except OSError as error:  # refused, reset, timed out, no such host
        reason = error
    if self.request.retries + 1 >= WEBHOOK_ATTEMPTS:
        logger.warning("The gateway's webhook never reached the shop: %s", reason)
        return None
    raise self.retry(countdown=min(30, 2**self.request.retries))
