"""Safe for tools that retry: a POST with an Idempotency-Key, sent again within 24 h, gets the
first answer and creates nothing; the same key with another body is 422; keys are per user,
expire, and a failed request leaves its key free."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from exports_app.models import Export, IdempotencyKey, Job
from exports_app.services import idempotency

pytestmark = pytest.mark.django_db

EXPORTS = "/api/v1/exports/"


def post(client, path: str, data: dict | None, key: str):
    return client.post(path, data, format="json", HTTP_IDEMPOTENCY_KEY=key)


def test_a_replay_answers_the_same_and_creates_nothing(api, default_node):
    first = post(api, EXPORTS, {"name": "idem", "size": "1G"}, "key-1")
    assert first.status_code == 201, first.content
    again = post(api, EXPORTS, {"size": "1G", "name": "idem"}, "key-1")
    assert again.status_code == 201
    assert again.json() == first.json()
    assert Export.objects.filter(name="idem").count() == 1
    assert Job.objects.count() == 1


def test_the_same_key_with_another_body_is_422_and_does_nothing(api, default_node):
    assert post(api, EXPORTS, {"name": "a", "size": "1G"}, "key-2").status_code == 201
    response = post(api, EXPORTS, {"name": "b", "size": "1G"}, "key-2")
    assert response.status_code == 422
    assert "detail" in response.json()
    assert not Export.objects.filter(name="b").exists()


def test_a_job_action_is_started_once(api, default_node):
    export = Export.objects.create(node=default_node, name="r", size=1 << 20, state="ready")
    url = f"{EXPORTS}{export.pk}/resize/"
    first = post(api, url, {"size": "2M"}, "resize-1")
    again = post(api, url, {"size": "2M"}, "resize-1")
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["job"] == first.json()["job"]
    assert Job.objects.filter(export=export).count() == 1


def test_keys_are_per_user(api, make_user, token_client, default_node):
    other = token_client(make_user(superuser=True))
    mine = post(api, EXPORTS, {"name": "u1", "size": "1G"}, "shared")
    theirs = post(other, EXPORTS, {"name": "u2", "size": "1G"}, "shared")
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert IdempotencyKey.objects.filter(key="shared").count() == 2


def test_a_failed_request_leaves_the_key_free(api, default_node):
    assert post(api, EXPORTS, {"name": "bad"}, "key-3").status_code == 400
    assert not IdempotencyKey.objects.filter(key="key-3").exists()
    assert post(api, EXPORTS, {"name": "bad", "size": "1G"}, "key-3").status_code == 201


def test_expired_keys_are_purged_and_the_request_runs_again(api, default_node):
    assert post(api, EXPORTS, {"name": "old", "size": "1G"}, "key-4").status_code == 201
    IdempotencyKey.objects.update(expires=timezone.now() - timedelta(seconds=1))
    Export.objects.filter(name="old").delete()
    again = post(api, EXPORTS, {"name": "old", "size": "1G"}, "key-4")
    assert again.status_code == 201
    assert IdempotencyKey.objects.get(key="key-4").expires > timezone.now()


def test_a_key_whose_first_request_still_runs_is_409(api, superuser, default_node):
    IdempotencyKey.objects.create(
        user=superuser,
        key="busy",
        request_digest=idempotency.digest("POST", EXPORTS, b'{"name": "x", "size": "1G"}'),
        expires=timezone.now() + timedelta(hours=1),
    )
    response = post(api, EXPORTS, {"name": "x", "size": "1G"}, "busy")
    assert response.status_code == 409
    assert not Export.objects.filter(name="x").exists()


@pytest.mark.parametrize("key", ["", "x" * 256, "bad\x01key"])
def test_a_malformed_key_is_400(api, default_node, key):
    response = post(api, EXPORTS, {"name": "m", "size": "1G"}, key)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()


def test_a_server_error_frees_the_key_so_a_retry_runs(api, default_node, monkeypatch):
    from exports_app.services import exports

    real_create = exports.create_export

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away mid-request")

    monkeypatch.setattr(exports, "create_export", broken)
    with pytest.raises(RuntimeError):
        post(api, EXPORTS, {"name": "crash", "size": "1G"}, "key-5")
    assert not IdempotencyKey.objects.filter(key="key-5").exists()
    monkeypatch.setattr(exports, "create_export", real_create)
    retry = post(api, EXPORTS, {"name": "crash", "size": "1G"}, "key-5")
    assert retry.status_code == 201, retry.content
    assert Export.objects.filter(name="crash").count() == 1


def test_a_key_left_unfinished_by_a_dead_process_is_taken_over(api, superuser, default_node):
    body = b'{"name": "orphan", "size": "1G"}'
    IdempotencyKey.objects.create(
        user=superuser,
        key="orphaned",
        request_digest=idempotency.digest("POST", EXPORTS, body),
        expires=timezone.now() + timedelta(hours=23),
    )
    IdempotencyKey.objects.filter(key="orphaned").update(
        created=timezone.now() - idempotency.IN_PROGRESS_LIMIT - timedelta(seconds=1)
    )
    retry = post(api, EXPORTS, {"name": "orphan", "size": "1G"}, "orphaned")
    assert retry.status_code == 201, retry.content
    assert IdempotencyKey.objects.get(key="orphaned").status_code == 201


def _stale_attempt(user, key: str, body: bytes):
    """A request that began with `key` and still runs past IN_PROGRESS_LIMIT (gunicorn's gthread
    workers do not kill a slow request): its key is up for takeover."""
    first = idempotency.begin(user, key, idempotency.digest("POST", EXPORTS, body)).record
    assert first is not None
    IdempotencyKey.objects.filter(pk=first.pk).update(
        created=timezone.now() - idempotency.IN_PROGRESS_LIMIT - timedelta(seconds=1)
    )
    return first


def test_a_stale_attempt_that_fails_does_not_free_its_successors_key(api, superuser, default_node):
    stale = _stale_attempt(superuser, "slow", b'{"name": "slow", "size": "1G"}')
    taken_over = post(api, EXPORTS, {"name": "slow", "size": "1G"}, "slow")
    assert taken_over.status_code == 201, taken_over.content
    # The first request now fails: it frees only its own claim, not the successor's answer.
    idempotency.abandon(stale)
    retry = post(api, EXPORTS, {"name": "slow", "size": "1G"}, "slow")
    assert retry.status_code == 201, retry.content
    assert retry.json() == taken_over.json()
    assert Export.objects.filter(name="slow").count() == 1


def test_a_stale_attempt_that_finishes_does_not_overwrite_its_successors_answer(
    api, superuser, default_node
):
    stale = _stale_attempt(superuser, "late", b'{"name": "late", "size": "1G"}')
    taken_over = post(api, EXPORTS, {"name": "late", "size": "1G"}, "late")
    assert taken_over.status_code == 201, taken_over.content
    idempotency.finish(stale, 201, {"id": -1, "name": "the stale attempt's answer"})
    retry = post(api, EXPORTS, {"name": "late", "size": "1G"}, "late")
    assert retry.json() == taken_over.json()
