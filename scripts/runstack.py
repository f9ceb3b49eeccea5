#!/usr/bin/env python3
"""`make run`: bring the whole nbdweb stack up on one machine, in the foreground.

Prepares the data dir and its secrets, makes sure Redis answers (starting a private
`redis-server` when it does not), migrates, then runs gunicorn, one Celery worker and
nbdworker, prefixing each output line with the process's name. Ctrl-C or SIGTERM stops all of
them; every child also gets SIGTERM from the kernel if this supervisor dies (PR_SET_PDEATHSIG),
so no orphan survives.

Standard library (and nbdworker.contract, to derive the worker's node key) only: it runs
before Django is configured.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nbdweb.datadir import data_dir, secret_from_env_or_file  # noqa: E402
from nbdworker.contract.nodekey import NODE_KEY_ENV, derive_node_key  # noqa: E402
from nbdworker.contract.redisconn import check_url, is_sentinel, parse_sentinel_url  # noqa: E402

PYTHON = sys.executable
STOP_GRACE_SECONDS = 15.0
PR_SET_PDEATHSIG = 1

# The long-running processes. docker-compose.yml runs these very commands (a test checks).
# `beat` schedules the periodic tasks (node and session events, expiring certificates); one per
# installation is enough (a second one is harmless: the observer runs under a lock).
COMMANDS: dict[str, list[str]] = {
    "web": [PYTHON, "-m", "gunicorn", "-c", "nbdweb/gunicorn.conf.py", "nbdweb.wsgi"],
    "celery": [PYTHON, "-m", "celery", "-A", "nbdweb", "worker", "--loglevel", "INFO"],
    "beat": [PYTHON, "-m", "celery", "-A", "nbdweb", "beat", "--loglevel", "INFO"],
    "nbdworker": [PYTHON, "-m", "nbdworker"],
}

SECRETS = {
    "SECRET_KEY": "secret_key",
    "NBDWEB_CONFIG_SECRET": "config_secret",
    "NBDWEB_KEY_ENCRYPTION_KEY": "key_encryption_key",
}

# Each process gets only the secrets it uses (docs/security.md). Celery publishes the config
# after a job (signs it, decrypts the server key into it) but signs no cookie; nbdworker only
# verifies and opens its own node's snapshot, so it gets its node's key (derived here from the
# master secret), not the master; beat only sends task messages. The one-off steps (migrate,
# ensure_admin) run as web.
PROCESS_SECRETS: dict[str, tuple[str, ...]] = {
    "web": ("SECRET_KEY", "NBDWEB_CONFIG_SECRET", "NBDWEB_KEY_ENCRYPTION_KEY"),
    "celery": ("NBDWEB_CONFIG_SECRET", "NBDWEB_KEY_ENCRYPTION_KEY"),
    "nbdworker": (NODE_KEY_ENV,),
    "beat": (),
    "redis": (),
}


def say(message: str) -> None:
    print(f"[runstack] {message}", flush=True)


def die_with_parent() -> None:
    """Runs in each child before exec: the kernel sends SIGTERM if the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def redacted(url: str) -> str:
    """`url` without its passwords (the data nodes' and a sentinel's), for the log."""
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in credentials:
        netloc = f"{credentials.partition(':')[0]}:***@{hosts}"
        parts = parts._replace(netloc=netloc)
    query = "&".join(
        f"{name}=***" if name == "sentinel_password" else f"{name}={value}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit(parts._replace(query=query))


def _redis_command(*words: str) -> bytes:
    encoded = [word.encode() for word in words]
    return f"*{len(encoded)}\r\n".encode() + b"".join(
        b"$%d\r\n%s\r\n" % (len(word), word) for word in encoded
    )


def _redis_socket(host: str, port: int, tls: bool, timeout: float) -> socket.socket:
    """A connection to one Redis or sentinel, over TLS (verified with REDIS_TLS_CA_FILE, client
    certificate from REDIS_TLS_CERT/KEY_FILE) when `tls`."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls:
        context = ssl.create_default_context(cafile=os.environ.get("REDIS_TLS_CA_FILE") or None)
        if os.environ.get("REDIS_TLS_CERT_FILE"):
            context.load_cert_chain(
                os.environ["REDIS_TLS_CERT_FILE"], os.environ.get("REDIS_TLS_KEY_FILE") or None
            )
        sock = context.wrap_socket(sock, server_hostname=host)
    return sock


def _authenticated(sock: socket.socket, user: str | None, password: str | None) -> bool:
    if not password:
        return True
    sock.sendall(_redis_command("AUTH", user or "default", password))
    return sock.recv(64).startswith(b"+OK")


def _ping(host: str, port: int, tls: bool, user: str | None, password: str | None, timeout: float):
    with _redis_socket(host, port, tls, timeout) as sock:
        if not _authenticated(sock, user, password):
            return False
        sock.sendall(_redis_command("PING"))
        return sock.recv(64).startswith(b"+PONG")


def sentinel_primary(url: str, timeout: float = 1.0) -> tuple[str, int] | None:
    """The address the first sentinel that answers gives for the URL's master, or None."""
    target = parse_sentinel_url(url)
    for host, port in target.sentinels:
        try:
            with _redis_socket(host, port, target.tls, timeout) as sock:
                if not _authenticated(sock, target.sentinel_username, target.sentinel_password):
                    continue
                sock.sendall(_redis_command("SENTINEL", "get-master-addr-by-name", target.master))
                reply = sock.makefile("rb")
                if reply.readline() != b"*2\r\n":  # *-1: the sentinel knows no such master
                    continue
                address = []
                for _ in range(2):
                    reply.readline()  # $<length>
                    address.append(reply.readline().strip().decode())
                return address[0], int(address[1])
        except (OSError, ssl.SSLError, ValueError):
            continue
    return None


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """PING answered, after AUTH with the URL's user and password, over TLS for rediss://; for
    a Sentinel URL, by the primary the sentinels name."""
    try:
        if is_sentinel(url):
            target = parse_sentinel_url(url)
            primary = sentinel_primary(url, timeout)
            if primary is None:
                return False
            return _ping(*primary, target.tls, target.username, target.password, timeout)
        parts = urlsplit(url)
        return _ping(
            parts.hostname or "127.0.0.1",
            parts.port or 6379,
            parts.scheme == "rediss",
            unquote(parts.username or "") or None,
            unquote(parts.password) if parts.password else None,
            timeout,
        )
    except (OSError, ssl.SSLError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"[runstack] {what} did not happen within {timeout:.0f}s")
        time.sleep(0.1)


def http_base(addresses: str) -> str:
    """The URL of gunicorn's first bind address (a wildcard one is reached on loopback)."""
    address = addresses.split(",")[0].strip()
    host, _, port = address.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}"


