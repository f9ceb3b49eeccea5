"""Django settings for nbdweb, read from the environment (see the README's table)."""

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from nbdweb.datadir import data_dir, private_file, secret_from_env_or_file
from nbdworker.contract.redisconn import celery_settings as redis_celery_settings


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = data_dir()

SECRET_KEY = secret_from_env_or_file("SECRET_KEY", "secret_key")
DEBUG = env_bool("DEBUG")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "django_filters",
    "drf_spectacular",
    # Swagger UI and ReDoc as the app's own static files: no third-party URL at runtime.
    "drf_spectacular_sidecar",
    "simple_history",
    "django_htmx",
    "exports_app",
    # The admin with the console's site (last: exports_app's admin templates come first).
    "exports_app.console.apps.ConsoleAdminConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    # ETag on every GET answer that has none (lists; objects bring their own) and 304 when
    # If-None-Match names it.
    "django.middleware.http.ConditionalGetMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "simple_history.middleware.HistoryRequestMiddleware",
    "nbdweb.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "nbdweb.urls"

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

WSGI_APPLICATION = "nbdweb.wsgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}",
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
        # A kept connection is checked before a request uses it: after a database restart the
        # next request reconnects instead of failing on the dead connection.
        conn_health_checks=True,
    )
}

_database = DATABASES["default"]
if _database["ENGINE"].endswith("sqlite3") and _database["NAME"] not in ("", ":memory:"):
    # Password hashes and token digests: created 0600 before SQLite makes it 0644.
    private_file(Path(_database["NAME"]))

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
# whitenoise warns on every request when the directory is missing (before `collectstatic`).
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = DEBUG

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- nbdweb ---------------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NBDWORKER_NODE = os.environ.get("NBDWORKER_NODE", "default")
# Where the default node keeps its disk images; nbdworker serves only paths under its roots.
NBDWEB_STORAGE_ROOT = Path(os.environ.get("NBDWEB_STORAGE_ROOT") or DATA_DIR / "images")
# The only directories this host's Celery jobs touch files in, whatever a node's storage_root in
# the database says: the same variable as nbdworker's (exports_app/services/storage.py).
NBDWEB_JOB_STORAGE_ROOTS = [
    root for root in os.environ.get("NBDWORKER_STORAGE_ROOTS", "").split(":") if root
] or [str(NBDWEB_STORAGE_ROOT)]
# The NBD address clients use for the default node (goes into export URIs).
NBD_LISTEN = os.environ.get("NBD_LISTEN", "127.0.0.1:10809")
# Shared by web and worker: signs config snapshots in Redis.
NBDWEB_CONFIG_SECRET = secret_from_env_or_file("NBDWEB_CONFIG_SECRET", "config_secret")
# Encrypts certificate private keys at rest; never stored in the database.
NBDWEB_KEY_ENCRYPTION_KEY = secret_from_env_or_file(
    "NBDWEB_KEY_ENCRYPTION_KEY", "key_encryption_key"
)

# The broker and result backend from the same REDIS_URL as every other client: a Sentinel URL
# becomes kombu's `sentinel://...;sentinel://...` with the master's name in the transport
# options, and with TLS Celery verifies the server like the rest (REDIS_TLS_* files).
try:
    _CELERY_REDIS = redis_celery_settings(REDIS_URL)
except ValueError as exc:  # a malformed Sentinel URL: say which setting, never its password
    raise ImproperlyConfigured(f"REDIS_URL: {exc}") from None
