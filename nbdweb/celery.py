"""The Celery application that runs nbdweb's disk jobs."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nbdweb.settings")

app = Celery("nbdweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
