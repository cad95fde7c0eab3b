"""While PostgreSQL is unreachable the API answers 503 with a short JSON body."""

from __future__ import annotations

import pytest
from django.db import connection


@pytest.fixture
def database_down(transactional_db):
    """Point the default connection at a port where nothing listens, then restore it."""
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT="9", OPTIONS={"connect_timeout": 2})
    yield
    connection.close()
    connection.settings_dict.clear()
    connection.settings_dict.update(saved)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/sagas/"),
        ("post", "/api/sagas/00000000-0000-0000-0000-000000000000/retry/"),  # operator action
    ],
)
def test_api_answers_503_without_a_traceback(client, database_down, method, path):
    response = getattr(client, method)(path, HTTP_AUTHORIZATION="Token not-checked-yet")
    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"detail"}
    assert "Traceback" not in response.content.decode()
    assert response["Retry-After"] == "5"
