"""Settings of the framework's test project: the tutorial's, with the test kit installed.

`DATABASE_URL` and `CELERY_BROKER_URL` name the servers, as for the reference project; where
either is unset, the repository's embedded servers are started for it.
"""

import os

import dj_database_url

from sagaproject import embedded

SECRET_KEY = "the framework's tests"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "sagas",
    "sagas.testing",
    "testapp",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "testapp.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASE_URL = os.environ.get("DATABASE_URL") or embedded.postgres_url()
DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or embedded.redis_url()
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# What beat sends, as in the tutorial (`manage.py check` warns of waits without the wake).
CELERY_BEAT_SCHEDULE = {
    "sagas-sweep": {"task": "sagas.sweep", "schedule": 30.0},
    "sagas-wake": {"task": "sagas.wake", "schedule": 2.0, "options": {"expires": 10}},
}

SAGAS_MODULES = ["testapp.sagas"]
SAGAS_HARD_TIME_LIMIT_GRACE = 2
