"""The Celery application that runs nbdweb's disk jobs."""

import os

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nbdweb.settings")

app = Celery("nbdweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def start_throughput_sampler(**kwargs) -> None:
    """Each Celery worker samples the workers' byte counters for the console's charts (the
    samplers share one Redis lock: one sample per interval, whichever worker takes it)."""
    from exports_app.services.throughput import start_sampler

    start_sampler()
