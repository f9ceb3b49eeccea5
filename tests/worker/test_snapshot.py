"""nbdworker/contract/snapshot.py: signing, verification and the refusals, table by table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.snapshot import (
    FORMAT,
    SecretError,
    SnapshotError,
    canonical_json,
    key_id,
    load_secret,
    parse_notice,
    sign_snapshot,
    verify_snapshot,
)

SECRET = "test-secret-0123456789"


def make_config(generation: int = 5, node: str = "n1", **extra) -> WorkerConfig:
    return WorkerConfig.from_dict(
        {
            "version": 1,
            "generation": generation,
            "node": node,
            "exports": [{"name": "disk", "backend": "memory", "size": 1 << 20}],
            **extra,
        }
    )


def tamper(envelope: str, **changes) -> str:
    data = json.loads(envelope)
    data.update(changes)
    return json.dumps(data)


def test_signed_snapshot_round_trips() -> None:
    config = make_config()
    assert verify_snapshot(sign_snapshot(config, SECRET), SECRET, node="n1") == config


def test_signature_is_over_the_canonical_form_and_stable() -> None:
    config = make_config()
    assert sign_snapshot(config, SECRET) == sign_snapshot(config, SECRET)
    envelope = json.loads(sign_snapshot(config, SECRET))
    assert envelope["payload"] == canonical_json(config.to_dict())
    assert envelope["format"] == FORMAT
    assert envelope["alg"] == "HMAC-SHA256"
    assert envelope["kid"] == key_id(SECRET)


def test_bytes_and_str_secrets_agree() -> None:
    config = make_config()
    assert verify_snapshot(sign_snapshot(config, SECRET.encode()), SECRET) == config


def _payload_with(generation: int) -> str:
    return canonical_json(make_config(generation=generation).to_dict())


GOOD = sign_snapshot(make_config(), SECRET)

REFUSED = [
    ("wrong secret", sign_snapshot(make_config(), "another-secret"), "another key"),
    (
        "forged signature",
        tamper(GOOD, sig="0" * 64),
        "bad signature",
    ),
    (
        "payload changed after signing",
        tamper(GOOD, payload=_payload_with(99)),
        "bad signature",
    ),
    (
        "kid of our secret on a foreign signature",
        tamper(sign_snapshot(make_config(), "other"), kid=key_id(SECRET)),
        "bad signature",
    ),
    ("not JSON", "{nope", "not JSON"),
    ("not an object", "[1, 2]", "expected an object"),
    ("unknown format", tamper(GOOD, format="nbdweb-config-v0"), "unknown format"),
    ("unknown algorithm", tamper(GOOD, alg="none"), "unknown algorithm"),
    ("signature missing", tamper(GOOD, sig=None), "must be strings"),
    ("payload not a string", tamper(GOOD, payload={"version": 1}), "must be strings"),
    ("empty", "", "not JSON"),
]


@pytest.mark.parametrize(("case", "data", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_forged_and_malformed_snapshots_are_refused(case: str, data: str, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        verify_snapshot(data, SECRET)


def _signed_payload(payload: str) -> str:
    # A correctly signed envelope around an arbitrary payload: a web side bug, not a forgery.
    import hashlib
    import hmac

    kid = key_id(SECRET)
    sig = hmac.new(
        SECRET.encode(), f"{FORMAT}\n{kid}\n{payload}".encode(), hashlib.sha256
    ).hexdigest()
    return canonical_json(
        {"format": FORMAT, "alg": "HMAC-SHA256", "kid": kid, "payload": payload, "sig": sig}
    )


INVALID_PAYLOADS = [
    ("payload not JSON", "{", "payload is not JSON"),
    ("schema version", canonical_json({"version": 2}), "unsupported schema version"),
    (
        "bad export",
        canonical_json({"version": 1, "exports": [{"name": "x", "backend": "file"}]}),
        "path: is required",
    ),
    (
        "relative path",
        canonical_json(
            {"version": 1, "exports": [{"name": "x", "backend": "file", "path": "a.img"}]}
        ),
        "absolute path",
    ),
    ("unknown field", canonical_json({"version": 1, "surprise": 1}), "unknown field"),
]


@pytest.mark.parametrize(
    ("case", "payload", "message"), INVALID_PAYLOADS, ids=[c[0] for c in INVALID_PAYLOADS]
)
def test_signed_but_invalid_configs_are_refused(case: str, payload: str, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        verify_snapshot(_signed_payload(payload), SECRET)


GENERATIONS = [
    # (snapshot generation, applied generation, accepted)
    (6, 5, True),
    (5, 5, False),
    (4, 5, False),
    (1, 0, True),
    (0, 0, False),
]


@pytest.mark.parametrize(("generation", "applied", "accepted"), GENERATIONS)
def test_only_a_newer_generation_is_accepted(generation: int, applied: int, accepted: bool) -> None:
    envelope = sign_snapshot(make_config(generation=generation), SECRET)
    if accepted:
        assert verify_snapshot(envelope, SECRET, after_generation=applied).generation == generation
    else:
        with pytest.raises(SnapshotError, match="not newer"):
            verify_snapshot(envelope, SECRET, after_generation=applied)


def test_a_snapshot_for_another_node_is_refused() -> None:
    with pytest.raises(SnapshotError, match="for node 'n2'"):
        verify_snapshot(sign_snapshot(make_config(node="n2"), SECRET), SECRET, node="n1")


def test_an_empty_secret_is_refused_on_both_sides() -> None:
    with pytest.raises(SecretError):
        sign_snapshot(make_config(), "")
    with pytest.raises(SecretError):
        verify_snapshot(GOOD, "")


NOTICES = [
    ("n1:5", ("n1", 5)),
    (b"node.a-b_c:123", ("node.a-b_c", 123)),
    ("n1:", None),
    (":5", None),
    ("n1:x", None),
    ("garbage", None),
    # Hostile publishers: a Unicode digit passes str.isdigit() but not int(); bytes that are
    # not UTF-8; a sign, spaces and an absurdly long number.
    ("n1:\u00b2", None),
    ("n1:\u0663", None),
    (b"n1:\xff\xfe", None),
    (b"\xff:5", None),
    ("n1:-5", None),
    ("n1:+5", None),
    ("n1: 5", None),
    ("n1:" + "9" * 100, None),
]


@pytest.mark.parametrize(("message", "parsed"), NOTICES)
def test_parse_notice(message, parsed) -> None:
    assert parse_notice(message) == parsed


def test_load_secret_prefers_the_environment(tmp_path: Path) -> None:
    (tmp_path / "config_secret").write_text("from-file\n")
    env = {"NBDWEB_CONFIG_SECRET": "from-env", "NBDWEB_DATA_DIR": str(tmp_path)}
    assert load_secret(env) == "from-env"


def test_load_secret_reads_the_data_dir_file_the_web_side_generates(tmp_path: Path) -> None:
    (tmp_path / "config_secret").write_text("from-file\n")
    assert load_secret({"NBDWEB_DATA_DIR": str(tmp_path)}) == "from-file"


def test_a_missing_secret_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="NBDWEB_CONFIG_SECRET is unset"):
        load_secret({"NBDWEB_DATA_DIR": str(tmp_path)})
    (tmp_path / "config_secret").write_text("\n")
    with pytest.raises(SecretError, match="empty"):
        load_secret({"NBDWEB_DATA_DIR": str(tmp_path)})


@pytest.mark.parametrize(
    ("envelope", "kwargs", "kind"),
    [
        (lambda: sign_snapshot(make_config(), "another-secret-0123456789"), {}, "bad_signature"),
        (lambda: tamper(sign_snapshot(make_config(), SECRET), sig="0" * 64), {}, "bad_signature"),
        (lambda: sign_snapshot(make_config(node="n2"), SECRET), {"node": "n1"}, "other_node"),
        (
            lambda: sign_snapshot(make_config(generation=3), SECRET),
            {"after_generation": 3},
            "old_generation",
        ),
        (lambda: "not json", {}, "malformed"),
    ],
    ids=["another secret", "bad signature", "other node", "old generation", "malformed"],
)
def test_each_refusal_says_its_kind_for_the_counter(envelope, kwargs, kind) -> None:
    # The worker counts refusals by this kind (nbdworker_config_rejected_total), not by
    # searching the message.
    with pytest.raises(SnapshotError) as refused:
        verify_snapshot(envelope(), SECRET, **kwargs)
    assert refused.value.kind == kind
