"""The operator console in a real browser: Debian's headless Chromium (Selenium) against the
web side (pytest-django's live server, the test database), a real Celery worker running the
disk jobs, a real nbdworker following its node's config in Redis, and real NBD clients.

Screenshots go to $NBDWEB_SCREENSHOT_DIR when it is set (the README's come from there), to the
test's temporary directory otherwise.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from exports_app.choices import CertificateKind, ExportState
from exports_app.models import Export, Job, TLSPolicy, WorkerNode
from exports_app.services import ca, provisioning
from exports_app.services.nodekeys import node_key
from nbdworker.contract.nodekey import NODE_KEY_ENV
from tests.support.browser import WINDOW, chromium_browser, requested_urls
from tests.support.celery import RunningCelery
from tests.support.polling import poll
from tests.support.tools import client_env, require_tool
from tests.support.worker import RunningWorker, start_worker

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

MiB = 1 << 20
PASSWORD = "pw-console-e2e"
# The dashboard refreshes its sections every 2 s and the worker beats every 2 s: a change
# shows within about 4 s; the deadline leaves room for a loaded machine.
LIVE = 20.0


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def screenshots(tmp_path: Path) -> Callable[[object, str], Path]:
    directory = Path(os.environ.get("NBDWEB_SCREENSHOT_DIR") or tmp_path / "screenshots")
    directory.mkdir(parents=True, exist_ok=True)

    def shoot(browser, name: str) -> Path:
        """A full-page screenshot at the reference width."""
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(WINDOW[0], max(WINDOW[1], min(int(height) + 40, 4000)))
        path = directory / f"{name}.png"
        browser.save_screenshot(str(path))
        browser.set_window_size(*WINDOW)
        return path

    return shoot


@pytest.fixture
def browser() -> Iterator:
    with chromium_browser() as driver:
        yield driver


@pytest.fixture
def admin_user(db) -> User:
    return User.objects.create_superuser(f"op-{uuid.uuid4().hex[:6]}", password=PASSWORD)


@dataclass
class Stack:
    node: WorkerNode
    worker: RunningWorker
    celery: RunningCelery
    base_url: str

    def create_export(self, name: str, size: int = 4 * MiB) -> Export:
        with transaction.atomic():
            export = Export.objects.create(node=self.node, name=name, size=size)
            provisioning.request_create(export)

        def ready():
            export.refresh_from_db()
            assert export.state != ExportState.FAILED, export.last_error
            return export.state == ExportState.READY

        poll(ready, f"export {name} to be ready", timeout=60)
        return export


@pytest.fixture
def stack(
    live_server, celery_worker: RunningCelery, celery_node_name: str, tmp_path: Path
) -> Iterator[Stack]:
    """A node whose jobs the Celery worker runs and whose config an nbdworker follows."""
    storage = tmp_path / "images"
    storage.mkdir()
    node = WorkerNode.objects.create(
        name=celery_node_name,
        listen="127.0.0.1:10809",
        storage_root=str(storage),
        tls_policy=TLSPolicy.objects.create(name=f"console-{uuid.uuid4().hex[:6]}"),
    )
    worker = start_worker(
        None,
        workdir=tmp_path / "nbdworker",
        storage_root=storage,
        env={
            "REDIS_URL": settings.REDIS_URL,
            NODE_KEY_ENV: node_key(node.name),
            "NBDWORKER_NODE": node.name,
            "NBDWEB_DATA_DIR": str(tmp_path / "data"),
        },
    )
    node.listen = f"127.0.0.1:{worker.port}"
    node.save()
    try:
        yield Stack(node, worker, celery_worker, live_server.url)
    finally:
        worker.stop()


class HeldClient:
    """nbdsh connected to an export, reading a block every 0.2 s until told to stop; it exits
    with status 3 when the server drops it."""

    SCRIPT = """
import os, sys, time
h.pread(65536, 0)
print("connected", flush=True)
while not os.path.exists({stop!r}):
    try:
        h.pread(65536, 0)
    except Exception as exc:
        print("dropped", exc, flush=True)
        sys.exit(3)
    time.sleep(0.2)
