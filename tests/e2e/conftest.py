"""Fixtures of the whole-stack tests: a real Celery worker subprocess on a per-session queue."""

from tests.support.celery import celery_node_name, celery_worker  # noqa: F401
