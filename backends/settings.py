"""What one backend process needs to know, taken from the shared TOML file (design §5).

:class:`BackendSettings` is a frozen value: a reload builds a new one and the
server swaps it in whole (or refuses it). Tests build it directly, without a
file; the CLI builds it with :func:`settings_from_config`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lb.core.cid_config import CidConfig
from lb.errors import ConfigError

if TYPE_CHECKING:
    from lb.control.config import LbConfig

Address = tuple[str, int]

#: Where the AWS Load Balancer Controller hands each pod its QUIC server ID (design §5, NLB profile):
#: base64, or ``0x`` + hex as the NLB API writes it.
AWS_SERVER_ID_ENV = "AWS_LBC_QUIC_SERVER_ID"

#: Return-path modes of design §4 (the values of ``[lb] return_mode``).
RETURN_VIA_LB = "via-lb"
RETURN_DIRECT = "direct"
RETURN_MODES = (RETURN_VIA_LB, RETURN_DIRECT)


@dataclass(frozen=True)
class BackendSettings:
    """One backend's view of the configuration.

    ``cid_configs`` lists the service's QUIC-LB configurations in file order;
    new CIDs are minted with the last one (design §5: rotation appends).
    """

    #: This backend's server ID (``server_id_len`` bytes of the newest config).
    server_id: bytes
    #: Where the backend's UDP socket binds (the LB sends encapsulated datagrams here).
    address: Address
    #: The service's VIP: destination in reply headers, source of direct replies.
    vip: Address
    cid_configs: tuple[CidConfig, ...]
    #: The LB's inside address: where ``via-lb`` replies go; also an accepted source.
    lb_inside: Address
    #: Further addresses LB instances send from (port 0 = any port of that IP).
    lb_sources: tuple[Address, ...] = ()
    return_mode: str = RETURN_VIA_LB
    service: str = ""
    certificate: Path | None = None
    private_key: Path | None = None
    #: QUIC versions to accept; ``None`` keeps aioquic's defaults.
    supported_versions: tuple[int, ...] | None = None
    #: Server IDs of every backend of the service (for error messages).
    known_server_ids: tuple[bytes, ...] = field(default=())
    #: The service's ``retry`` ("off", "always", "flood") and the shared token key (issue 9).
    retry: str = "off"
    retry_key: bytes | None = field(default=None, repr=False)
    #: Stateless reset tokens are derived from this key (None: aioquic's random tokens, no resets).
    reset_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.cid_configs:
            raise ConfigError(f"service {self.service!r}: at least one cid_config is needed")
        if self.return_mode not in RETURN_MODES:
            raise ConfigError(f"lb.return_mode: must be one of {RETURN_MODES}, got {self.return_mode!r}")
        if len(self.server_id) != self.newest_cid_config.server_id_len:
            raise ConfigError(
                f"server_id {self.server_id.hex()}: must be {self.newest_cid_config.server_id_len} bytes "
                "(server_id_len of the newest cid_config)"
            )
        if (self.certificate is None) != (self.private_key is None):
            raise ConfigError(f"service {self.service!r}: certificate and private_key go together")
        if self.retry not in ("off", "always", "flood"):
            raise ConfigError(f"service {self.service!r}: retry must be 'off', 'always' or 'flood', got {self.retry!r}")
        if self.retry != "off" and self.retry_key is None:
            raise ConfigError(f"service {self.service!r}: retry = {self.retry!r} needs retry_key_file")

    @property
    def newest_cid_config(self) -> CidConfig:
        return self.cid_configs[-1]

    @property
    def cid_len(self) -> int:
        """Length of every CID this backend issues (aioquic's ``connection_id_length``)."""
        return self.newest_cid_config.cid_len

    @property
    def lb_addresses(self) -> tuple[Address, ...]:
        """Every address encapsulated datagrams may come from."""
        return (self.lb_inside, *self.lb_sources)


_HEX_DIGITS = re.compile(r"(?:[0-9a-fA-F]{2})+")


def parse_server_id_option(text: str) -> bytes:
    """``--server-id``: hex, with or without ``0x`` (``0001``, ``0x00000000000000ab``)."""
    digits = text[2:] if text[:2].lower() == "0x" else text
    if not digits:
        raise ConfigError("--server-id: must not be empty")
    if not _HEX_DIGITS.fullmatch(digits):
        raise ConfigError(f"--server-id: {text!r} is not hex (e.g. 0001)")
    return bytes.fromhex(digits)


def server_id_from_environment(environ: Mapping[str, str]) -> bytes | None:
    """The server ID in :data:`AWS_SERVER_ID_ENV`, or ``None`` when the variable is unset.

    ``0x`` + hex digits is the NLB API's form; anything else must be base64,
    the controller's form (``AAAAAAAAAAE=`` for ``0x0000000000000001``). A
    bare hex string would be ambiguous (``00000000000000ab`` is valid base64
    too), so it is read as base64, as the controller means it.
    """
    text = environ.get(AWS_SERVER_ID_ENV)
    if text is None:
        return None
    text = text.strip()
    hex_form = text[:2].lower() == "0x"
    try:
        if hex_form and not _HEX_DIGITS.fullmatch(text[2:]):
            raise ValueError("not hex digits")
        server_id = bytes.fromhex(text[2:]) if hex_form else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise ConfigError(f"{AWS_SERVER_ID_ENV}: {text[:64]!r} is neither base64 nor 0x + hex digits") from None
    if not server_id:
        raise ConfigError(f"{AWS_SERVER_ID_ENV}: must not be empty")
    return server_id


def _mode_text(mode: object) -> str:
    """``ReturnMode`` is a str enum; accept it or a plain string."""
    value = getattr(mode, "value", mode)
    return str(value)


def settings_from_config(config: LbConfig, server_id: bytes, service: str | None = None) -> BackendSettings:
    """Select this backend's entry from a loaded configuration.

    Raises :class:`ConfigError` naming the service's known server IDs when
    ``server_id`` is not one of them.
    """
    svc = config.service(service)
    backend = None
    try:
        backend = svc.backend_by_server_id(server_id)
    except (KeyError, LookupError):
        backend = None
    known = tuple(b.server_id for b in svc.backends)
    if backend is None:
        names = ", ".join(sid.hex() for sid in known) or "none"
        raise ConfigError(
            f"server id {server_id.hex()} is not a backend of service {svc.name!r}; known server IDs: {names}"
        )
    lb = config.lb
    versions = getattr(lb, "supported_versions", None)
    return BackendSettings(
        server_id=bytes(server_id),
        address=backend.address,
        vip=svc.vip,
        cid_configs=tuple(svc.cid_configs),
        lb_inside=lb.inside,
        lb_sources=tuple(lb.lb_sources),
        return_mode=_mode_text(lb.return_mode),
        service=svc.name,
        certificate=svc.certificate,
        private_key=svc.private_key,
        supported_versions=tuple(versions) if versions else None,
        known_server_ids=known,
        retry=_mode_text(svc.retry),
        retry_key=svc.retry_key,
        reset_key=svc.reset_key,
    )


def canonical_ip(host: str) -> str:
    """Canonical text of an IP address; IPv4-mapped IPv6 becomes plain IPv4."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def source_matcher(addresses: Sequence[Address]) -> tuple[frozenset[Address], frozenset[str]]:
    """Exact (ip, port) pairs plus IPs allowed from any port (configured with port 0)."""
    exact = frozenset((canonical_ip(h), p) for h, p in addresses if p != 0)
    any_port = frozenset(canonical_ip(h) for h, p in addresses if p == 0)
    return exact, any_port
