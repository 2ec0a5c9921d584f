"""Write a complete quiclb deployment (TOML + key + token files) into a directory.

Used by the tests, the benchmarks and ``quiclb demo``: one place that knows the
schema (design.md §5), so none of them hand-writes TOML.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from lb.control.keys import generate_key, write_key_file
from lb.core.addresses import format_address, ip_version


def free_udp_port(host: str = "127.0.0.1", hold: list[socket.socket] | None = None) -> int:
    """An ephemeral UDP port that was free a moment ago (bind port 0, read it).

    With ``hold``, the socket stays open (appended to the list) so that the
    next call cannot return the same port; close them all once every port is
    chosen.
    """
    family = socket.AF_INET6 if ip_version(host) == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    port = int(s.getsockname()[1])
    if hold is None:
        s.close()
    else:
        hold.append(s)
    return port


def free_tcp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ip_version(host) == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class CidConfigSpec:
    config_id: int = 0
    server_id_len: int = 2
    nonce_len: int = 14
    plaintext: bool = False
    self_encode_length: bool = True
    key: bytes | None = None  # None: a fresh key is generated (unless plaintext)


@dataclass
class BackendSpec:
    server_id: str
    port: int = 0  # 0: pick a free port
    host: str = "127.0.0.1"
    state: str = "active"


@dataclass
class ServiceSpec:
    name: str = "echo"
    vip_host: str = "127.0.0.1"
    vip_port: int = 0
    cid_configs: list[CidConfigSpec] = field(default_factory=lambda: [CidConfigSpec()])
    backends: list[BackendSpec] = field(default_factory=list)
    #: Retry offload ("off", "always", "flood") and its threshold; a retry key file is written when on.
    retry: str = "off"
    retry_flood_threshold: int | None = None
    #: Write a reset key file and name it (stateless resets from the LB and the backends).
    reset_key: bool = False


@dataclass
class Deployment:
    """What was written; re-``write()`` after editing the specs to produce a reload."""

    directory: Path
    services: list[ServiceSpec]
    inside_host: str = "127.0.0.1"
    inside_port: int = 0
    admin: bool = True
    admin_port: int = 0  # 0: ephemeral (each LB instance binds its own)
    return_mode: str = "via-lb"
    unroutable_short_header: str = "drop"
    health_interval: float = 0.5
    health_timeout: float = 0.5
    health_threshold: int = 3
    version: int = 1
    extra_lb: str = ""
    #: Write ``fallback.key`` (as ``quiclb keygen -o`` does) and name it in ``[lb].fallback_key_file``:
    #: a secret fallback hash key, stable across CID key rotation. False: the public derived key.
    fallback_key: bool = True
    #: Write one self-signed certificate for every service's backends (clients verify it via ``cert_path``).
    tls: bool = False
    keys: dict[tuple[str, int], bytes] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.directory / "lb.toml"

    @property
    def cert_path(self) -> Path:
        return self.directory / "tls" / "cert.pem"

    @property
    def token(self) -> str:
        return (self.directory / "admin.token").read_text().strip()

    @property
    def inside(self) -> tuple[str, int]:
        return (self.inside_host, self.inside_port)

    def vip(self, name: str | None = None) -> tuple[str, int]:
        svc = self.service(name)
        return (svc.vip_host, svc.vip_port)

    def service(self, name: str | None = None) -> ServiceSpec:
        if name is None:
            return self.services[0]
        return next(s for s in self.services if s.name == name)

    def key(self, service: str, config_id: int) -> bytes | None:
        return self.keys.get((service, config_id))

    def write(self) -> Path:
        """(Re)write the TOML; allocates ports and keys the first time they are needed."""
        held: list[socket.socket] = []
        try:
            return self._write(held)
        finally:
            for s in held:
                s.close()

    def _write(self, held: list[socket.socket]) -> Path:
        d = self.directory
        (d / "keys").mkdir(parents=True, exist_ok=True)
        if self.inside_port == 0:
            self.inside_port = free_udp_port(self.inside_host, held)
        token = d / "admin.token"
        if self.admin and not token.exists():
            write_key_file(token)  # 32 hex chars of `secrets`, mode 0600: a fine bearer token
        inside = format_address((self.inside_host, self.inside_port))
        lines = [f"version = {self.version}", "", "[lb]", f'inside = "{inside}"',
                 f'return_mode = "{self.return_mode}"', f'unroutable_short_header = "{self.unroutable_short_header}"',
                 f"health_interval = {self.health_interval}", f"health_timeout = {self.health_timeout}",
                 f"health_threshold = {self.health_threshold}"]
        if self.admin:
            lines += [f'admin = "127.0.0.1:{self.admin_port}"', 'admin_token_file = "admin.token"']
        if self.fallback_key:
            if not (d / "fallback.key").exists():
                write_key_file(d / "fallback.key")
            lines.append('fallback_key_file = "fallback.key"')
        if self.extra_lb:
            lines.append(self.extra_lb)
        if self.tls and not self.cert_path.exists():
            _write_self_signed(self.cert_path, self.directory / "tls" / "key.pem")
        for svc in self.services:
            if svc.vip_port == 0:
                svc.vip_port = free_udp_port(svc.vip_host, held)
            vip = format_address((svc.vip_host, svc.vip_port))
            lines += ["", "[[service]]", f'name = "{svc.name}"', f'vip = "{vip}"', *self._stateless_lines(svc)]
            if self.tls:
                lines += ['certificate = "tls/cert.pem"', 'private_key = "tls/key.pem"']
            for c in svc.cid_configs:
                lines += ["", "[[service.cid_config]]", f"config_id = {c.config_id}",
                          f"server_id_len = {c.server_id_len}", f"nonce_len = {c.nonce_len}",
                          f"self_encode_length = {'true' if c.self_encode_length else 'false'}"]
                if c.plaintext:
                    lines.append("plaintext = true")
                else:
                    key_path = d / "keys" / f"{svc.name}-{c.config_id}.key"
                    if (svc.name, c.config_id) not in self.keys:
                        key = c.key or generate_key()
                        write_key_file(key_path, key, overwrite=True)
                        self.keys[(svc.name, c.config_id)] = key
                    lines.append(f'key_file = "keys/{key_path.name}"')
            for b in svc.backends:
                if b.port == 0:
                    b.port = free_udp_port(b.host, held)
                lines += ["", "[[service.backend]]", f'server_id = "{b.server_id}"',
                          f'address = "{format_address((b.host, b.port))}"', f'state = "{b.state}"']
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.path)  # atomic: a reload never reads a half-written file
        return self.path


    def _stateless_lines(self, svc: ServiceSpec) -> list[str]:
        """The service's retry and reset keys (written once, like `quiclb keygen`) and settings."""
        lines: list[str] = []
        for wanted, kind in ((svc.retry != "off", "retry"), (svc.reset_key, "reset")):
            if not wanted:
                continue
            key_path = self.directory / "keys" / f"{svc.name}-{kind}.key"
            if not key_path.exists():
                write_key_file(key_path)
            lines.append(f'{kind}_key_file = "keys/{key_path.name}"')
        if svc.retry != "off":
            lines.append(f'retry = "{svc.retry}"')
        if svc.retry_flood_threshold is not None:
            lines.append(f"retry_flood_threshold = {svc.retry_flood_threshold}")
        return lines


def _write_self_signed(cert_path: Path, key_path: Path) -> None:
    """A localhost certificate shared by a service's backends, so clients can verify it."""
    import os  # noqa: PLC0415

    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    from backends.tls import generate_self_signed  # noqa: PLC0415 - test infrastructure only

    identity = generate_self_signed("localhost")
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(identity.certificate_pem)
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
