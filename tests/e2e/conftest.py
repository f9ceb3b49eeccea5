"""Fixtures of the whole-stack tests: a real Celery worker subprocess on a per-session queue,
an API client with a superuser's token, and in-process jobs for tests about something else."""

import uuid
from collections.abc import Iterator

import pytest
from django.contrib.auth.models import User
from knox.models import AuthToken
from rest_framework.test import APIClient

from nbdweb.celery import app as celery_app
from tests.support.celery import celery_node_name, celery_worker  # noqa: F401


@pytest.fixture
def api() -> APIClient:
    user = User.objects.create_superuser(f"admin-{uuid.uuid4().hex[:8]}", password="pw-e2e")
    client = APIClient()
    _, token = AuthToken.objects.create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


@pytest.fixture
def eager_jobs() -> Iterator[None]:
    """Run the disk jobs in-process (the same `run_job` a Celery worker runs, on commit), for
    tests about something else; tests/e2e/test_jobs.py drives a real Celery worker."""
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False
