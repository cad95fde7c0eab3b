"""The test suite's settings: the project's, with the test kit's fault injection installed."""

from sagaproject.settings import *  # noqa: F403
from sagaproject.settings import INSTALLED_APPS

if "sagas.testing" not in INSTALLED_APPS:
    INSTALLED_APPS = [*INSTALLED_APPS, "sagas.testing"]

import json
import os

# A deploy that renames a step's callable maps its old path to the new one
# (tests/test_safe_defaults.py starts a worker with a mapping of its own).
SAGAS_RENAMED_CALLABLES = json.loads(os.environ.get("TEST_SAGAS_RENAMED_CALLABLES") or "{}")
# Exceptions whose messages are safe to show staff (tests/test_safe_defaults.py).
SAGAS_SHOWN_EXCEPTIONS = ["tests.sagadefs.BadGatewayResponse"]
# The relay sends a transition's unsent signals one second after its commit.
SAGAS_RELAY_AFTER = 1
# The site's base URL, for the signed signal URLs a step makes.
SAGAS_BASE_URL = "https://shop.example.com"
# Celery's task routes, as a project may set them (tests/test_testkit.py starts workers that
# route the saga tasks to a queue of their own).
CELERY_TASK_ROUTES = json.loads(os.environ.get("TEST_CELERY_TASK_ROUTES") or "null")
# The order saga's steps may take 15 s here, not 60: an operator's abort of a saga whose step
# is in progress waits that long, plus the hard kill's grace and a margin (the fence), before
# that step's compensation runs. The suite's steps take milliseconds.
ORDERS_STEP_TIME_LIMIT = int(os.environ.get("ORDERS_STEP_TIME_LIMIT", "15"))