def stack_answers(web: str, nbd_listen: str) -> bool:
    """The web server answers HTTP and nbdworker's first listener sends its NBD greeting."""
    try:
        with urllib.request.urlopen(f"{web}/admin/login/", timeout=1) as response:
            response.read(1)
    except urllib.error.HTTPError:
        pass  # an answer is an answer
    except OSError:
        return False
    first = nbd_listen.split(",")[0].strip()
    try:
        if first.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(1)
            sock.connect(first[5:])
        else:
            host, _, port = first.rpartition(":")
            host = {"0.0.0.0": "127.0.0.1", "[::]": "::1"}.get(host, host.strip("[]"))
            sock = socket.create_connection((host, int(port)), timeout=1)
        with sock:
            return sock.recv(8) == b"NBDMAGIC"
    except (OSError, ValueError):
        return False


def process_env(env: dict[str, str], secrets: dict[str, str], name: str) -> dict[str, str]:
    """`env` plus the secrets process `name` uses; `NBDWEB_SECRET_FILES=0` keeps it from
    reading the others out of the data dir."""
    return {
        **env,
        "NBDWEB_SECRET_FILES": "0",
        **{variable: secrets[variable] for variable in PROCESS_SECRETS[name]},
    }


class Stack:
    def __init__(self, env: dict[str, str], secrets: dict[str, str]) -> None:
        self.env = env
        self.secrets = secrets
        self.children: dict[str, subprocess.Popen] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False

    def spawn(self, name: str, argv: list[str], stdin_text: str | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=process_env(self.env, self.secrets, name),
            stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        if stdin_text is not None:
            proc.stdin.write(stdin_text.encode())
            proc.stdin.close()
        self.children[name] = proc
        self.selector.register(proc.stdout, selectors.EVENT_READ, name)
        say(f"started {name} (pid {proc.pid})")
        return proc

    def pump(self, timeout: float) -> None:
        width = max(len(name) for name in self.children)
        for key, _ in self.selector.select(timeout):
            line = key.fileobj.readline()
            if not line:
                self.selector.unregister(key.fileobj)
                continue
            text = line.decode("utf-8", "replace").rstrip("\n")
            print(f"{key.data:<{width}} | {text}", flush=True)

    def stop(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        say(f"stopping ({reason})")
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and any(p.poll() is None for p in self.children.values()):
            self.pump(0.1)
        for name, proc in self.children.items():
            if proc.poll() is None:
                say(f"{name} did not stop in {STOP_GRACE_SECONDS:.0f}s: killing")
                proc.kill()
                proc.wait()
        # Drain what the children printed while stopping.
        while self.selector.get_map():
            self.pump(0.05)


def prepare_environment() -> tuple[dict[str, str], dict[str, str]]:
    """The environment every process shares (no secrets in it), and the secrets."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in SECRETS and name != NODE_KEY_ENV
    }
    data = data_dir()
    env["NBDWEB_DATA_DIR"] = str(data)
    env.setdefault("NBDWEB_STORAGE_ROOT", str(data / "images"))
    Path(env["NBDWEB_STORAGE_ROOT"]).mkdir(parents=True, exist_ok=True)
    env.setdefault("NBDWORKER_STORAGE_ROOTS", env["NBDWEB_STORAGE_ROOT"])
    env.setdefault("NBDWEB_HTTP_ADDR", "127.0.0.1:8000")
    env.setdefault("NBD_LISTEN", "127.0.0.1:10809")
    env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    env["PYTHONUNBUFFERED"] = "1"
    secrets = {
        variable: secret_from_env_or_file(variable, filename)
        for variable, filename in SECRETS.items()
    }
    secrets[NODE_KEY_ENV] = derive_node_key(secrets["NBDWEB_CONFIG_SECRET"], worker_node(env))
    return env, secrets


def worker_node(env: dict[str, str]) -> str:
    """The node the worker serves (as nbdworker/settings.py reads it)."""
    return env.get("NBDWORKER_NODE") or "default"


def ensure_redis(env: dict[str, str], stack: Stack) -> None:
    url = env["REDIS_URL"]
    try:
        # Before anything logs the URL: redacted() cannot find a password with an unencoded
        # "/", "?" or "#" in it.
        check_url(url)
    except ValueError as exc:
        raise SystemExit(f"[runstack] REDIS_URL: {exc}") from None
    if redis_answers(url):
        say(f"redis answers at {redacted(url)}")
        return
    if is_sentinel(url):
        # The operator chose Sentinel: a private Redis beside it would split the data.
        raise SystemExit(
            f"[runstack] the sentinels at {redacted(url)} name no primary that answers PING"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            f"[runstack] Redis does not answer at {redacted(url)} and no redis-server is "
            "installed.\n  Install one (Debian: apt-get install redis-server) or point "
            "REDIS_URL at a running Redis."
        )
    port = free_port()
    redis_dir = Path(env["NBDWEB_DATA_DIR"]) / "redis"
    redis_dir.mkdir(mode=0o700, exist_ok=True)
    # A password, so that other local users cannot read or write the config snapshots. Given
    # on stdin (`redis-server -`): a command line is readable by every local user. Append-only
    # file: queued jobs survive a Redis restart.
    password = secret_from_env_or_file("NBDWEB_REDIS_PASSWORD", "redis_password")
    say(
        f"redis does not answer at {redacted(url)}: starting a private redis-server on port "
        f"{port} (password in {env['NBDWEB_DATA_DIR']}/redis_password)"
    )
    stack.spawn(
        "redis",
        [binary, "-"],
        stdin_text=(
            f'bind 127.0.0.1\nport {port}\ndir {redis_dir}\nsave ""\nappendonly yes\n'
            f"requirepass {password}\n"
        ),
    )
    parts = urlsplit(url)
    env["REDIS_URL"] = urlunsplit(
        ("redis", f":{quote(password, safe='')}@127.0.0.1:{port}", parts.path or "/0", "", "")
    )
    wait_until(lambda: redis_answers(env["REDIS_URL"]), 15, "private redis-server answering")


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=env, check=True)


def prepare(env: dict[str, str], secrets: dict[str, str]) -> None:
    """One-off steps before the processes start (also docker compose's `init` service)."""
    web_env = process_env(env, secrets, "web")
    manage(web_env, "migrate", "--noinput")
    manage(web_env, "collectstatic", "--noinput", "-v0")
    manage(web_env, "sync_node_listen")
    manage(web_env, "set_public_address")
    # For a worker that shares the data dir but not this environment (docker compose's).
    manage(web_env, "node_key", worker_node(env), "--write")
    if env.get("DJANGO_SUPERUSER_USERNAME") and env.get("DJANGO_SUPERUSER_PASSWORD"):
        manage(web_env, "ensure_admin")
    else:
        say(
            "no admin user configured: set DJANGO_SUPERUSER_USERNAME and "
            "DJANGO_SUPERUSER_PASSWORD, or run `.venv/bin/python manage.py createsuperuser`"
        )


def main() -> int:
    # Everything the stack creates (images, Redis's files, logs) is for this user only.
    os.umask(0o077)
    env, secrets = prepare_environment()
    if sys.argv[1:] == ["--prepare-only"]:
        prepare(env, secrets)
        return 0
    stack = Stack(env, secrets)

    def on_signal(signum: int, _frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        ensure_redis(env, stack)
        prepare(env, secrets)
        for name, argv in COMMANDS.items():
            stack.spawn(name, argv)
        say(f"data in {env['NBDWEB_DATA_DIR']}; waiting for the web server and nbdworker")
        web = http_base(env["NBDWEB_HTTP_ADDR"])
        ready = False
        while True:
            stack.pump(0.5)
            if not ready and stack_answers(web, env["NBD_LISTEN"]):
                ready = True
                say(
                    f"ready: admin {web}/admin/  API {web}/api/v1/  API docs {web}/api/docs/  "
                    f"NBD {env['NBD_LISTEN']}  CLI .venv/bin/nbdweb --url {web}"
                )
            for name, proc in stack.children.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode}")
    except KeyboardInterrupt as exc:
        stack.stop(str(exc) or "interrupted")
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        say(str(exc))
        stack.stop("a process failed")
        status = 1
    except SystemExit:
        stack.stop("startup failed")
        raise
    return status


if __name__ == "__main__":
    sys.exit(main())