print("done", flush=True)
"""

    def __init__(self, uri: str, workdir: Path) -> None:
        self.stop_file = workdir / f"stop-{uuid.uuid4().hex[:6]}"
        self.proc = subprocess.Popen(
            [require_tool("nbdsh"), "-u", uri, "-c", self.SCRIPT.format(stop=str(self.stop_file))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("connected"), line + self.proc.stderr.read()

    def disconnect(self) -> None:
        self.stop_file.touch()
        self.proc.communicate(timeout=30)

    def wait_dropped(self) -> int:
        self.proc.communicate(timeout=30)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def held_clients(tmp_path: Path) -> Iterator[Callable[[str], HeldClient]]:
    clients: list[HeldClient] = []

    def connect(uri: str) -> HeldClient:
        client = HeldClient(uri, tmp_path)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.kill()


# -- helpers -------------------------------------------------------------------------------------


def log_in(browser, base_url: str, user: User) -> None:
    browser.get(f"{base_url}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys(user.username)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    poll(lambda: browser.find_elements(By.ID, "console"), "the dashboard after logging in")


def text_of(browser, css: str) -> str | None:
    """The text of the element, or None; read in one step (the live sections are swapped every
    few seconds, which makes element handles go stale)."""
    return browser.execute_script(
        "const el = document.querySelector(arguments[0]); return el ? el.innerText : null;", css
    )


def session_text(browser, export: str) -> str | None:
    return text_of(browser, f'[data-testid="live-sessions"] tr[data-export="{export}"]')


def click(browser, css: str) -> None:
    """Click the element, finding it again when a swap replaced it in between."""

    def attempt() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            return False
        return True

    poll(attempt, f"a click on {css}")


def mark_page(browser) -> None:
    """Tag the loaded document: a reload would lose the tag."""
    browser.execute_script("window.consoleTestMark = 'no reload';")


def assert_not_reloaded(browser) -> None:
    assert browser.execute_script("return window.consoleTestMark;") == "no reload"


# -- tests ---------------------------------------------------------------------------------------


def test_dashboard_shows_a_real_client_session_live_and_drops_it_after_disconnect(
    browser, stack, admin_user, held_clients, screenshots
) -> None:
    stack.create_export("disk-a")
    log_in(browser, stack.base_url, admin_user)
    mark_page(browser)
    assert session_text(browser, "disk-a") is None

    client = held_clients(stack.worker.uri("disk-a"))
    row = poll(lambda: session_text(browser, "disk-a"), "the session on the dashboard", LIVE)
    assert "127.0.0.1:" in row
    assert "plain" in row  # no TLS on this node
    # The node's card says it is online, with its storage root's capacity.
    card = text_of(browser, f'.node-card[data-node="{stack.node.name}"]')
    assert "online" in card and "free" in card
    poll(
        lambda: "/s" in (session_text(browser, "disk-a") or ""),
        "a throughput figure",
        LIVE,
    )
    screenshots(browser, "dashboard")

    client.disconnect()
    poll(
        lambda: session_text(browser, "disk-a") is None, "the session to leave the dashboard", LIVE
    )
    assert_not_reloaded(browser)


def test_end_session_from_the_dashboard_disconnects_the_client(
    browser, stack, admin_user, held_clients, screenshots
) -> None:
    stack.create_export("disk-b")
    log_in(browser, stack.base_url, admin_user)
    mark_page(browser)
    client = held_clients(stack.worker.uri("disk-b"))
    poll(lambda: session_text(browser, "disk-b"), "the session on the dashboard", LIVE)

    click(browser, '[data-testid="live-sessions"] tr[data-export="disk-b"] button.end-session')
    alert = poll(lambda: _alert(browser), "the confirmation dialog")
    assert "End the session" in alert.text
    alert.accept()
    poll(
        lambda: "asked to end"
        in browser.execute_script("return document.getElementById('console-sessions').innerText"),
        "the notice",
        LIVE,
    )
    screenshots(browser, "session-ended")

    assert client.wait_dropped() == 3  # the worker closed the connection
    poll(
        lambda: session_text(browser, "disk-b") is None, "the session to leave the dashboard", LIVE
    )
    assert_not_reloaded(browser)


def _alert(browser):
    try:
        return browser.switch_to.alert
    except NoAlertPresentException:
        return None


CONSOLE_PAGES = [
    "/admin/",
    "/admin/exports_app/export/",
    "/admin/exports_app/export/add/",
    "/admin/exports_app/job/",
    "/admin/exports_app/workernode/",
    "/admin/exports_app/certificate/",
    "/admin/exports_app/certificateauthority/",
    "/admin/exports_app/tlspolicy/",
]


def test_console_pages_fit_1400px_and_load_nothing_from_third_parties(
    browser, stack, admin_user, screenshots
) -> None:
    export = stack.create_export("disk-c-" + "long-name-" * 12)
    job = export.jobs.get()
    Job.objects.filter(pk=job.pk).update(error="qemu-img: " + "a long error message " * 20)
    authority = ca.create_authority("console-ca", "nbdweb console CA")
    ca.issue_certificate(authority, CertificateKind.CLIENT, "alice", name="alice-laptop")
    log_in(browser, stack.base_url, admin_user)
    own = urlsplit(stack.base_url).netloc
    requested_urls(browser)
    pages = [*CONSOLE_PAGES, f"/admin/exports_app/export/{export.pk}/change/"]
    for page in pages:
        browser.get(stack.base_url + page)
        poll(
            lambda: browser.execute_script("return document.readyState") == "complete",
            f"{page} to load",
        )
        # htmx served by the app itself, and loaded.
        assert browser.execute_script("return typeof htmx") == "object", page
        sideways = browser.execute_script(
            "return Math.max(...[document.documentElement, ...document.querySelectorAll("
            "'.results, .console-card')].map(e => e.scrollWidth - e.clientWidth));"
        )
        assert sideways <= 0, f"{page} scrolls sideways by {sideways} px at {WINDOW[0]} px"
        urls = requested_urls(browser)
        foreign = [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
        foreign = [u for u in foreign if urlsplit(u).netloc != own]
        assert foreign == [], (page, foreign)
    screenshots(browser, "export-page")
    browser.get(stack.base_url + "/admin/exports_app/job/")
    screenshots(browser, "job-list")


def test_revoking_a_certificate_shows_in_the_change_log(
    browser, stack, admin_user, screenshots
) -> None:
    authority = ca.create_authority("revoke-ca", "nbdweb revoke CA")
    certificate = ca.issue_certificate(authority, CertificateKind.CLIENT, "bob", name="bob-laptop")
    log_in(browser, stack.base_url, admin_user)
    browser.get(f"{stack.base_url}/admin/exports_app/certificate/")
    browser.find_element(
        By.CSS_SELECTOR, f'input[name="_selected_action"][value="{certificate.pk}"]'
    ).click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("revoke_certificates")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    poll(lambda: "Revoked 1 certificate" in browser.page_source, "the revocation message")
    certificate.refresh_from_db()
    assert certificate.is_revoked

    browser.get(f"{stack.base_url}/admin/console/changes/?model=certificate&q=bob")
    entry = text_of(browser, '[data-testid="changelog"] tbody tr')
    assert "bob-laptop" in entry
    assert admin_user.username in entry
    assert "revoked at" in entry and f"revoked by {admin_user.username} in the admin" in entry
    screenshots(browser, "change-log")


def test_the_wizard_creates_an_export_and_follows_its_job_to_ready(
    browser, stack, admin_user, screenshots
) -> None:
    log_in(browser, stack.base_url, admin_user)
    click(browser, '[data-testid="new-export"]')
    poll(lambda: browser.find_elements(By.NAME, "name"), "the wizard's form")
    browser.find_element(By.NAME, "name").send_keys("wizard-disk")
    browser.find_element(By.NAME, "size").send_keys("64M")
    Select(browser.find_element(By.NAME, "node")).select_by_visible_text(stack.node.name)
    screenshots(browser, "wizard")
    browser.find_element(By.NAME, "create").click()
    poll(lambda: browser.find_elements(By.ID, "wizard-progress"), "the progress page")
    mark_page(browser)
    poll(
        lambda: browser.execute_script(
            "const p = document.getElementById('wizard-progress');"
            "return p && p.dataset.state === 'ready';"
        ),
        "the export to be ready on the page",
        60,
    )
    bar = browser.find_element(By.CSS_SELECTOR, "#wizard-progress progress")
    assert bar.get_attribute("aria-valuenow") == "100"
    assert "nbdinfo nbd://127.0.0.1:" in text_of(browser, "#wizard-progress")
    export = Export.objects.get(name="wizard-disk")
    assert export.state == ExportState.READY and export.size == 64 * MiB
    assert export.node == stack.node
    screenshots(browser, "wizard-ready")

    # The new export is served (once the worker has the config published after the job).
    def served_size() -> str:
        out = subprocess.run(
            [require_tool("nbdinfo"), "--size", stack.worker.uri("wizard-disk")],
            capture_output=True,
            text=True,
            timeout=30,
            env=client_env(),
        )
        return out.stdout.strip()

    assert poll(served_size, "nbdinfo to reach the new export", LIVE) == str(64 * MiB)
