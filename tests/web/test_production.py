"""Production settings (nbdweb/settings_production.py), static files, logging, and what REDIS_URL
makes of Celery's settings.

Each check runs `manage.py` in a subprocess: settings are read once per process, and these
tests must see exactly what an operator's process sees.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nbdweb.logging import JSONFormatter

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    # A fresh data dir: its own generated secrets and static root; SQLite, no shared state.
    full_env.update({"NBDWEB_DATA_DIR": str(tmp_path / "data"), "DEBUG": ""})
    full_env.pop("DATABASE_URL", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_under_production_settings(tmp_path):
    result = run(
        ["manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        tmp_path,
        DJANGO_SETTINGS_MODULE="nbdweb.settings_production",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_warns_under_the_development_settings(tmp_path):
    # The guard above means something: the base settings are not production-ready.
    result = run(
        ["manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        tmp_path,
        DJANGO_SETTINGS_MODULE="nbdweb.settings",
    )
    assert result.returncode != 0
    assert "security.W004" in result.stderr + result.stdout  # no HSTS


def test_production_serves_collected_static_files_over_https_only(tmp_path):
    env = {
        "DJANGO_SETTINGS_MODULE": "nbdweb.settings_production",
        "DJANGO_ALLOWED_HOSTS": "testserver",
    }
    collected = run(["manage.py", "collectstatic", "--noinput", "-v0"], tmp_path, **env)
    assert collected.returncode == 0, collected.stderr
    script = (
        "import django, json\n"
        "django.setup()\n"
        "from django.test import Client\n"
        "from django.templatetags.static import static\n"
        "url = static('admin/css/base.css')\n"
        "client = Client()\n"
        "plain = client.get(url)\n"
        "secure = client.get(url, secure=True)\n"
        "print(json.dumps({'url': url, 'plain': plain.status_code,\n"
        "    'location': plain.get('Location'), 'secure': secure.status_code,\n"
        "    'cache': secure.get('Cache-Control'),\n"
        "    'hsts': secure.get('Strict-Transport-Security')}))\n"
    )
    result = run(["-c", script], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # Hashed file name from the manifest storage, served by whitenoise with a long cache life.
    assert seen["url"].startswith("/static/admin/css/base.") and seen["url"] != (
        "/static/admin/css/base.css"
    )
    assert seen["plain"] == 301 and seen["location"].startswith("https://")
    assert seen["secure"] == 200
    assert "max-age=" in seen["cache"]
    assert "max-age=31536000" in seen["hsts"] and "includeSubDomains" in seen["hsts"]


def test_an_unknown_log_format_stops_the_process_with_a_clear_error(tmp_path):
    result = run(["manage.py", "check"], tmp_path, LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "LOG_FORMAT must be plain or json" in result.stderr


def test_log_format_json_makes_every_line_a_json_object(tmp_path):
    script = (
        "import django, logging\n"
        "django.setup()\n"
        "logging.getLogger('exports_app.tasks').warning('job %s failed', 7, extra={'job': 7})\n"
    )
    result = run(["-c", script], tmp_path, DJANGO_SETTINGS_MODULE="nbdweb.settings",
                 LOG_FORMAT="json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["message"] == "job 7 failed"
    assert (line["level"], line["logger"], line["job"]) == ("WARNING", "exports_app.tasks", 7)
    assert line["time"].endswith("+00:00")


def test_json_formatter_includes_exceptions_and_stringifies_odd_values():
    formatter = JSONFormatter()
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "oops", None, sys.exc_info())
    record.path = Path("/srv/images")
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "oops"
    assert "ValueError: bad" in entry["exc_info"]
    assert entry["path"] == "/srv/images"


@pytest.mark.parametrize(
    "unit",
    ["nbdweb-web.service", "nbdweb-celery.service", "nbdweb-beat.service", "nbdworker.service"],
)
def test_systemd_units_run_the_commands_of_make_run(unit):
    text = (REPO / "docs" / "systemd" / unit).read_text()
    assert "[Service]" in text and "ExecStart=" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    expected = {
        "nbdweb-web.service": "-m gunicorn -c nbdweb/gunicorn.conf.py nbdweb.wsgi",
        "nbdweb-celery.service": "-m celery -A nbdweb worker",
        "nbdweb-beat.service": "-m celery -A nbdweb beat",
        "nbdworker.service": "-m nbdworker",
    }[unit]
    assert expected in exec_start


def test_gunicorn_logs_json_lines_with_log_format_json(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(
        NBDWEB_DATA_DIR=str(tmp_path / "data"),
        NBDWEB_HTTP_ADDR=f"127.0.0.1:{port}",
        GUNICORN_WORKERS="1",
        LOG_FORMAT="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "nbdweb/gunicorn.conf.py", "nbdweb.wsgi"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/", timeout=2)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "gunicorn did not start"
                time.sleep(0.1)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is JSON
    loggers = {entry["logger"] for entry in entries}
    assert {"gunicorn.error", "gunicorn.access"} <= loggers, loggers
    access = next(e for e in entries if e["logger"] == "gunicorn.access")
    assert "GET /api/v1/" in access["message"] and " 401 " in access["message"]


def test_a_sentinel_redis_url_feeds_celerys_broker_and_result_backend(tmp_path):
    """One REDIS_URL: Celery's app gets kombu's Sentinel form, the master's name in both
    transport options (the job visibility timeout kept), and the ACL user for the backend."""
    script = (
        "import json, django\n"
        "django.setup()\n"
        "from nbdweb.celery import app\n"
        "c = app.conf\n"
        "print(json.dumps([c.broker_url, c.result_backend, c.redis_username,\n"
        "    c.broker_transport_options['master_name'],\n"
        "    c.broker_transport_options['visibility_timeout'],\n"
        "    c.result_backend_transport_options['master_name']]))\n"
    )
    url = "redis+sentinel://nbdweb:pw@s1:26379,s2:26380/main/3"
    result = run(["-c", script], tmp_path, REDIS_URL=url, NBDWEB_JOB_VISIBILITY_TIMEOUT="600")
    assert result.returncode == 0, result.stderr
    joined = "sentinel://nbdweb:pw@s1:26379/3;sentinel://nbdweb:pw@s2:26380/3"
    assert json.loads(result.stdout) == [joined, joined, "nbdweb", "main", 600, "main"]


def test_a_malformed_sentinel_redis_url_stops_the_process_naming_the_setting(tmp_path):
    url = "redis+sentinel://:hunter2@s1:26379,s2:port/main/0"
    result = run(["manage.py", "check"], tmp_path, REDIS_URL=url)
    assert result.returncode != 0
    assert "REDIS_URL: bad sentinel address 's2:port'" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
