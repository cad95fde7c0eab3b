"""Settings, read from the environment.

`DATABASE_URL` and `CELERY_BROKER_URL` name the PostgreSQL and Redis servers. Where either is
unset, an embedded, real server is started for it (see `sagaproject.embedded`).
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from sagaproject import embedded

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in {"1", "true", "yes", "on"}


DEBUG = env_bool("DJANGO_DEBUG", True)
# For local development only: with DEBUG off (production) the project refuses to start on it.
DEVELOPMENT_SECRET_KEY = "django-insecure-local-development-only"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or DEVELOPMENT_SECRET_KEY
if not DEBUG and SECRET_KEY == DEVELOPMENT_SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_DEBUG is off, as in production, but DJANGO_SECRET_KEY is not set: sessions, "
        "password reset links and signed cookies would rest on the development key that this "
        "repository publishes. Set DJANGO_SECRET_KEY to a long random value, such as the "
        "output of: python -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")

# HTTPS: on by default with DEBUG off (production), off with DEBUG on (local development over
# plain http). https://docs.djangoproject.com/en/5.2/howto/deployment/checklist/#https
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", not DEBUG)
# Django's advice is to start HSTS small (an hour) and raise it, to a year, once the site and
# its subdomains are known to work over HTTPS only: browsers then refuse http for that long.
# https://docs.djangoproject.com/en/5.2/ref/middleware/#http-strict-transport-security
SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_SECURE_HSTS_SECONDS", "0" if DEBUG else "3600"))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", not DEBUG)
# Behind a proxy that terminates TLS, the header in which it says "https" (X-Forwarded-Proto);
# only a header that the proxy always sets, never one a client can pass through.
# https://docs.djangoproject.com/en/5.2/ref/settings/#secure-proxy-ssl-header
if proxy_header := os.environ.get("DJANGO_SECURE_PROXY_SSL_HEADER"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + proxy_header.upper().replace("-", "_"), "https")

INSTALLED_APPS = [
    # Before staticfiles: runserver leaves /static/ to WhiteNoise, so development serves static
    # files as production does.
    "whitenoise.runserver_nostatic",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served as static files
    "sagas",
    *(["sagas.testing"] if env_bool("SAGAS_FAULT_INJECTION", False) else []),
    "orders",
    "payments",
    "inventory",
    "shipping",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "sagaproject.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "sagaproject.urls"
# Where an approver's signed link sends whoever must sign in first (SAGAS_APPROVAL_LINK_SIGN_IN):
# the admin's sign-in page, for the reference project's approvers are its staff.
LOGIN_URL = "admin:login"
WSGI_APPLICATION = "sagaproject.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Exported, so that the processes started from here (worker, beat) share the same servers.
os.environ["DATABASE_URL"] = os.environ.get("DATABASE_URL") or embedded.postgres_url()
os.environ["CELERY_BROKER_URL"] = os.environ.get("CELERY_BROKER_URL") or embedded.redis_url()

DATABASES = {
    "default": dj_database_url.parse(
        os.environ["DATABASE_URL"],
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
}
# Prepared statements: psycopg prepares a statement run this many times on a connection. Django
# turns them off (None) for connection poolers' sake; here no pooler stands between the
# processes and PostgreSQL. Queries keep Django's client-side binding, which never prepares;
# the saga engine binds its own statements on the server when this is set (sagas.engine.rows).
# Empty: off, as behind PgBouncer in transaction mode before 1.21.
# https://docs.djangoproject.com/en/stable/ref/databases/#server-side-parameters-binding
_prepare_threshold = os.environ.get("DATABASE_PREPARE_THRESHOLD", "5").strip()
if _prepare_threshold and not _prepare_threshold.isdigit():
    raise ImproperlyConfigured(
        f"DATABASE_PREPARE_THRESHOLD must be a whole number, or empty for none prepared: "
        f"{_prepare_threshold!r}"
    )
DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
    int(_prepare_threshold) if _prepare_threshold else None
)
# The simulated payment gateway writes its ledger on a connection of its own, outside the step's
# transaction, as a real provider would.
DATABASES["gateway"] = {**DATABASES["default"], "TEST": {"MIRROR": "default"}}
DATABASE_ROUTERS = ["payments.routers.GatewayRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
# Static files are served by WhiteNoise (https://whitenoise.readthedocs.io/en/stable/django.html).
# With DEBUG on it finds them in the apps (WHITENOISE_USE_FINDERS defaults to DEBUG); with DEBUG
# off it serves only what `manage.py collectstatic` put in STATIC_ROOT, compressed and with hashed
# names cached for years: `make run` collects them, a deployment does it when it installs.
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT") or BASE_DIR / ".local" / "static")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "sagas": {
            "handlers": ["console"],
            "level": os.environ.get("SAGAS_LOG_LEVEL", "INFO"),
            "propagate": False,
        },
        # The reference saga's receivers of sagas.signals (orders/receivers.py).
        "orders": {
            "handlers": ["console"],
            "level": os.environ.get("SAGAS_LOG_LEVEL", "INFO"),
            "propagate": False,
        },
    },
}

# Celery. Every setting below is one the saga engine relies on.
CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
# Tests and benchmarks use a queue of their own so that a running `make run` worker on the same
# Redis never takes their messages.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "sagas")
# JSON only: https://docs.celeryq.dev/en/stable/userguide/security.html#serializers
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
# No result backend: saga and step rows in PostgreSQL are the source of truth.
CELERY_TASK_IGNORE_RESULT = True
# Acknowledge after the task ran, and redeliver when a worker dies mid-task:
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-acks-late
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-reject-on-worker-lost
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A worker reserves one message at a time, so a crash strands at most one:
# https://docs.celeryq.dev/en/stable/userguide/optimizing.html#prefetch-limits
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# An unacknowledged message returns to the queue after this many seconds. It must exceed the
# longest step time limit plus its retry countdown, or a slow step would run twice:
# https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "3600")),
}
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#broker-connection-retry-on-startup
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fixup closes every database connection before and after every task unless
# this is set (it does not honour CONN_MAX_AGE: celery/celery#9824), which makes each step pay
# for a new PostgreSQL connection. Reuse a connection for this many tasks; a connection that
# broke meanwhile (a database restart) is closed and the task retried by the engine.
# https://docs.celeryq.dev/en/stable/django/first-steps-with-django.html
CELERY_DB_REUSE_MAX = int(os.environ.get("CELERY_DB_REUSE_MAX", "1000"))
CELERY_TASK_TIME_LIMIT = 15 * 60

# The recovery sweeper, and the wake, which ends the waits whose timeout is due within seconds
# of their time; both run by Celery beat:
# https://docs.celeryq.dev/en/stable/userguide/periodic-tasks.html
wake_interval = float(os.environ.get("SAGAS_WAKE_INTERVAL", "2"))
CELERY_BEAT_SCHEDULE = {
    "sagas-sweep": {
        "task": "sagas.sweep",
        "schedule": float(os.environ.get("SAGAS_SWEEP_INTERVAL", "30")),
    },
    "sagas-wake": {
        "task": "sagas.wake",
        "schedule": wake_interval,
        # A wake still queued after five intervals (the workers were away) is dropped: the
        # next one does its work, and copies never pile up behind the steps.
        # https://docs.celeryq.dev/en/stable/userguide/calling.html#expiration
        "options": {"expires": 5 * wake_interval},
    },
}
# Retention, off unless SAGAS_RETENTION is set (such as 30d): finished sagas older than that
# are deleted with their steps and events, every SAGAS_PURGE_INTERVAL seconds.
SAGAS_RETENTION = os.environ.get("SAGAS_RETENTION") or None
if SAGAS_RETENTION:
    CELERY_BEAT_SCHEDULE["sagas-purge"] = {
        "task": "sagas.purge",
        "schedule": float(os.environ.get("SAGAS_PURGE_INTERVAL", "3600")),
    }

# The saga framework (defaults in sagas.conf).
# A saga in flight with no progress for this many seconds is re-dispatched by the sweeper.
SAGAS_RECOVERY_STALE_AFTER = float(os.environ.get("SAGAS_RECOVERY_STALE_AFTER", "120"))
SAGAS_RECOVERY_MAX_ATTEMPTS = int(os.environ.get("SAGAS_RECOVERY_MAX_ATTEMPTS", "5"))
# Seconds before the sweeper's relay sends a transition's signals that no process sent.
SAGAS_RELAY_AFTER = float(os.environ.get("SAGAS_RELAY_AFTER", "30"))
# Reconciliation (sagas.engine.reconcile): the sweeper checks a finished order saga against the
# gateway's ledger this many seconds after its end, again every SAGAS_RECONCILE_EVERY, for a day.
SAGAS_RECONCILE_AFTER = float(os.environ.get("SAGAS_RECONCILE_AFTER", "60"))
SAGAS_RECONCILE_EVERY = float(os.environ.get("SAGAS_RECONCILE_EVERY", "3600"))
# Extra modules that register saga definitions (apps may also register in AppConfig.ready).
SAGAS_MODULES = [m for m in os.environ.get("SAGAS_MODULES", "").split(",") if m]
# Seconds between a step's soft time limit and the hard kill of its process.
SAGAS_HARD_TIME_LIMIT_GRACE = int(os.environ.get("SAGAS_HARD_TIME_LIMIT_GRACE", "10"))
# Prometheus metrics (sagas.metrics): counted in every process, served at /metrics by the web
# process and, where SAGAS_METRICS_WORKER_PORT is set (`make run` sets it), by each worker.
SAGAS_METRICS = env_bool("SAGAS_METRICS", True)
SAGAS_METRICS_WORKER_PORT = os.environ.get("SAGAS_METRICS_WORKER_PORT") or None
# This machine only, unless told: a Prometheus on another host sets 0.0.0.0 (or an address).
SAGAS_METRICS_WORKER_ADDRESS = os.environ.get("SAGAS_METRICS_WORKER_ADDRESS", "127.0.0.1")
SAGAS_METRICS_TOKEN = os.environ.get("SAGAS_METRICS_TOKEN", "")
# OpenTelemetry traces (sagas.tracing): with SAGAS_TRACING=1, each process appends its spans to
# SAGAS_TRACES_FILE (sagaproject/tracing.py); a real deployment exports them to its backend.
SAGAS_TRACING = env_bool("SAGAS_TRACING", False)
if SAGAS_TRACING:
    from sagaproject import tracing

    tracing.configure(
        Path(os.environ.get("SAGAS_TRACES_FILE") or embedded.data_dir() / "traces.jsonl")
    )

# The REST API (sagaproject.api): https://www.django-rest-framework.org/api-guide/settings/
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # DRF's defaults, but JSON that fails with a 400, never a 500 (deep nesting, 1e400, ...).
    "DEFAULT_PARSER_CLASSES": [
        "sagas.api.parsers.BoundedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "sagaproject.api.exception_handler",
    # Counted in the default cache (per process unless CACHES names a shared one):
    # https://www.django-rest-framework.org/api-guide/throttling/#setting-up-the-cache
    "DEFAULT_THROTTLE_RATES": {
        "orders": os.environ.get("ORDERS_THROTTLE_RATE", "60/minute"),
        "auth": os.environ.get("AUTH_THROTTLE_RATE", "30/minute"),
    },
}
# https://drf-spectacular.readthedocs.io/en/latest/settings.html
SPECTACULAR_SETTINGS = {
    "TITLE": "Sagas API",
    "DESCRIPTION": "Submit orders, follow their fulfilment sagas, and act on failed sagas.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # Swagger UI (and Redoc) from the sidecar's static files, not a CDN: the docs work offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Separate request and response components, so that read-only fields are not asked for.
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "SagaStatusEnum": "sagas.models.SagaStatus",
        "StepStatusEnum": "sagas.models.StepStatus",
        "EventKindEnum": "sagas.models.EventKind",
        "BulkActionStatusEnum": "sagas.models.BulkActionStatus",
        "BulkOperationEnum": "sagas.models.BulkOperation",
        "OrderStatusEnum": "orders.models.OrderStatus",
        "PaymentStatusEnum": "payments.models.PaymentStatus",
        "ReservationStatusEnum": "inventory.models.ReservationStatus",
        "ShipmentStatusEnum": "shipping.models.ShipmentStatus",
    },
}
# Seconds an attempt of an order saga's step may take (orders.sagas).
ORDERS_STEP_TIME_LIMIT = int(os.environ.get("ORDERS_STEP_TIME_LIMIT", "60"))
# The largest order submission accepted (orders.api); a larger body gets 413.
ORDERS_MAX_BODY_BYTES = int(os.environ.get("ORDERS_MAX_BODY_BYTES", str(64 * 1024)))
# Seconds an order paid with a 3-D Secure token (tok_3ds*) waits for the customer's
# confirmation before it is cancelled and refunded (orders.sagas; read where orders are
# submitted: the saga keeps the timeout it started with).
ORDERS_CONFIRM_TIMEOUT = float(os.environ.get("ORDERS_CONFIRM_TIMEOUT", "900"))
# Orders whose total is above this amount wait for an operator's approval before shipping
# (orders.sagas); unset or empty: none does. Read where orders are submitted.
ORDERS_REVIEW_ABOVE = os.environ.get("ORDERS_REVIEW_ABOVE", "").strip() or None
# The order saga's shapes beyond a straight line (orders.sagas; read where orders are
# submitted): reserve each line's stock at once (a group), and ship with the shipment saga as
# its child. Off by default: `make demo` turns both on.
ORDERS_RESERVE_EACH_LINE = os.environ.get("ORDERS_RESERVE_EACH_LINE", "") in ("1", "true", "yes")
ORDERS_SHIP_AS_CHILD = os.environ.get("ORDERS_SHIP_AS_CHILD", "") in ("1", "true", "yes")
# Seconds before the simulated gateway posts a 3-D Secure confirmation (tok_3ds) to the saga's
# signed URL (payments.gateway).
GATEWAY_CONFIRM_DELAY = float(os.environ.get("GATEWAY_CONFIRM_DELAY", "2"))
# Seconds before the issuer's late approval of a `tok_late_charge` charge lands in the gateway's
# ledger, from a process of its own (payments.late_charge).
GATEWAY_LATE_CHARGE_DELAY = float(os.environ.get("GATEWAY_LATE_CHARGE_DELAY", "5"))
# The site's base URL, on which the signed URLs that steps hand to external systems are made
# (the simulated gateway's 3-D Secure webhook). Locally (DEBUG on), `make run`'s own server.
SAGAS_BASE_URL = os.environ.get("SAGAS_BASE_URL") or (
    f"http://127.0.0.1:{os.environ.get('PORT') or '8000'}" if DEBUG else ""
)
# The API load benchmark's ceiling endpoint under /bench/ (bench.endpoints): only for
# `make bench-api`'s own server, never in a deployment.
BENCH_ENDPOINTS = env_bool("SAGAPROJECT_BENCH_ENDPOINTS", False)
# Links from a saga's admin page to its domain objects: a function (saga) -> [(label, url)].
SAGAS_ADMIN_LINKS = "orders.admin_links.saga_links"
# (No SAGAS_ADMIN_SEARCH_FIELDS: the admin's search finds an order's sagas by their key, the
# order id, which the order saga's definition names.)
