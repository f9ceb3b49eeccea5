"""nbdworker.tls: the server context built from a TLS policy, exercised with real TLS handshakes.

Each handshake runs between the worker's server context and a Python (OpenSSL) client context
over a pair of in-memory BIOs, in one thread: real TLS, nothing stubbed.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import stat
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from nbdworker import tls as worker_tls
from nbdworker.auth import ClientIdentity
from nbdworker.contract.config import TLSConfig
from nbdworker.tls import (
    TLSContextCache,
    TLSSetupError,
    build_server_context,
    check_peer,
    is_revoked,
    issuer_withdrawn,
)
from tests.support.pki import PKI, make_pki, tls_config_dict


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def policy(pki: PKI, **kwargs) -> TLSConfig:
    return TLSConfig.from_dict(tls_config_dict(pki, "FORCEDTLS", **kwargs))


def client_context(
    pki: PKI,
    name: str | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pki.ca.cert_pem)
    if name is not None:
        d = pki.client_dir(name)
        ctx.load_cert_chain(d / "client-cert.pem", d / "client-key.pem")
    if maximum is not None:
        if maximum < ssl.TLSVersion.TLSv1_2:
            # Let the client really offer the old version: Debian's OpenSSL forbids it by default,
            # and the refusal under test must come from the server.
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.maximum_version = maximum
    return ctx


@dataclasses.dataclass
class Outcome:
    server: ssl.SSLObject
    client: ssl.SSLObject
    server_error: ssl.SSLError | None = None
    client_error: ssl.SSLError | None = None

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Outcome:
    """Run one TLS handshake to its end (success, or an error on either side)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    out = Outcome(server, client)
    done = {"server": False, "client": False}
    for _ in range(100):
        for side, obj in (("client", client), ("server", server)):
            if done[side] or getattr(out, f"{side}_error") is not None:
                continue
            try:
                obj.do_handshake()
                done[side] = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError as exc:
                setattr(out, f"{side}_error", exc)
        moved = False
        if data := c_out.read():
            s_in.write(data)
            moved = True
        if data := s_out.read():
            c_in.write(data)
            moved = True
        if not moved and (all(done.values()) or out.server_error or out.client_error):
            break
    if out.ok:
        # TLS 1.3: the client finishes before the server has judged its certificate; a round
        # trip of application data surfaces a refusal on the client side too.
        try:
            client.write(b"ping")
            s_in.write(c_out.read())
            assert server.read(4) == b"ping"
        except ssl.SSLError as exc:
            out.server_error = exc
    return out


# -- protocol versions ----------------------------------------------------------------------------


def test_tls13_is_negotiated_when_the_client_offers_it(pki: PKI) -> None:
    out = handshake(build_server_context(policy(pki)), client_context(pki, "alice"))
    assert out.ok
    assert out.server.version() == "TLSv1.3"


def test_tls12_client_is_served_with_a_forward_secret_aead_cipher(pki: PKI) -> None:
    out = handshake(
        build_server_context(policy(pki)),
        client_context(pki, "alice", maximum=ssl.TLSVersion.TLSv1_2),
    )
    assert out.ok
    assert out.server.version() == "TLSv1.2"
    cipher = out.server.cipher()[0]
    assert cipher.startswith(("ECDHE-", "DHE-")), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("old", ["TLSv1_1", "TLSv1"])
