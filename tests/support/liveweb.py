"""The web app under a real gunicorn on its own SQLite file (the `make run` default), with a
private Redis, and an HTTP client logged in as its admin through the login page.

    with live_gunicorn(tmp_path) as web:
        web.request("POST", "/api/v1/exports/", {"name": "disk", "size": "1M"})
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.polling import poll
from tests.support.redisserver import free_port, private_redis

__all__ = ["LiveWeb", "live_gunicorn"]

REPO = Path(__file__).resolve().parents[2]
ADMIN_USER = "admin"
ADMIN_PASSWORD = "live-web-admin-password"


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class LiveWeb:
    """An opener with the admin's session cookie; `request` sends the CSRF token it needs."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.cookies = http.cookiejar.CookieJar()

    def _opener(self) -> urllib.request.OpenerDirector:
        return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def _cookie(self, name: str) -> str | None:
        return next((c.value for c in self.cookies if c.name == name), None)

    def login(self, username: str = ADMIN_USER, password: str = ADMIN_PASSWORD) -> None:
        page = self._opener().open(f"{self.base_url}/admin/login/", timeout=30).read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = urllib.parse.urlencode(
            {
                "csrfmiddlewaretoken": token,
                "username": username,
                "password": password,
                "next": "/admin/",
            }
        ).encode()
        self._opener().open(f"{self.base_url}/admin/login/", form, timeout=30)
        if self._cookie("sessionid") is None:
            raise RuntimeError("logging in to the live web app failed")

    def request(self, method: str, path: str, body: object = None) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("X-CSRFToken", self._cookie("csrftoken") or "")
        try:
            with self._opener().open(req, timeout=60) as response:
                return Reply(response.status, response.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read())


def _manage(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )


@contextlib.contextmanager
def live_gunicorn(tmp_path: Path, workers: int = 4, threads: int = 2) -> Iterator[LiveWeb]:
    """gunicorn with `workers` processes of `threads` threads on a fresh SQLite data dir."""
    with private_redis(tmp_path / "redis") as redis_server:
        port = free_port()
        env = dict(os.environ)
        env.pop("DATABASE_URL", None)  # the `make run` default: SQLite in the data dir
        env.update(
            {
                "NBDWEB_DATA_DIR": str(tmp_path / "data"),
                "NBDWEB_STORAGE_ROOT": str(tmp_path / "images"),
                "REDIS_URL": redis_server.url,
                "NBDWEB_HTTP_ADDR": f"127.0.0.1:{port}",
                "GUNICORN_WORKERS": str(workers),
                "GUNICORN_THREADS": str(threads),
                "GUNICORN_ACCESS_LOG": os.devnull,
                "DJANGO_SUPERUSER_USERNAME": ADMIN_USER,
                "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
                "DEBUG": "",
            }
        )
        (tmp_path / "images").mkdir(exist_ok=True)
        _manage(env, "migrate", "--noinput")
        _manage(env, "ensure_admin")
        log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "nbdweb/gunicorn.conf.py", "nbdweb.wsgi"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            web = LiveWeb(f"http://127.0.0.1:{port}")

            def answers() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError((tmp_path / "gunicorn.log").read_text())
                try:
                    urllib.request.urlopen(f"{web.base_url}/admin/login/", timeout=5).close()
                except OSError:
                    return False
                return True

            poll(answers, "gunicorn answering", timeout=60)
            web.login()
            web.log_path = tmp_path / "gunicorn.log"
            yield web
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
