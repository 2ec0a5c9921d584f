"""Validation of one ``[[service]]`` with its ``cid_config`` and ``backend`` tables (design.md §5).

Part of :class:`~lb.control.config_parser.Parser`, which checks what spans
services (names, VIPs, backends shared between them); errors as there.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from lb.control.config import (
    DEFAULT_RETRY_FLOOD_THRESHOLD,
    MAGLEV_SLOTS_PER_BACKEND,
    MAX_BACKENDS_PER_SERVICE,
    MAX_CID_CONFIGS,
    MAX_MAGLEV_SIZE,
    RETRY_FLOOD_THRESHOLD_RANGE,
    BackendConfig,
    BackendState,
    LbSection,
    RetryMode,
    ReturnMode,
    ServiceConfig,
    derive_fallback_key,
)
from lb.control.config_reader import TableReader
from lb.control.files import check_regular_file
from lb.core.addresses import Address, format_address
from lb.core.cid_config import UNROUTABLE_CONFIG_ID, CidConfig
from lb.errors import ConfigError

_SERVICE_KEYS = frozenset({
    "name", "vip", "certificate", "private_key", "cid_config", "backend",
    "retry", "retry_key_file", "retry_flood_threshold", "reset_key_file",
})
_CID_CONFIG_KEYS = frozenset({"config_id", "server_id_len", "nonce_len", "key_file", "plaintext", "self_encode_length"})
_BACKEND_KEYS = frozenset({"server_id", "address", "state"})
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX = re.compile(r"[0-9a-fA-F]+")


def addresses_collide(a: Address, b: Address) -> bool:
    """Two UDP bind addresses collide: same port and same IP, or either is a wildcard."""
    if a[1] != b[1]:
        return False
    if a[0] == b[0]:
        return True
    return ipaddress.ip_address(a[0]).is_unspecified or ipaddress.ip_address(b[0]).is_unspecified


def address_family(address: Address) -> int:
    """4 or 6."""
    return ipaddress.ip_address(address[0]).version


class ServiceParser(TableReader):
    """Reads service tables; :class:`~lb.control.config_parser.Parser` drives it."""

    def parse_service(
        self, raw: object, where: str, lb: LbSection, fallback_file_key: bytes | None
    ) -> ServiceConfig:
        t = self.table(raw, where, _SERVICE_KEYS, required=("name", "vip", "cid_config"))
        name = self.string(t, "name", where)
        assert name is not None
        if not _SERVICE_NAME.fullmatch(name):
            self.fail(
                f"{where}.name",
                f"must be 1..64 characters of letters, digits, '_', '.', '-', starting with a letter "
                f"or digit (it appears in metrics labels and --service), got {name!r}",
            )
        vip = self.address(t, "vip", where)
        assert vip is not None
        if addresses_collide(vip, lb.inside):
            self.fail(
                f"{where}.vip",
                f"{format_address(vip)} collides with lb.inside {format_address(lb.inside)}; "
                "the VIP and the backend-facing address must differ",
            )

        if lb.return_mode is ReturnMode.DIRECT and address_family(vip) == 6:
            self.fail(
                f"{where}.vip",
                f"{format_address(vip)}: return_mode \"direct\" supports IPv4 VIPs only (the backends "
                "forge the VIP as source with a raw IPv4 socket)",
            )
        certificate = self.file_path(t, "certificate", where)
        private_key = self.file_path(t, "private_key", where)
        if (certificate is None) != (private_key is None):
            missing = "private_key" if private_key is None else "certificate"
            self.fail(f"{where}.{missing}", "certificate and private_key must be set together (or neither)")
        for key, file in (("certificate", certificate), ("private_key", private_key)):
            if file is not None:
                try:
                    check_regular_file(file, "TLS file")
                except ConfigError as exc:
                    self.fail(f"{where}.{key}", str(exc))

        raw_configs = t["cid_config"]
        if not isinstance(raw_configs, list):
            self.fail(f"{where}.cid_config", "must be an array of tables: write [[service.cid_config]]")
        if not 1 <= len(raw_configs) <= MAX_CID_CONFIGS:
            self.fail(
                f"{where}.cid_config",
                f"must list 1..{MAX_CID_CONFIGS} configurations (config IDs 0..6), got {len(raw_configs)}",
            )
        cid_configs: list[CidConfig] = []
        for index, raw_config in enumerate(raw_configs):
            config = self.parse_cid_config(raw_config, f"{where}.cid_config[{index}]")
            for other_index, other in enumerate(cid_configs):
                if other.config_id == config.config_id:
                    self.fail(
                        f"{where}.cid_config[{index}].config_id",
                        f"duplicate config_id {config.config_id} (also {where}.cid_config[{other_index}])",
                    )
            if cid_configs and config.server_id_len != cid_configs[0].server_id_len:
                self.fail(
                    f"{where}.cid_config[{index}].server_id_len",
                    f"must equal {where}.cid_config[0].server_id_len ({cid_configs[0].server_id_len}), "
                    f"got {config.server_id_len}: each backend has one server ID used with every "
                    "cid_config of its service",
                )
            cid_configs.append(config)
        sid_len = cid_configs[0].server_id_len

        raw_backends = t.get("backend", [])
        if not isinstance(raw_backends, list):
            self.fail(f"{where}.backend", "must be an array of tables: write [[service.backend]]")
        count = len(raw_backends)
        if count * MAGLEV_SLOTS_PER_BACKEND > lb.maglev_size:  # before the work that grows with count
            limit = (f"; at most {MAX_BACKENDS_PER_SERVICE} backends per service (lb.maglev_size <= "
                     f"{MAX_MAGLEV_SIZE})" if count > MAX_BACKENDS_PER_SERVICE else "")
            self.fail(
                "lb.maglev_size",
                f"must be at least {MAGLEV_SLOTS_PER_BACKEND} x the backend count of {where} "
                f"({MAGLEV_SLOTS_PER_BACKEND} x {count} = {MAGLEV_SLOTS_PER_BACKEND * count}), "
                f"got {lb.maglev_size}{limit}",
            )
        backends: list[BackendConfig] = []
        by_sid: dict[bytes, int] = {}
        by_address: dict[Address, int] = {}
        for index, raw_backend in enumerate(raw_backends):
            bwhere = f"{where}.backend[{index}]"
            backend = self.parse_backend(raw_backend, bwhere, sid_len)
            if backend.server_id in by_sid:
                also = f"(also {where}.backend[{by_sid[backend.server_id]}])"
                self.fail(f"{bwhere}.server_id", f"duplicate server_id {backend.server_id.hex()} {also}")
            if backend.address in by_address:
                also = f"(also {where}.backend[{by_address[backend.address]}])"
                self.fail(f"{bwhere}.address", f"duplicate address {format_address(backend.address)} {also}")
            by_sid[backend.server_id] = by_address[backend.address] = index
            if address_family(backend.address) != address_family(lb.inside):
                self.fail(
                    f"{bwhere}.address",
                    f"{format_address(backend.address)} is IPv{address_family(backend.address)} but lb.inside "
                    f"{format_address(lb.inside)} is IPv{address_family(lb.inside)}; the LB sends to backends "
                    "from the inside socket, so both must be the same family",
                )
            for label, own in (("lb.inside", lb.inside), (f"{where}.vip", vip)):
                if backend.address == own:
                    self.fail(
                        f"{bwhere}.address",
                        f"{format_address(backend.address)} is {label}; the LB would send to itself",
                    )
            backends.append(backend)

        retry, retry_key, threshold, reset_key = self.parse_stateless(t, where)
        # Not from the CID keys: rotating them must not move handshakes in flight (hole 2).
        fallback_key = derive_fallback_key(name, fallback_file_key)
        return ServiceConfig(
            name=name,
            vip=vip,
            certificate=certificate,
            private_key=private_key,
            cid_configs=tuple(cid_configs),
            backends=tuple(backends),
            fallback_key=fallback_key,
            linkable=any(c.key is None for c in cid_configs),
            retry=retry,
            retry_key=retry_key,
            retry_flood_threshold=threshold,
            reset_key=reset_key,
        )

    def parse_stateless(
        self, t: Mapping[str, Any], where: str
    ) -> tuple[RetryMode, bytes | None, int, bytes | None]:
        """``retry``, ``retry_key_file``, ``retry_flood_threshold`` and ``reset_key_file`` (issue 9)."""
        retry = self.enum(t, "retry", where, RetryMode, RetryMode.OFF)
        retry_key = self.key_file(t, "retry_key_file", where)
        if retry is not RetryMode.OFF and retry_key is None:
            self.fail(
                f"{where}.retry_key_file",
                f'required with retry = "{retry.value}": the LB and the backends share it to mint and check '
                "Retry tokens (create one with `quiclb keygen`)",
            )
        threshold = self.typed(t, "retry_flood_threshold", where, int, "an integer")
        low, high = RETRY_FLOOD_THRESHOLD_RANGE
        if threshold is None:
            threshold = DEFAULT_RETRY_FLOOD_THRESHOLD
        elif not low <= threshold <= high:
            self.fail(f"{where}.retry_flood_threshold",
                      f"must be {low}..{high} tokenless Initials per second, got {threshold}")
        return retry, retry_key, threshold, self.key_file(t, "reset_key_file", where)

    def parse_cid_config(self, raw: object, where: str) -> CidConfig:
        t = self.table(raw, where, _CID_CONFIG_KEYS, required=("config_id", "server_id_len", "nonce_len"))
        config_id = t["config_id"]
        if config_id == UNROUTABLE_CONFIG_ID and not isinstance(config_id, bool):
            self.fail(
                f"{where}.config_id",
                "config_id 7 (0b111) is reserved for unroutable CIDs (draft-ietf-quic-load-balancers-21 "
                "§3.2); use 0..6",
            )
        plaintext = self.boolean(t, "plaintext", where, False)
        has_key_file = "key_file" in t
        if has_key_file and plaintext:
            self.fail(f"{where}.plaintext", "set either key_file or plaintext = true, not both")
        if not has_key_file and not plaintext:
            self.fail(
                f"{where}.key_file",
                'missing: add key_file = "..." (create one with `quiclb keygen`), or set plaintext = true '
                "to accept linkable CIDs",
            )
        key = self.key_file(t, "key_file", where)
        try:
            return CidConfig(
                config_id=config_id,
                server_id_len=t["server_id_len"],
                nonce_len=t["nonce_len"],
                key=key,
                self_encode_length=t.get("self_encode_length", True),
            )
        except ValueError as exc:
            # CidConfig names the field first ("nonce_len: must be 4..18, got 3").
            self.fail(where + "." + str(exc).split(": ", 1)[0], str(exc).split(": ", 1)[-1])

    def parse_backend(self, raw: object, where: str, sid_len: int) -> BackendConfig:
        t = self.table(raw, where, _BACKEND_KEYS, required=("server_id", "address"))
        sid_text = self.string(t, "server_id", where)
        assert sid_text is not None
        if not _HEX.fullmatch(sid_text) or len(sid_text) % 2:
            example = "00" * (sid_len - 1) + "01"
            problem = f"must be an even number of hex digits (e.g. {example!r}), got {sid_text!r}"
            self.fail(f"{where}.server_id", problem)
        server_id = bytes.fromhex(sid_text)
        if len(server_id) != sid_len:
            self.fail(
                f"{where}.server_id",
                f"must be {sid_len} bytes ({2 * sid_len} hex digits) to match server_id_len of every "
                f"cid_config of this service (one server ID per backend), got {len(server_id)}",
            )
        address = self.address(t, "address", where)
        assert address is not None
        state = self.enum(t, "state", where, BackendState, BackendState.ACTIVE)
        return BackendConfig(server_id=server_id, address=address, state=state)