def test_tls_older_than_12_is_refused_by_the_server(pki: PKI, old: str) -> None:
    maximum = getattr(ssl.TLSVersion, old)
    out = handshake(build_server_context(policy(pki)), client_context(pki, "alice", maximum))
    # The client did send its hello (no local failure): the server answered protocol_version.
    assert out.server_error is not None
    assert out.server_error.reason == "UNSUPPORTED_PROTOCOL"
    assert out.client_error is not None
    assert out.client_error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_min_version_13_refuses_a_tls12_client(pki: PKI) -> None:
    ctx = build_server_context(policy(pki, min_version="1.3"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    out = handshake(ctx, client_context(pki, "alice", maximum=ssl.TLSVersion.TLSv1_2))
    assert out.server_error is not None
    assert handshake(ctx, client_context(pki, "alice")).ok


# -- client verification --------------------------------------------------------------------------


def test_verification_none_serves_a_client_without_certificate(pki: PKI) -> None:
    out = handshake(
        build_server_context(policy(pki, client_verification="none")), client_context(pki)
    )
    assert out.ok
    assert check_peer(out.server, policy(pki, client_verification="none")).identity is None


def test_verification_none_does_not_ask_for_a_certificate(pki: PKI) -> None:
    # Even a certificate from an unknown CA is neither requested nor judged.
    out = handshake(
        build_server_context(policy(pki, client_verification="none")),
        client_context(pki, "mallory"),
    )
    assert out.ok
    assert out.server.getpeercert(binary_form=True) is None


def test_verification_optional_serves_a_client_without_certificate(pki: PKI) -> None:
    tls = policy(pki, client_verification="optional")
    out = handshake(build_server_context(tls), client_context(pki))
    assert out.ok
    peer = check_peer(out.server, tls)
    assert peer.identity is None
    assert peer.refusal is None


def test_verification_optional_identifies_a_client_with_certificate(pki: PKI) -> None:
    tls = policy(pki, client_verification="optional")
    out = handshake(build_server_context(tls), client_context(pki, "alice"))
    assert out.ok
    peer = check_peer(out.server, tls)
    assert peer.refusal is None
    assert peer.identity is not None
    assert peer.identity.common_names == ("alice",)
    assert peer.identity.serial == pki.clients["alice"].serial_hex


@pytest.mark.parametrize("verification", ["optional", "required"])
@pytest.mark.parametrize("client", ["mallory", "expired"])
def test_verification_refuses_a_certificate_that_does_not_verify(
    pki: PKI, verification: str, client: str
) -> None:
    out = handshake(
        build_server_context(policy(pki, client_verification=verification)),
        client_context(pki, client),
    )
    assert out.server_error is not None
    assert out.server_error.reason == "CERTIFICATE_VERIFY_FAILED"
    expected = "certificate has expired" if client == "expired" else "unable to get local issuer"
    assert expected in str(out.server_error)


def test_verification_required_refuses_a_client_without_certificate(pki: PKI) -> None:
    out = handshake(build_server_context(policy(pki)), client_context(pki))
    assert out.server_error is not None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in out.server_error.reason


def test_verification_required_serves_a_client_from_the_ca(pki: PKI) -> None:
    tls = policy(pki)
    out = handshake(build_server_context(tls), client_context(pki, "bob"))
    assert out.ok
    assert check_peer(out.server, tls).identity.common_names == ("bob",)


# -- revocation -----------------------------------------------------------------------------------


def test_revoked_serial_is_refused_after_the_handshake(pki: PKI) -> None:
    tls = policy(pki)
    out = handshake(build_server_context(tls), client_context(pki, "revoked"))
    # The certificate verifies: the policy's revocation list is what refuses it.
    assert out.ok
    peer = check_peer(out.server, tls)
    assert peer.refusal is not None
    assert pki.clients["revoked"].serial_hex in peer.refusal
    assert is_revoked(peer.identity, tls)


def test_revocation_list_matches_serials_written_with_colons_and_zeros(pki: PKI) -> None:
    serial = pki.clients["bob"].serial_hex
    spelled = "00" + ":".join(serial.upper()[i : i + 2] for i in range(0, len(serial), 2))
    tls = TLSConfig.from_dict({**tls_config_dict(pki, "FORCEDTLS"), "revoked_serials": [spelled]})
    out = handshake(build_server_context(tls), client_context(pki, "bob"))
    assert check_peer(out.server, tls).refusal is not None
    other = handshake(build_server_context(tls), client_context(pki, "alice"))
    assert check_peer(other.server, tls).refusal is None


# -- key handling ---------------------------------------------------------------------------------


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_key_is_loaded_without_files_and_without_leaking_descriptors(pki: PKI) -> None:
    tmp = Path(tempfile.gettempdir())
    before_tmp = set(tmp.iterdir())
    before_fds = _open_fds()
    for _ in range(5):
        build_server_context(policy(pki))
    assert _open_fds() <= before_fds
    assert set(tmp.iterdir()) == before_tmp


def test_key_fallback_file_is_private_and_removed(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A platform without memfd_create takes the file path.
    monkeypatch.delattr(os, "memfd_create")
    seen: list[tuple[int, int]] = []
    with worker_tls._private_file("server-key.pem", pki.server.key_pem.encode()) as path:
        seen.append((os.stat(path).st_mode, os.stat(os.path.dirname(path)).st_mode))
        assert Path(path).read_text() == pki.server.key_pem
    (file_mode, dir_mode) = seen[0]
    assert stat.S_IMODE(file_mode) == 0o600
    assert stat.S_IMODE(dir_mode) == 0o700
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.dirname(path))
    assert handshake(build_server_context(policy(pki)), client_context(pki, "alice")).ok


def test_mismatched_key_is_a_setup_error(pki: PKI) -> None:
    tls = dataclasses.replace(policy(pki), key_pem=pki.clients["alice"].key_pem)
    with pytest.raises(TLSSetupError, match="certificate and key"):
        build_server_context(tls)


def test_encrypted_key_is_a_setup_error_not_a_prompt(pki: PKI) -> None:
    encrypted = pki.server.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ).decode()
    with pytest.raises(TLSSetupError, match="encrypted"):
        build_server_context(dataclasses.replace(policy(pki), key_pem=encrypted))


def test_garbage_ca_bundle_is_a_setup_error(pki: PKI) -> None:
    tls = dataclasses.replace(
        policy(pki), ca_pem="-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(TLSSetupError, match="CA bundle"):
        build_server_context(tls)


# -- caching and rotation -------------------------------------------------------------------------


def test_cache_reuses_the_context_while_the_policy_is_unchanged(pki: PKI) -> None:
    cache = TLSContextCache()
    first = cache.get(policy(pki))
    assert cache.get(policy(pki)) is first
    # Revocations are judged after the handshake: changing them alone keeps the context.
    assert cache.get(policy(pki, revoked=("revoked", "bob"))) is first
    assert cache.get(policy(pki, client_verification="optional")) is not first


def test_changed_certificate_is_presented_to_new_connections(pki: PKI) -> None:
    cache = TLSContextCache()
    old_ctx = cache.get(policy(pki))
    rotated = pki.issue_server("rotated")
    new_ctx = cache.get(policy(pki, server=rotated))
    assert new_ctx is not old_ctx
    new = handshake(new_ctx, client_context(pki, "alice"))
    assert new.ok
    assert new.client.getpeercert(binary_form=True) == rotated.der
    # A connection accepted before the change keeps the context it was given.
    old = handshake(old_ctx, client_context(pki, "alice"))
    assert old.client.getpeercert(binary_form=True) == pki.server.der


# (client, CAs trusted before, CAs trusted after, ended?). "mallory" is issued by other_ca, the
# others by ca; a certificate whose issuer neither bundle holds directly (an intermediate's, say)
# cannot be judged and stays.
WITHDRAWN = [
    ("alice", ["ca"], ["other_ca"], True),
    ("alice", ["ca"], [], True),
    ("alice", ["ca"], ["ca", "other_ca"], False),
    ("alice", ["ca", "other_ca"], ["other_ca", "ca"], False),
    ("alice", ["ca"], ["ca"], False),
    ("mallory", ["ca"], ["ca"], False),
    ("mallory", ["ca"], ["other_ca"], False),
    ("mallory", ["ca", "other_ca"], ["ca"], True),
    (None, ["ca"], ["other_ca"], False),
]


@pytest.mark.parametrize(("client", "before", "after", "ended"), WITHDRAWN)
def test_issuer_withdrawn_ends_clients_of_a_ca_no_longer_trusted(
    pki: PKI, client: str | None, before: list[str], after: list[str], ended: bool
) -> None:
    def bundle(names: list[str]) -> TLSConfig:
        pem = "".join(getattr(pki, name).cert_pem for name in names)
        return dataclasses.replace(policy(pki), ca_pem=pem)

    identity = ClientIdentity.from_der(pki.clients[client].der) if client else None
    assert issuer_withdrawn(identity, bundle(before), bundle(after)) is ended


def test_issuer_withdrawn_survives_an_unreadable_bundle(pki: PKI) -> None:
    identity = ClientIdentity.from_der(pki.clients["alice"].der)
    old = policy(pki)
    assert issuer_withdrawn(identity, old, dataclasses.replace(old, ca_pem="not PEM")) is True
    assert issuer_withdrawn(identity, dataclasses.replace(old, ca_pem="garbage"), old) is False