CELERY_BROKER_URL = _CELERY_REDIS["broker_url"]
CELERY_RESULT_BACKEND = _CELERY_REDIS["result_backend"]
if "broker_use_ssl" in _CELERY_REDIS:
    CELERY_BROKER_USE_SSL = _CELERY_REDIS["broker_use_ssl"]
    CELERY_REDIS_BACKEND_USE_SSL = _CELERY_REDIS["redis_backend_use_ssl"]
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = _CELERY_REDIS.get("result_backend_transport_options", {})
if "redis_username" in _CELERY_REDIS:
    CELERY_REDIS_USERNAME = _CELERY_REDIS["redis_username"]
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = f"node.{NBDWORKER_NODE}"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "knox.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["exports_app.api.permissions.ModelPermissions"],
    # Every request body is JSON (no file uploads, no forms): the schema offers JSON only, so
    # generated clients have one way to send each body.
    "DEFAULT_PARSER_CLASSES": ["exports_app.api.parsers.NBDWebJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "exports_app.api.schema.NBDWebAutoSchema",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}

# API tokens (django-rest-knox): only a SHA-512 digest is stored, so a copy of the database hands
# out no working token; each token expires and can be revoked on its own (docs/security.md).
REST_KNOX = {
    "TOKEN_TTL": timedelta(days=int(os.environ.get("NBDWEB_API_TOKEN_TTL_DAYS", "90"))),
    "AUTH_HEADER_PREFIX": "Token",
    # Makes a leaked token recognisable to secret scanners.
    "TOKEN_PREFIX": "nbdweb_",
    "AUTO_REFRESH": False,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "nbdweb API",
    "DESCRIPTION": (
        "Manage NBD exports, TLS policies and certificates. Authenticate with "
        "`Authorization: Token <token>`. Every error (4xx) has one shape, `Error` "
        "(field errors, if any, under `errors`). Objects carry an `ETag`; send it back in "
        "`If-Match` to change or delete only what you read. POSTs that create objects or start "
        "jobs take an `Idempotency-Key` header, so a retry creates nothing twice."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Operations are tagged and named by resource (`exports_create`), not by `v1`.
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    # A generated client gets a model for what it sends (no read-only fields) apart from the
    # one for what it reads.
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "ExportStateEnum": "exports_app.choices.ExportState",
        "JobStateEnum": "exports_app.choices.JobState",
        "JobKindEnum": "exports_app.choices.JobKind",
        "CertificateKindEnum": "exports_app.choices.CertificateKind",
        "KeyAlgorithmEnum": "exports_app.choices.KeyAlgorithm",
        "TLSModeEnum": "exports_app.choices.TLSMode",
        "ClientVerificationEnum": "exports_app.choices.ClientVerification",
        "TLSVersionEnum": "exports_app.choices.TLSVersion",
    },
    "TAGS": [
        {"name": "exports", "description": "NBD exports: a named disk image served by a node."},
        {"name": "jobs", "description": "Disk work on an export's image, run by its node."},
        {"name": "sessions", "description": "Live NBD client sessions, as the workers report."},
        {"name": "nodes", "description": "Worker nodes: one nbdworker and its storage root."},
        {"name": "tls-policies", "description": "How a node serves TLS and whom it trusts."},
        {"name": "authorities", "description": "Certificate authorities, internal or imported."},
        {"name": "certificates", "description": "Server and client certificates."},
    ],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "exports_app.api.schema.describe_fields",
    ],
    "SWAGGER_UI_DIST": "SIDECAR",
    # No badge fetched from the public validator service.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False}},
}

# --- exports_app (issue 5) ------------------------------------------------------------------
# Certificates expiring within this many days are flagged in the API and the admin.
NBDWEB_CERT_EXPIRY_WARNING_DAYS = int(os.environ.get("NBDWEB_CERT_EXPIRY_WARNING_DAYS", "30"))
# Validity of certificates issued without an explicit `validity_days`.
NBDWEB_CERT_DEFAULT_VALIDITY_DAYS = int(os.environ.get("NBDWEB_CERT_DEFAULT_VALIDITY_DAYS", "365"))
NBDWEB_CA_DEFAULT_VALIDITY_DAYS = int(os.environ.get("NBDWEB_CA_DEFAULT_VALIDITY_DAYS", "3650"))
# --- end exports_app --------------------------------------------------------------------------

# --- jobs and logging (issue 7) ---------------------------------------------------------------
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # gunicorn's workers, Celery and the tests' Celery worker subprocess write the one file at
    # once. WAL lets readers run beside the writer; IMMEDIATE takes the write lock when a
    # transaction begins, so a transaction that read first never fails to upgrade its lock
    # ("database is locked" at once, whatever the timeout); `timeout` is the busy timeout in
    # seconds for which a writer waits for the lock.
    sqlite_options = DATABASES["default"].setdefault("OPTIONS", {})
    sqlite_options.setdefault("timeout", 20)
    sqlite_options.setdefault("transaction_mode", "IMMEDIATE")
    sqlite_options.setdefault("init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL")
    # The test database must be a file, not :memory:, for the e2e tests' Celery worker
    # subprocess to see it; one per test process so parallel runs never share it.
    DATABASES["default"].setdefault("TEST", {}).setdefault(
        "NAME", os.path.join(tempfile.gettempdir(), f"nbdweb-test-{os.getpid()}.sqlite3")
    )

