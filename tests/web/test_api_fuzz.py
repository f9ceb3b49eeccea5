"""Property-based fuzzing of the whole REST API with schemathesis (issue 15).

Every operation in the live `/api/schema/` is called, authenticated as a superuser, with
examples generated from the schema (valid and invalid ones). Each response must not be a 5xx
and must conform to the schema: a documented status code and content type (the body's schema:
see below); and each operation must refuse a call without credentials. The
example count is bounded and derandomized, so CI makes the same calls every time.

Jobs are not sent to Celery here (their message is dropped at the seam,
provisioning._send): the fuzzer exercises the API, tests/e2e/test_jobs.py the jobs.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import schemathesis
from django.contrib.auth.models import User
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from knox.models import AuthToken
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from exports_app.services import provisioning

EXAMPLES_PER_OPERATION = 3
_raw_schema: dict = {}

schema = schemathesis.pytest.from_fixture("live_api_schema")


@pytest.fixture
def fuzz_headers(
    transactional_db, django_db_serialized_rollback, default_node, monkeypatch
) -> dict[str, str]:
    """A superuser's token, and jobs that go nowhere. The live server's transactional test
    flushes the database; serialized_rollback puts back what the migrations made, like
    tests/web/test_api_schema.py's live-server tests, which would otherwise find it twice."""
    monkeypatch.setattr(provisioning, "_send", lambda *args: None)
    user = User.objects.create_superuser("fuzzer", password="fuzz-password")
    _, token = AuthToken.objects.create(user=user)
    return {"Authorization": f"Token {token}"}


@pytest.fixture
def live_api_schema(live_server, fuzz_headers):
    # Fetched from the live server once: generating it takes a while, and it never changes.
    if not _raw_schema:
        request = urllib.request.Request(f"{live_server.url}/api/schema/", headers=fuzz_headers)
        request.add_header("Accept", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            _raw_schema.update(json.load(response))
    return schemathesis.openapi.from_dict(_raw_schema)


@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_without_5xx_and_as_documented(case, fuzz_headers, live_server):
    # Left out: whether generated "invalid" data is rejected and "valid" data accepted. The
    # schema cannot say that a filter's ID must exist, and DRF's pagination ignores a bad
    # `offset` by design; both are questions of the schema's precision (issue 17), not of
    # crashes or wrong answers.
    case.call_and_validate(
        base_url=live_server.url,
        headers=fuzz_headers,
        timeout=30,
        excluded_checks=[
            negative_data_rejection,
            positive_data_acceptance,
        ],
    )
