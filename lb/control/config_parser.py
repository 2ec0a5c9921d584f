"""Validation of a parsed TOML document into an :class:`~lb.control.config.LbConfig` (the schema).

Every problem raises :class:`~lb.errors.ConfigError` as ``"<file>: <key path>: <problem>"``;
nothing is half-built. Use :func:`lb.control.config.load_config` rather than this module.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Mapping
from typing import Any

from lb.control.config import (
    DEFAULT_MAGLEV_SIZE,
    DEFAULT_SUPPORTED_VERSIONS,
    HEALTH_INTERVAL_RANGE,
    HEALTH_THRESHOLD_RANGE,
    HEALTH_TIMEOUT_RANGE,
    MAX_LB_SOURCES,
    MAX_MAGLEV_SIZE,
    MAX_SERVICES,
    MAX_SUPPORTED_VERSIONS,
    MIN_MAGLEV_SIZE,
    LbConfig,
    LbSection,
    ReturnMode,
    ServiceConfig,
    UnroutableShortHeader,
    parse_address,
    type_name,
)
from lb.control.config_digest import config_digest
from lb.control.config_service_parser import ServiceParser, addresses_collide
from lb.control.keys import read_token_file
from lb.core.addresses import Address, format_address
from lb.core.maglev import is_prime
from lb.core.quic_constants import is_reserved_version
from lb.errors import ConfigError

_LB_KEYS = frozenset(
    {
        "inside", "return_mode", "admin", "admin_token_file", "unroutable_short_header",
        "fallback_key_file", "maglev_size", "health_interval", "health_timeout",
        "health_threshold", "supported_versions", "lb_sources", "admin_bind_any",
    }
)  # fmt: skip
_TOP_KEYS = frozenset({"lb", "service", "version"})


class Parser(ServiceParser):
    """Walks the TOML document once: the top level and ``[lb]`` here, services in the base class."""

    def parse(self, data: object) -> LbConfig:
        top = self.table(data, "", _TOP_KEYS)
        if "lb" not in top:
            self.fail("lb", "required table [lb] is missing")
        version = self.typed(top, "version", "", int, "an integer")
        if version is None:
            version = 0
        elif not 0 <= version < 1 << 63:
            self.fail("version", f"must be 0..{(1 << 63) - 1}, got {version}")

        lb = self.parse_lb(top["lb"])

        raw_services = top.get("service")
        if raw_services is None:
            self.fail("service", "at least one [[service]] is required")
        if isinstance(raw_services, dict):
            self.fail("service", "must be an array of tables: write [[service]], not [service]")
        if not isinstance(raw_services, list):
            self.fail("service", f"must be an array of tables ([[service]]), got {type_name(raw_services)}")
        if not raw_services:
            self.fail("service", "at least one [[service]] is required")
        if len(raw_services) > MAX_SERVICES:
            self.fail(
                "service",
                f"at most {MAX_SERVICES} services, got {len(raw_services)} (each binds a socket and has its "
                "own Maglev table, rebuilt on every reload)",
            )
        fallback_file_key = self.key_file(top["lb"], "fallback_key_file", "lb")

        services: list[ServiceConfig] = []
        # Exact addresses already taken, so the checks across services stay linear in backends.
        vip_owner: dict[Address, int] = {}
        backend_owner: dict[Address, tuple[int, int]] = {}
        for index, raw in enumerate(raw_services):
            service = self.parse_service(raw, f"service[{index}]", lb, fallback_file_key)
            for other_index, other in enumerate(services):
                if other.name == service.name:
                    self.fail(
                        f"service[{index}].name",
                        f"duplicate service name {service.name!r} (also service[{other_index}])",
                    )
                if addresses_collide(other.vip, service.vip):
                    self.fail(
                        f"service[{index}].vip",
                        f"{format_address(service.vip)} collides with service[{other_index}].vip "
                        f"{format_address(other.vip)}; every service needs its own VIP",
                    )
            for b_index, b in enumerate(service.backends):
                bwhere = f"service[{index}].backend[{b_index}].address"
                if b.address in vip_owner:
                    self.fail(bwhere, f"{format_address(b.address)} is service[{vip_owner[b.address]}].vip")
                if b.address in backend_owner:
                    self.fail(
                        bwhere,
                        f"{format_address(b.address)} is also a backend of service[{backend_owner[b.address][0]}]; "
                        "a backend serves one service (it answers with that service's VIP)",
                    )
            if service.vip in backend_owner:
                other_index, b_index = backend_owner[service.vip]
                self.fail(f"service[{other_index}].backend[{b_index}].address",
                          f"{format_address(service.vip)} is service[{index}].vip")
            vip_owner.setdefault(service.vip, index)
            for b_index, b in enumerate(service.backends):
                backend_owner[b.address] = (index, b_index)
            services.append(service)

        config = LbConfig(path=self.path, lb=lb, services=tuple(services), version=version, digest="")
        return dataclasses.replace(config, digest=config_digest(config))

    def parse_lb(self, raw: object) -> LbSection:
        where = "lb"
        t = self.table(raw, where, _LB_KEYS, required=("inside",))
        inside = self.address(t, "inside", where)
        assert inside is not None
        inside_ip = ipaddress.ip_address(inside[0])
        if inside_ip.is_unspecified:
            self.fail(
                "lb.inside",
                f"{format_address(inside)} is a wildcard; give the exact address backends send to "
                "(they accept encapsulated datagrams only from it)",
            )
        if not (inside_ip.is_loopback or inside_ip.is_private or inside_ip.is_link_local):
            # The LB sends whatever arrives here from a backend address out of the VIP; on a
            # public address one spoofed datagram would make it a reflector (design §4).
            self.fail(
                "lb.inside",
                f"{format_address(inside)} is a public address; the backend-facing port must be on "
                "loopback or a private network",
            )
        return_mode = self.enum(t, "return_mode", where, ReturnMode, ReturnMode.VIA_LB)
        unroutable = self.enum(t, "unroutable_short_header", where, UnroutableShortHeader, UnroutableShortHeader.DROP)
        admin_bind_any = self.boolean(t, "admin_bind_any", where, False)
        admin = self.address(t, "admin", where, allow_port_zero=True)
        admin_token_file = self.file_path(t, "admin_token_file", where)
        if admin is not None:
            if admin_token_file is None:
                self.fail(
                    "lb.admin_token_file",
                    "required when lb.admin is set: every admin route except /healthz needs a bearer "
                    "token (create a 0600 file holding a random token)",
                )
            if not ipaddress.ip_address(admin[0]).is_loopback and not admin_bind_any:
                self.fail(
                    "lb.admin",
                    f"{format_address(admin)} is not a loopback address (127.0.0.0/8 or ::1); "
                    "set lb.admin_bind_any = true to expose the admin API",
                )
        if admin_token_file is not None:
            try:
                read_token_file(admin_token_file)
            except ConfigError as exc:
                self.fail("lb.admin_token_file", str(exc))
        fallback_key_file = self.file_path(t, "fallback_key_file", where)

        maglev_size = self.typed(t, "maglev_size", where, int, "an integer")
        if maglev_size is None:
            maglev_size = DEFAULT_MAGLEV_SIZE
        elif not MIN_MAGLEV_SIZE <= maglev_size <= MAX_MAGLEV_SIZE or not is_prime(maglev_size):
            self.fail(
                "lb.maglev_size",
                f"must be a prime number {MIN_MAGLEV_SIZE}..{MAX_MAGLEV_SIZE} (e.g. 65537), got {maglev_size}; "
                "the table builds in pure Python on every health change and reload, and larger tables "
                "take over 0.2 s",
            )

        def seconds(key: str, default: float, bounds: tuple[float, float]) -> float:
            value = self.typed(t, key, where, float, "a number of seconds")
            if value is None:
                return default
            low, high = bounds
            if not (math.isfinite(value) and low <= value <= high):
                self.fail(f"lb.{key}", f"must be {low:g}..{high:g} seconds, got {value:g}")
            return value

        health_interval = seconds("health_interval", 0.5, HEALTH_INTERVAL_RANGE)
        health_timeout = seconds("health_timeout", min(0.5, health_interval), HEALTH_TIMEOUT_RANGE)
        if health_timeout > health_interval:
            self.fail(
                "lb.health_timeout",
                f"must not exceed lb.health_interval ({health_interval:g}), got {health_timeout:g}: one probe "
                "per backend is outstanding at a time, so a longer timeout would stretch the interval",
            )
        health_threshold = self.typed(t, "health_threshold", where, int, "an integer")
        low, high = HEALTH_THRESHOLD_RANGE
        if health_threshold is None:
            health_threshold = 3
        elif not low <= health_threshold <= high:
            self.fail(
                "lb.health_threshold",
                f"must be {low}..{high}, got {health_threshold} (consecutive missed probes before a backend "
                "is marked down)",
            )

        supported_versions = self.parse_versions(t)
        lb_sources = self.parse_lb_sources(t, inside)

        return LbSection(
            inside=inside,
            return_mode=return_mode,
            admin=admin,
            admin_token_file=admin_token_file,
            unroutable_short_header=unroutable,
            fallback_key_file=fallback_key_file,
            maglev_size=maglev_size,
            health_interval=health_interval,
            health_timeout=health_timeout,
            health_threshold=health_threshold,
            supported_versions=supported_versions,
            lb_sources=lb_sources,
            admin_bind_any=admin_bind_any,
        )

    def parse_versions(self, t: Mapping[str, Any]) -> tuple[int, ...]:
        raw = self.typed(t, "supported_versions", "lb", list, "an array of integers")
        if raw is None:
            return DEFAULT_SUPPORTED_VERSIONS
        if not raw:
            self.fail("lb.supported_versions", "must list at least one QUIC version")
        if len(raw) > MAX_SUPPORTED_VERSIONS:
            self.fail("lb.supported_versions", f"at most {MAX_SUPPORTED_VERSIONS} versions, got {len(raw)}")
        versions: dict[int, None] = {}  # ordered, and a linear duplicate check
        for index, value in enumerate(raw):
            where = f"lb.supported_versions[{index}]"
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(where, f"must be an integer such as 0x00000001, got {type_name(value)}")
            if not 1 <= value <= 0xFFFFFFFF:
                self.fail(where, f"must be 0x00000001..0xffffffff (0 is Version Negotiation), got {value}")
            if is_reserved_version(value):
                self.fail(where, f"0x{value:08x} is a reserved greasing version (RFC 9000 §15)")
            if value in versions:
                self.fail(where, f"duplicate version 0x{value:08x}")
            versions[value] = None
        return tuple(versions)

    def parse_lb_sources(self, t: Mapping[str, Any], inside: Address) -> tuple[Address, ...]:
        raw = self.typed(t, "lb_sources", "lb", list, 'an array of "IP:port" strings')
        if raw is None:
            return ()
        if len(raw) > MAX_LB_SOURCES:
            self.fail("lb.lb_sources", f"at most {MAX_LB_SOURCES} addresses, got {len(raw)}")
        sources: dict[Address, None] = {inside: None}  # ordered, and a linear duplicate check
        for index, value in enumerate(raw):
            where = f"lb.lb_sources[{index}]"
            address = parse_address(value, f"{self.path}: {where}")
            if address in sources:
                self.fail(where, f"duplicate address {format_address(address)}")
            sources[address] = None
        return tuple(sources)[1:]