# Celery logs through LOGGING below (plain or JSON) instead of installing its own handlers.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# A pool process that dies mid-job (OOM killer, SIGKILL) puts its job back on the queue instead
# of dropping it: every job is safe to run again, and a dropped one would stay "running".
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# Unacked jobs come back to another worker after this long (Redis broker): longer than any job.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    **_CELERY_REDIS.get("broker_transport_options", {}),
    "visibility_timeout": int(os.environ.get("NBDWEB_JOB_VISIBILITY_TIMEOUT", "21600")),
}

LOG_FORMAT = os.environ.get("LOG_FORMAT", "plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}")
LOGGING["formatters"]["json"] = {"()": "nbdweb.logging.JSONFormatter"}
LOGGING["handlers"]["console"]["formatter"] = LOG_FORMAT
# --- end jobs and logging ---------------------------------------------------------------------

# --- events and webhooks (issue 17) -----------------------------------------------------------
# The event stream in Redis keeps about this many events (older ones are trimmed).
NBDWEB_EVENTS_MAX_LENGTH = int(os.environ.get("NBDWEB_EVENTS_MAX_LENGTH", "10000"))
# The Celery queue of webhook deliveries and the periodic observers: the default node's.
NBDWEB_EVENTS_QUEUE = os.environ.get("NBDWEB_EVENTS_QUEUE") or CELERY_TASK_DEFAULT_QUEUE
# Webhook URLs that resolve to private, loopback or link-local addresses are refused unless on.
NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = env_bool("NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES")
NBDWEB_WEBHOOK_MAX_ATTEMPTS = int(os.environ.get("NBDWEB_WEBHOOK_MAX_ATTEMPTS", "8"))
# Retries wait base, 2 base, 4 base, ... seconds, at most the max.
NBDWEB_WEBHOOK_RETRY_BASE_SECONDS = float(os.environ.get("NBDWEB_WEBHOOK_RETRY_BASE_SECONDS", "10"))
NBDWEB_WEBHOOK_RETRY_MAX_SECONDS = float(os.environ.get("NBDWEB_WEBHOOK_RETRY_MAX_SECONDS", "3600"))
# Seconds between two looks at the workers' heartbeats and sessions (node and session events).
NBDWEB_OBSERVE_INTERVAL = float(os.environ.get("NBDWEB_OBSERVE_INTERVAL", "2"))
# A server-sent-events connection holds a gunicorn thread: it ends after this many seconds and
# the client reconnects with Last-Event-ID (EventSource does so by itself).
NBDWEB_EVENT_STREAM_MAX_SECONDS = float(os.environ.get("NBDWEB_EVENT_STREAM_MAX_SECONDS", "300"))
# Each open stream holds a gunicorn thread (4 workers x 2 threads): caps leave threads for the
# rest of the API. One stream more answers 429 with Retry-After.
NBDWEB_EVENT_STREAMS_PER_USER = int(os.environ.get("NBDWEB_EVENT_STREAMS_PER_USER", "2"))
NBDWEB_EVENT_STREAMS_TOTAL = int(os.environ.get("NBDWEB_EVENT_STREAMS_TOTAL", "4"))
NBDWEB_EVENT_STREAM_RETRY_AFTER_SECONDS = int(
    os.environ.get("NBDWEB_EVENT_STREAM_RETRY_AFTER_SECONDS", "30")
)
# `celery beat` keeps its last run times here, not in the working directory.
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "observe-workers": {
        "task": "exports_app.observe_workers",
        "schedule": NBDWEB_OBSERVE_INTERVAL,
        "options": {"queue": NBDWEB_EVENTS_QUEUE, "expires": NBDWEB_OBSERVE_INTERVAL * 2},
    },
    # Catches up the nodes whose publisher died after their change committed
    # (exports_app/services/publisher.py); a live publisher is not waited for.
    "publish-pending": {
        "task": "exports_app.publish_pending",
        "schedule": NBDWEB_OBSERVE_INTERVAL,
        "options": {"queue": NBDWEB_EVENTS_QUEUE, "expires": NBDWEB_OBSERVE_INTERVAL * 2},
    },
    "check-certificate-expiry": {
        "task": "exports_app.check_certificate_expiry",
        "schedule": 3600.0,
        "options": {"queue": NBDWEB_EVENTS_QUEUE},
    },
}
# One enum for the event kinds in the OpenAPI schema (events, webhooks' event_types).
SPECTACULAR_SETTINGS.setdefault("ENUM_NAME_OVERRIDES", {})["EventKindEnum"] = (
    "exports_app.services.events.EVENT_KIND_CHOICES"
)
# --- end events and webhooks ------------------------------------------------------------------
