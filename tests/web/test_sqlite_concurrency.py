"""The `make run` default (SQLite) survives concurrent API writers (issue 15, item 6).

Without WAL, IMMEDIATE transactions and a busy timeout, parallel creates against gunicorn's
worker processes answered 500 "database is locked": a deferred transaction that reads first
cannot upgrade to a write lock while another writer holds it, and SQLite fails it at once
instead of waiting.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.support.liveweb import live_gunicorn

WRITERS = 24


def test_parallel_creates_and_updates_on_sqlite_all_succeed(tmp_path):
    with live_gunicorn(tmp_path, workers=4, threads=3) as web:
        start = threading.Barrier(WRITERS)

        def create(index: int):
            start.wait()
            return web.request("POST", "/api/v1/exports/", {"name": f"disk{index}", "size": "1M"})

        with ThreadPoolExecutor(WRITERS) as pool:
            created = list(pool.map(create, range(WRITERS)))
        failures = [(r.status, r.body[:200]) for r in created if r.status != 201]
        assert failures == [], web.log_path.read_text()[-3000:]

        ids = [r.json()["id"] for r in created]
        start = threading.Barrier(WRITERS)

        def update(export_id: int):
            start.wait()
            return web.request(
                "PATCH", f"/api/v1/exports/{export_id}/", {"description": f"changed {export_id}"}
            )

        with ThreadPoolExecutor(WRITERS) as pool:
            updated = list(pool.map(update, ids))
        failures = [(r.status, r.body[:200]) for r in updated if r.status != 200]
        assert failures == [], web.log_path.read_text()[-3000:]

        listed = web.request("GET", f"/api/v1/exports/?limit={WRITERS * 2}").json()
        assert listed["count"] == WRITERS
        assert {e["description"] for e in listed["results"]} == {f"changed {i}" for i in ids}
