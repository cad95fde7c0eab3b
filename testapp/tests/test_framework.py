"""The framework on a project of `sagas` alone: no domain app, no reference settings.

A saga's failure matrix on the test kit's worker (every step failing in every way, each case
checked against the framework's guarantees), then the admin and the API over the sagas it left.
"""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from sagas import registered
from sagas.models import Saga
from sagas.testing import FailureMatrix

MATRIX = FailureMatrix(
    "transfer", make_input=lambda: {"transfer_id": uuid.uuid4().hex, "amount": 10}
)
pytestmark = [pytest.mark.system, pytest.mark.django_db(transaction=True)]


@MATRIX.parametrize()
def test_transfer(saga_worker, case):
    case.run(saga_worker).assert_guarantees()


def test_the_admin_and_the_api_on_a_project_of_sagas_alone(saga_worker):
    assert set(registered()) == {"transfer"}
    case = next(c for c in MATRIX.cases() if "fails for good" in str(c))
    case.run(saga_worker).assert_guarantees()
    saga = Saga.objects.get()
    staff = get_user_model().objects.create_superuser("operator", "op@example.com", "x")
    client = Client()
    client.force_login(staff)
    listed = client.get(reverse("admin:sagas_saga_changelist"))
    assert listed.status_code == 200 and str(saga.pk)[:8] in listed.content.decode()
    page = client.get(reverse("admin:sagas_saga_change", args=[saga.pk]))
    assert page.status_code == 200 and "saga-diagram" in page.content.decode()
    detail = client.get(f"/api/sagas/{saga.pk}/")
    assert detail.status_code == 200
    assert detail.json()["status"] == saga.status
    assert [step["name"] for step in detail.json()["steps"]] == ["debit", "credit", "notify"]
