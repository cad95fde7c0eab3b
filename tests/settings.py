"""The test suite's settings: the project's, with the test kit's fault injection installed."""

from sagaproject.settings import *  # noqa: F403
from sagaproject.settings import INSTALLED_APPS

if "sagas.testing" not in INSTALLED_APPS:
    INSTALLED_APPS = [*INSTALLED_APPS, "sagas.testing"]
