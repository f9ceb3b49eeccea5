"""The two ways a protocol exchange can go wrong, as in h11."""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError"]


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue.

    This is the only exception the parsers raise on bad input.
    """


class LocalProtocolError(Exception):
    """We used the API wrongly (a bug on our side), never caused by what the peer sent.

    Deliberately not a ProtocolError subclass: a handler that closes the connection on a peer
    error must not swallow our own bugs.
    """
