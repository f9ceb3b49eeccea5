"""Suite-wide pytest configuration."""

from collections.abc import Iterator

import pytest
from django.conf import settings


def pytest_report_header(config) -> list[str]:
    engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    return [f"nbdweb: database={engine} redis={settings.REDIS_URL}"]


@pytest.fixture(scope="session", autouse=True)
def job_storage_roots(tmp_path_factory) -> Iterator[list[str]]:
    """In-process jobs may touch files under the session's temporary directory, where every
    test's storage roots are (the Celery worker subprocess gets the same root,
    tests/support/celery.py); a directory made elsewhere is outside this host's roots."""
    saved = settings.NBDWEB_JOB_STORAGE_ROOTS
    settings.NBDWEB_JOB_STORAGE_ROOTS = [str(tmp_path_factory.getbasetemp())]
    yield settings.NBDWEB_JOB_STORAGE_ROOTS
    settings.NBDWEB_JOB_STORAGE_ROOTS = saved


def pytest_collection_modifyitems(config, items) -> None:
    # A transactional test without serialized_rollback ends with a flush that makes the content
    # types anew under other ids; every serialized test after it then fails to load its data.
    plain = []
    for item in items:
        marker = item.get_closest_marker("django_db")
        if marker is None:
            continue
        wants_transaction = marker.kwargs.get("transaction", False)
        serialized = marker.kwargs.get("serialized_rollback", False)
        if wants_transaction and not serialized:
            plain.append(item.nodeid)
    if plain:
        raise pytest.UsageError(
            "transactional tests need serialized_rollback=True as well: " + ", ".join(plain)
        )
