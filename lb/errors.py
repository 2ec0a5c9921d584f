"""The project's exception tree: one error type per kind of bad input."""

from __future__ import annotations


class LbError(Exception):
    """Base class of every error quiclb raises on purpose."""


class MalformedDatagram(LbError):
    """Untrusted network bytes that cannot be parsed; the only error a parser may raise.

    ``reason`` is a short, stable label (``"empty"``, ``"truncated"``, ...) used as
    the ``malformed_dropped{reason}`` counter label.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ConfigError(LbError, ValueError):
    """An invalid configuration; the message names the file, the key path and the problem."""


class NonceExhausted(LbError):
    """A CID issuer has used every nonce its configuration allows under one key."""


class BindError(LbError):
    """A socket could not be bound to a configured address (in use, not on this host, ...)."""
