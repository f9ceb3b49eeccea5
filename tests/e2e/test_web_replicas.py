"""Several web processes behind a load balancer: two gunicorn processes on different ports, each
with a data dir of its own (as on two hosts), share one PostgreSQL, one Redis and the secrets.
`make run`'s stack (scripts/runstack.py: web A, Celery, beat, nbdworker) runs on a private
PostgreSQL and Redis; web B is a second gunicorn started beside it. A change made through
either one is seen through the other and published: nbdworker serves it. A session opened on
one is valid on the other (sessions live in the database, signed with the shared SECRET_KEY)."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.livestack import ADMIN_PASSWORD, RunningStack, api_call, running_stack
from tests.support.liveweb import LiveWeb
from tests.support.polling import poll
from tests.support.postgres import private_postgres
from tests.support.redisserver import free_port, private_redis

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 90.0
# The secrets every web process must share, and their files in `make run`'s data dir.
SHARED_SECRETS = {
    "SECRET_KEY": "secret_key",
    "NBDWEB_CONFIG_SECRET": "config_secret",
    "NBDWEB_KEY_ENCRYPTION_KEY": "key_encryption_key",
}


class Web:
    """One web process's base URL, called with the stack's API token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        return api_call(self.url, self.token, method, path, body)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[RunningStack]:
    workdir = tmp_path_factory.mktemp("replicas")
    with private_postgres() as postgres, private_redis(workdir / "redis") as redis_server:
        env = {
            "DATABASE_URL": postgres.create_database("nbdweb"),
            "REDIS_URL": redis_server.url,
            "GUNICORN_WORKERS": "1",
        }
        with running_stack(workdir / "stack", env=env) as running:
            yield running


@pytest.fixture(scope="module")
def web_b(stack: RunningStack, tmp_path_factory) -> Iterator[Web]:
    """A second gunicorn: the same database, Redis and secrets, a data dir of its own."""
    data = tmp_path_factory.mktemp("web-b")
    shared = Path(stack.env["NBDWEB_DATA_DIR"])
    address = f"127.0.0.1:{free_port()}"
    env = {
        **stack.env,
        "NBDWEB_DATA_DIR": str(data),
        "NBDWEB_HTTP_ADDR": address,
        # The secrets from the environment only: nothing read from, or generated into, its dir.
        "NBDWEB_SECRET_FILES": "0",
        **{name: (shared / file).read_text().strip() for name, file in SHARED_SECRETS.items()},
    }
    log_path = data / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "nbdweb/gunicorn.conf.py", "nbdweb.wsgi"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            web = Web(f"http://{address}", stack.token)

            def answers() -> bool:
                if proc.poll() is not None:
                    pytest.fail(f"web B exited:\n{log_path.read_text()[-3000:]}")
                try:
                    web.api("GET", "nodes/")
                except (urllib.error.URLError, ConnectionError):
                    return False
                return True

            poll(answers, "web B answering", timeout=60)
            yield web
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert not (data / "secret_key").exists(), "web B made a secret of its own"


@pytest.fixture(scope="module")
def web_a(stack: RunningStack) -> Web:
    return Web(stack.url, stack.token)


def test_the_two_web_processes_share_postgresql_not_a_local_file(
    stack: RunningStack, web_a: Web, web_b: Web
) -> None:
    assert stack.env["DATABASE_URL"].startswith("postgres://")
    assert web_a.url != web_b.url
    assert not list(Path(stack.env["NBDWEB_DATA_DIR"]).glob("*.sqlite3"))


@pytest.mark.parametrize(("maker", "editor"), [("a", "b"), ("b", "a")])
def test_a_change_through_either_web_is_seen_by_the_other_and_published(
    stack: RunningStack, web_a: Web, web_b: Web, maker: str, editor: str
) -> None:
    webs = {"a": web_a, "b": web_b}
    name = f"made-on-{maker}"
    created = webs[maker].api("POST", "exports/", {"name": name, "size": "1M"})

    def ready_on_the_other() -> bool:
        return webs[editor].api("GET", f"exports/{created['id']}/")["state"] == "ready"

    poll(ready_on_the_other, f"{name} ready as seen through web {editor}", JOB_TIMEOUT)
    poll(lambda: stack.served_export(name), f"{name} served", JOB_TIMEOUT)

    description = f"edited on {editor}"
    webs[editor].api("PATCH", f"exports/{created['id']}/", {"description": description})
    assert webs[maker].api("GET", f"exports/{created['id']}/")["description"] == description

    def published() -> bool:
        export = stack.served_export(name)
        return bool(export) and export.get("description") == description

    poll(published, f"the description edited on web {editor} served", JOB_TIMEOUT)


def test_a_session_opened_on_one_web_is_valid_on_the_other(web_a: Web, web_b: Web) -> None:
    browser = LiveWeb(web_a.url)
    browser.login("admin", ADMIN_PASSWORD)
    browser.base_url = web_b.url  # the load balancer sent the next request elsewhere
    reply = browser.request("GET", "/api/v1/nodes/")
    assert reply.status == 200, reply.body[:300]
    # A write with the session's CSRF token, through web B.
    reply = browser.request("POST", "/api/v1/exports/", {"name": "by-session", "size": "1M"})
    assert reply.status == 201, reply.body[:300]
