"""The four TLS server modes and the rules that gate options and exports on them.

The whole table of /work/shared/nbd-protocol.md section 4.3 reduces to three questions, each
answered here in one place so that the handshake never tests the mode itself:

* is a whole option refused with ``TLS_REQD`` before TLS (FORCEDTLS: everything but STARTTLS and
  ABORT)?
* is one export unreachable before TLS (FORCEDTLS: all; SELECTIVETLS: those with
  ``tls_required``)?
* can this connection upgrade at all (not in NOTLS, and only for fixed-newstyle clients)?

OPTIONALTLS is SELECTIVETLS without TLS-only exports: ``tls_required`` is ignored in that mode,
as in NOTLS. No such export gets this far: the server refuses to open an export with
``tls_required`` under either mode (``nbdworker.contract.config.tls_refusal``) rather than serve
it in plaintext, and the web side refuses to create one.
"""

from __future__ import annotations

from enum import Enum

from .constants import Option

__all__ = ["TLSMode", "export_needs_tls", "option_needs_tls", "tls_possible"]


class TLSMode(Enum):
    NOTLS = "notls"
    OPTIONALTLS = "optionaltls"
    FORCEDTLS = "forcedtls"
    SELECTIVETLS = "selectivetls"


# The spec exempts these from TLS_REQD in FORCEDTLS: the client needs STARTTLS to comply and
# ABORT to leave politely.
_UNGATED_OPTIONS = frozenset({Option.STARTTLS, Option.ABORT})


def tls_possible(mode: TLSMode, fixed_newstyle: bool) -> bool:
    """Whether STARTTLS can be accepted on this connection."""
    return mode is not TLSMode.NOTLS and fixed_newstyle


def option_needs_tls(mode: TLSMode, option: int, tls_active: bool) -> bool:
    """True when ``option`` (any code, known or not) must be answered ``TLS_REQD``."""
    return mode is TLSMode.FORCEDTLS and not tls_active and option not in _UNGATED_OPTIONS


def export_needs_tls(mode: TLSMode, tls_required: bool, tls_active: bool) -> bool:
    """True when an export may not be described, listed or opened yet."""
    if tls_active:
        return False
    if mode is TLSMode.FORCEDTLS:
        return True
    return mode is TLSMode.SELECTIVETLS and tls_required
