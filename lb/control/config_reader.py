"""Primitives for reading one TOML table: typed keys, enums, addresses, paths and secret files.

:class:`TableReader` knows nothing of the configuration's schema; the schema is
:mod:`lb.control.config_parser`. Every problem raises
:class:`~lb.errors.ConfigError` as ``"<file>: <key path>: <problem>"``.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from lb.control.config import parse_address, type_name
from lb.control.keys import read_key_file
from lb.core.addresses import Address
from lb.errors import ConfigError

_T = TypeVar("_T")
_E = TypeVar("_E", bound=Enum)


def join(prefix: str, key: str) -> str:
    """The key path of ``key`` inside the table at ``prefix`` (``"lb" + "inside"`` -> ``"lb.inside"``)."""
    return f"{prefix}.{key}" if prefix else key


class TableReader:
    """Reads typed values out of TOML tables of the file at ``path``; ``fail`` raises the first problem."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        # key bytes -> key path that first used it (S-3: one key per config and tenant)
        self.key_owners: dict[bytes, str] = {}

    def fail(self, key_path: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.path}: {key_path}: {problem}")

    def table(
        self, value: object, where: str, allowed: frozenset[str], required: Collection[str] = ()
    ) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, f"must be a table, got {type_name(value)}")
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.fail(join(where, str(key)), f"unknown key {key!r}{suggestion}")
        for key in required:
            if key not in value:
                self.fail(join(where, key), "required key is missing")
        return value

    def typed(self, table: Mapping[str, Any], key: str, where: str, kind: type[_T], what: str) -> _T | None:
        if key not in table:
            return None
        value = table[key]
        # bool is an int subclass; TOML keeps them distinct, so do we.
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            self.fail(join(where, key), f"must be {what}, got {type_name(value)}")
        return value  # type: ignore[no-any-return]

    def string(self, table: Mapping[str, Any], key: str, where: str) -> str | None:
        return self.typed(table, key, where, str, "a string")

    def boolean(self, table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        value = self.typed(table, key, where, bool, "a boolean (true or false)")
        return default if value is None else value

    def enum(self, table: Mapping[str, Any], key: str, where: str, kind: type[_E], default: _E) -> _E:
        value = self.string(table, key, where)
        if value is None:
            return default
        for member in kind:
            if member.value == value:
                return member
        choices = " or ".join(repr(m.value) for m in kind)
        self.fail(join(where, key), f"must be {choices}, got {value!r}")

    def address(
        self, table: Mapping[str, Any], key: str, where: str, *, allow_port_zero: bool = False
    ) -> Address | None:
        if key not in table:
            return None
        return parse_address(table[key], f"{self.path}: {join(where, key)}", allow_port_zero=allow_port_zero)

    def file_path(self, table: Mapping[str, Any], key: str, where: str) -> Path | None:
        value = self.string(table, key, where)
        if value is None:
            return None
        if not value or "\x00" in value:
            self.fail(join(where, key), "must be a non-empty file path")
        return (self.base / value).absolute()

    def key_file(self, table: Mapping[str, Any], key: str, where: str) -> bytes | None:
        path = self.file_path(table, key, where)
        if path is None:
            return None
        key_path = join(where, key)
        try:
            secret = read_key_file(path)
        except ConfigError as exc:
            self.fail(key_path, str(exc))
        first = self.key_owners.setdefault(secret, key_path)
        if first != key_path:
            self.fail(
                key_path,
                f"uses the same key as {first}; every configuration and service needs its own key "
                "(acceptance S-3); create one with `quiclb keygen`",
            )
        return secret
