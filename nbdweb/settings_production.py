"""Production settings: the base settings plus HTTPS-only cookies, HSTS and an SSL redirect.

Use with DJANGO_SETTINGS_MODULE=nbdweb.settings_production behind a TLS-terminating proxy that
sets `X-Forwarded-Proto: https` (and strips it from clients). `python manage.py check --deploy`
is clean with these settings (tests/web/test_production.py). See docs/operations.md.
"""

import os

from nbdweb.settings import *  # noqa: F403
from nbdweb.settings import STORAGES, env_bool

DEBUG = False

# The proxy terminates TLS; this header is how Django learns the request was HTTPS.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "31536000"))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SECURE = True
X_FRAME_OPTIONS = "DENY"

# Hashed file names: whitenoise serves them with far-future cache headers. Needs
# `manage.py collectstatic` before the web starts (`make run` and the compose `init` do it).
STORAGES = {
    **STORAGES,
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = False
