"""`nbdweb`: exports, certificates, sessions and jobs from the command line.

    nbdweb [--url URL] [--token TOKEN] [--config FILE] [--json] COMMAND ...

The URL and token come from the flags, else NBDWEB_URL / NBDWEB_TOKEN, else the config file
(nbdweb_cli.config). Exit status: 0 done, 1 the API refused or a watched job failed, 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbdweb_cli import __version__
from nbdweb_cli.api import ApiClient, ApiError
from nbdweb_cli.config import ConfigError, resolve
from nbdweb_cli.output import human_size, print_json, print_record, print_table, progress_bar

__all__ = ["main"]

WATCH_INTERVAL = 0.5
EXPORT_COLUMNS = [
    ("id", "id"), ("name", "name"), ("node", "node_name"), ("size", "size_human"),
    ("state", "state"), ("uri", "uri"),
]  # fmt: skip
EXPORT_FIELDS = [
    "id", "name", "node_name", "size", "size_human", "state", "last_error", "uri", "read_only",
    "enabled", "tls_required", "job", "created", "last_updated",
]  # fmt: skip
JOB_FIELDS = ["id", "kind", "export_name", "state", "progress", "error", "created", "finished"]


class Command:
    """One invocation: the API client, the output mode and the parsed arguments."""

    def __init__(self, client: ApiClient, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.json = args.json

    def show(self, value: Any, fields: list[str] | None = None) -> None:
        if self.json or fields is None:
            print_json(value)
        else:
            print_record(value, fields)

    def table(self, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
        if self.json:
            print_json(rows)
        else:
            print_table(rows, columns)

    # -- lookups ---------------------------------------------------------------------------------

    def export(self, ref: str) -> dict[str, Any]:
        """An export by ID or by name (on any node; ambiguous names need the ID)."""
        if ref.isascii() and ref.isdigit():
            return self.client.get(f"exports/{ref}/")
        found = self.client.list("exports/", name=ref)
        if not found:
            raise ApiError(f"no export named {ref!r}")
        if len(found) > 1:
            raise ApiError(f"{len(found)} exports are named {ref!r}: give its ID")
        return found[0]


def _with_sizes(export: dict[str, Any]) -> dict[str, Any]:
    return {**export, "size_human": human_size(export.get("size"))}


# -- exports ------------------------------------------------------------------------------------


def exports_list(cmd: Command) -> int:
    rows = cmd.client.list("exports/", node=cmd.args.node)
    cmd.table([_with_sizes(r) for r in rows], EXPORT_COLUMNS)
    return 0


def exports_show(cmd: Command) -> int:
    cmd.show(_with_sizes(cmd.export(cmd.args.export)), EXPORT_FIELDS)
    return 0


def _after_job(cmd: Command, export: dict[str, Any]) -> int:
    if cmd.args.wait and export.get("job"):
        status = watch_job(cmd, export["job"])
        if status:
            return status
        export = cmd.client.get(f"exports/{export['id']}/")
    cmd.show(_with_sizes(export), EXPORT_FIELDS)
    return 0


def exports_create(cmd: Command) -> int:
    body: dict[str, Any] = {"name": cmd.args.name, "size": cmd.args.size}
    if cmd.args.node:
        body["node"] = _node_id(cmd, cmd.args.node)
    if cmd.args.read_only:
        body["read_only"] = True
    export = cmd.client.call("POST", "exports/", body, idempotent=True)
    return _after_job(cmd, export)


def exports_clone(cmd: Command) -> int:
    source = cmd.export(cmd.args.source)
    body: dict[str, Any] = {"name": cmd.args.name, "clone_from": str(source["id"]),
                            "node": source["node"]}  # fmt: skip
    if cmd.args.size:
        body["size"] = cmd.args.size
    export = cmd.client.call("POST", "exports/", body, idempotent=True)
    return _after_job(cmd, export)


def exports_resize(cmd: Command) -> int:
    export = cmd.export(cmd.args.export)
    body = {"size": cmd.args.size, "force": cmd.args.force}
    export = cmd.client.call("POST", f"exports/{export['id']}/resize/", body, idempotent=True)
    return _after_job(cmd, export)


def exports_delete(cmd: Command) -> int:
    export = cmd.export(cmd.args.export)
    query = {"wipe": "true"} if cmd.args.wipe else None
    cmd.client.raw("DELETE", f"exports/{export['id']}/", query=query)
    if cmd.json:
        print_json({"id": export["id"], "name": export["name"], "deleting": True})
    else:
        print(f"export {export['name']!r} (#{export['id']}) is being deleted")
    return 0


def _node_id(cmd: Command, ref: str) -> int:
    if ref.isascii() and ref.isdigit():
        return int(ref)
    found = cmd.client.list("nodes/", name=ref)
    if not found:
        raise ApiError(f"no node named {ref!r}")
    return found[0]["id"]


# -- certificates -------------------------------------------------------------------------------


def certs_issue(cmd: Command) -> int:
    authority = cmd.args.authority
    if not (authority.isascii() and authority.isdigit()):
        found = cmd.client.list("authorities/", name=authority)
        if not found:
            raise ApiError(f"no certificate authority named {authority!r}")
        authority = found[0]["id"]
    body: dict[str, Any] = {
        "name": cmd.args.name or cmd.args.common_name,
        "authority": int(authority),
        "kind": cmd.args.kind,
        "common_name": cmd.args.common_name,
    }
    if cmd.args.days:
        body["validity_days"] = cmd.args.days
    if cmd.args.dns:
        body["dns_names"] = cmd.args.dns
    if cmd.args.ip:
        body["ip_addresses"] = cmd.args.ip
    certificate = cmd.client.call("POST", "certificates/", body, idempotent=True)
    cmd.show(certificate, ["id", "name", "kind", "common_name", "serial", "not_after"])
    return 0


def _certificate_id(cmd: Command, ref: str) -> int:
    if ref.isascii() and ref.isdigit():
        return int(ref)
    found = cmd.client.list("certificates/", name=ref)
    if not found:
        raise ApiError(f"no certificate named {ref!r}")
    return found[0]["id"]


def certs_bundle(cmd: Command) -> int:
    pk = _certificate_id(cmd, cmd.args.certificate)
    query = {"export": cmd.args.export, "node": cmd.args.node}
    _, _, data = cmd.client.raw("GET", f"certificates/{pk}/bundle/", query=query)
    target = Path(cmd.args.output or f"nbdweb-client-{pk}.tar.gz")
    # The bundle holds a private key: the file is the owner's alone from its first byte.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if cmd.json:
        print_json({"certificate": pk, "file": str(target), "bytes": len(data)})
    else:
        print(f"wrote {target} ({len(data)} bytes)")
    return 0


def certs_revoke(cmd: Command) -> int:
    pk = _certificate_id(cmd, cmd.args.certificate)
    body = {"reason": cmd.args.reason} if cmd.args.reason else {}
    certificate = cmd.client.call("POST", f"certificates/{pk}/revoke/", body)
    cmd.show(certificate, ["id", "name", "serial", "revoked_at", "revocation_reason"])
    return 0


# -- sessions and jobs --------------------------------------------------------------------------


def sessions_list(cmd: Command) -> int:
    rows = cmd.client.list("sessions/", node=cmd.args.node, export=cmd.args.export)
    columns = [("id", "id"), ("node", "node"), ("export", "export"), ("client", "client"),
               ("tls", "tls"), ("since", "connected_since")]  # fmt: skip
    cmd.table(rows, columns)
    return 0


def sessions_kick(cmd: Command) -> int:
    cmd.client.raw("DELETE", f"sessions/{cmd.args.session}/")
    if cmd.json:
        print_json({"session": cmd.args.session, "ending": True})
    else:
        print(f"session {cmd.args.session} asked to end")
    return 0


def watch_job(cmd: Command, job_id: int | str) -> int:
    """Follow the job to its end; 0 when it succeeded, 1 when it failed."""
    # On stderr, also with --json: stdout stays the one JSON document.
    tty = sys.stderr.isatty()
    last = None
    while True:
        job = cmd.client.get(f"jobs/{job_id}/")
        state, progress = job["state"], int(job.get("progress") or 0)
        if (state, progress) != last:
            label = f"job {job['id']} {job['kind']} {job['export_name']}"
            if tty:
                sys.stderr.write(f"\r{label} {progress_bar(progress)} {state:<10}")
            else:
                sys.stderr.write(f"{label} {progress_bar(progress)} {state}\n")
            sys.stderr.flush()
            last = (state, progress)
        if state in ("succeeded", "failed"):
            if tty:
                sys.stderr.write("\n")
            if state == "failed":
                sys.stderr.write(f"nbdweb: job {job['id']} failed: {job.get('error')}\n")
            return 0 if state == "succeeded" else 1
        time.sleep(WATCH_INTERVAL)


def jobs_watch(cmd: Command) -> int:
    status = watch_job(cmd, cmd.args.job)
    job = cmd.client.get(f"jobs/{cmd.args.job}/")
    cmd.show(job, JOB_FIELDS)
    return status


# -- the parser ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdweb", description="Manage nbdweb's NBD exports from the command line."
    )
    parser.add_argument("--version", action="version", version=f"nbdweb {__version__}")
    parser.add_argument("--url", help="the web server, e.g. http://127.0.0.1:8000 ($NBDWEB_URL)")
    parser.add_argument(
        "--token",
        help="API token; other local users can read a command line (/proc/PID/cmdline): "
        "prefer $NBDWEB_TOKEN or the config file",
    )
    parser.add_argument("--config", help="config file (default ~/.config/nbdweb/cli.toml)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def command(group, name: str, func: Callable[[Command], int], help: str):
        sub = group.add_parser(name, help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    exports = groups.add_parser("exports", help="NBD exports").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    sub = command(exports, "list", exports_list, "list exports")
    sub.add_argument("--node", help="only this node's (name or ID)")
    sub = command(exports, "show", exports_show, "show one export")
    sub.add_argument("export", help="ID or name")
    sub = command(exports, "create", exports_create, "create an export and its empty image")
    sub.add_argument("name")
    sub.add_argument("--size", required=True, help='bytes or "10G", "512M"')
    sub.add_argument("--node", help="name or ID (default: the only/default node)")
    sub.add_argument("--read-only", action="store_true")
    sub.add_argument("--wait", action="store_true", help="watch its job to the end")
    sub = command(exports, "clone", exports_clone, "create an export as a copy of another")
    sub.add_argument("source", help="ID or name of a ready export")
    sub.add_argument("name")
    sub.add_argument("--size", help="grow the copy to this size")
    sub.add_argument("--wait", action="store_true", help="watch its job to the end")
    sub = command(exports, "resize", exports_resize, "resize an export's image")
    sub.add_argument("export", help="ID or name")
    sub.add_argument("size", help='bytes or "20G"')
    sub.add_argument("--force", action="store_true", help="allow a shrink (destroys data)")
    sub.add_argument("--wait", action="store_true", help="watch its job to the end")
    sub = command(exports, "delete", exports_delete, "delete an export and its image")
    sub.add_argument("export", help="ID or name")
    sub.add_argument("--wipe", action="store_true", help="overwrite the image with zeroes first")

    certs = groups.add_parser("certs", help="TLS certificates").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    sub = command(certs, "issue", certs_issue, "issue a certificate from an nbdweb CA")
    sub.add_argument("common_name")
    sub.add_argument("--authority", required=True, help="CA name or ID")
    sub.add_argument("--kind", choices=["client", "server"], default="client")
    sub.add_argument("--name", help="its name in nbdweb (default: the common name)")
    sub.add_argument("--days", type=int, help="validity in days")
    sub.add_argument("--dns", action="append", help="DNS name (server; repeatable)")
    sub.add_argument("--ip", action="append", help="IP address (server; repeatable)")
    sub = command(certs, "bundle", certs_bundle, "download a client bundle (.tar.gz, with key)")
    sub.add_argument("certificate", help="ID or name")
    sub.add_argument("-o", "--output", help="file (default nbdweb-client-ID.tar.gz), mode 600")
    sub.add_argument("--export", help="export ID for the bundle's README")
    sub.add_argument("--node", help="node ID for the bundle's README")
    sub = command(certs, "revoke", certs_revoke, "revoke a certificate")
    sub.add_argument("certificate", help="ID or name")
    sub.add_argument("--reason", help="why (kept with the revocation)")

    sessions = groups.add_parser("sessions", help="live NBD sessions").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    sub = command(sessions, "list", sessions_list, "list live sessions")
    sub.add_argument("--node")
    sub.add_argument("--export", help="export name")
    sub = command(sessions, "kick", sessions_kick, "end a session gracefully")
    sub.add_argument("session", help="session ID")

    jobs = groups.add_parser("jobs", help="disk jobs").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    sub = command(jobs, "watch", jobs_watch, "follow a job; exit 1 if it fails")
    sub.add_argument("job", help="job ID")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = resolve(args.url, args.token, args.config)
    except ConfigError as exc:
        sys.stderr.write(f"nbdweb: {exc}\n")
        return 2
    try:
        return args.func(Command(ApiClient(settings.url, settings.token), args))
    except ApiError as exc:
        sys.stderr.write(f"nbdweb: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
