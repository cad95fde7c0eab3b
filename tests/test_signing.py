"""Signed signal URLs: what a token names, how long it lives, a key rotation, and the answers
to forged, tampered, expired and orphaned tokens (no worker needed: nothing is applied)."""

from __future__ import annotations

import time
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured
from rest_framework.test import APIClient

from sagas.definitions import StepContext
from sagas.models import SagaSignal
from sagas.signing import BadSignalToken, read_signal_token, signal_path, signal_token


def test_a_token_names_the_saga_and_the_event_and_nothing_else():
    saga_id = uuid.uuid4()
    assert read_signal_token(signal_token(saga_id, "payment_confirmed")) == (
        str(saga_id),
        "payment_confirmed",
    )
    token = signal_token(saga_id, "payment_confirmed")
    for forged in (token[:-2] + "xx", "abc", "", token.replace(":", "", 1)):
        with pytest.raises(BadSignalToken) as bad:
            read_signal_token(forged)
        assert not bad.value.expired


def test_a_token_expires_and_survives_a_key_rotation(settings):
    token = signal_token(uuid.uuid4(), "payment_confirmed")
    old = settings.SECRET_KEY
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-new-key-" + "x" * 50, [old]
    read_signal_token(token)  # signed with a fallback key: still taken
    settings.SECRET_KEY_FALLBACKS = []
    with pytest.raises(BadSignalToken):
        read_signal_token(token)
    settings.SECRET_KEY, settings.SAGAS_SIGNAL_URL_MAX_AGE = old, 0
    time.sleep(1.1)
    with pytest.raises(BadSignalToken) as expired:
        read_signal_token(token)
    assert expired.value.expired


def test_a_step_needs_the_base_url_for_an_absolute_url(settings):
    ctx = StepContext(uuid.uuid4(), "charge", {}, {}, 1)
    settings.SAGAS_BASE_URL = "https://shop.example.com/"
    assert ctx.signal_url("payment_confirmed").startswith(
        "https://shop.example.com/api/sagas/signals/"
    )
    settings.SAGAS_BASE_URL = ""
    with pytest.raises(ImproperlyConfigured, match="SAGAS_BASE_URL"):
        ctx.signal_url("payment_confirmed")


@pytest.mark.django_db
def test_bad_tokens_get_a_4xx_and_change_nothing(settings):
    client = APIClient()
    orphan = signal_path(uuid.uuid4(), "payment_confirmed")  # no such saga
    assert client.post(orphan, {"reference": "x"}, format="json").status_code == 404
    assert client.post("/api/sagas/signals/forged/", {}, format="json").status_code == 404
    settings.SAGAS_SIGNAL_URL_MAX_AGE = 0
    expired = signal_path(uuid.uuid4(), "payment_confirmed")
    time.sleep(1.1)
    answer = client.post(expired, {"reference": "x"}, format="json")
    assert answer.status_code == 410 and "expired" in answer.json()["detail"]
    assert client.get(orphan).status_code == 405
    assert not SagaSignal.objects.exists()
