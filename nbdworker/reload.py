"""Which live connections a new configuration must end.

A connection keeps the config it started with, except where the new one withdraws what the
connection is using: its export is removed or disabled (or now refused, e.g. a path outside the
storage roots, or `tls_required` under a mode that cannot enforce it), the export or the policy
now demands TLS the connection does not have, the export's network or client rules no longer
admit it, its client certificate is revoked, a client certificate is now required and it has
none, TLS 1.3 is now required and it runs TLS 1.2, a writable export became read-only or the
image shrank (what was negotiated at the handshake would be a lie), or the CA that issued its
client certificate left the trusted bundle. Anything else — a new description, block sizes,
another image path, a grown image, a new export — applies to new connections only. Not
covered: a client certificate issued by an intermediate CA is not re-verified when the bundle
changes (the chain it presented is not kept); revoke it to end such a client at once.
"""

from __future__ import annotations

from nbdworker.auth import authorize_export
from nbdworker.exports import ServerState
from nbdworker.protocol.tlsmode import export_needs_tls
from nbdworker.session import SessionRecord
from nbdworker.tls import is_revoked, issuer_withdrawn

__all__ = ["ending_reason"]


def ending_reason(session: SessionRecord, state: ServerState) -> str | None:
    """Why `session` (in transmission) may not go on under `state`; None if it may."""
    entry = session.entry
    if entry is None:
        return None
    old = entry.config
    new_entry = state.exports.get(old.name)
    if new_entry is None:
        return "export removed, disabled or refused"
    new = new_entry.config
    tls = session.tls
    # The handshake's own rule, so a live session ends exactly when a new one would be refused.
    if export_needs_tls(state.tls_mode, new.tls_required, tls):
        return "TLS is now required"
    identity = session.identity
    refusal = authorize_export(new, session.address, identity)
    if refusal is not None:
        return f"no longer authorized: {refusal}"
    policy = state.config.tls
    if is_revoked(identity, policy):
        return f"client certificate serial {identity.serial} revoked"  # type: ignore[union-attr]
    if tls and issuer_withdrawn(identity, session.state.config.tls, policy):
        return "the CA that issued its client certificate is no longer trusted"
    if tls and identity is None and policy.client_verification == "required":
        return "a client certificate is now required"
    if tls and policy.min_version == "1.3" and session.tls_version == "TLSv1.2":
        return "TLS 1.3 is now required"
    if new.read_only and not old.read_only:
        return "export became read-only"
    if new_entry.backend.size < entry.backend.size:
        # The size negotiated at the handshake now promises bytes that are gone.
        return "export shrank"
    return None
