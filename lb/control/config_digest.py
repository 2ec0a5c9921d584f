"""The configuration's identity: :attr:`~lb.control.config.LbConfig.digest`, derived from the dataclasses.

The digest is a SHA-256 over a canonical JSON form of the validated values, so
every process that reads equal files (and equal key files) reports the same
digest (design implication 5), wherever the file lives.

The canonical form walks :func:`dataclasses.fields` of :class:`LbConfig` and
everything below it, so a field added to the model is in the digest unless its
metadata says otherwise (a field of a type this module does not know fails
loudly instead of being skipped). What is in it, and what is not:

- every validated value, in the form the file means it: enums by value,
  addresses as ``"IP:port"``, server IDs as hex, versions as numbers;
- file paths relative to the configuration's directory, so moving a config
  together with its files keeps the digest;
- key material only as a one-way, domain-separated fingerprint (``cid_config``
  keys, each service's fallback key), never the bytes;
- ``fallback_key_file`` only as present or not (its key enters through the
  services' fallback keys);
- fields added later (``retry*``, ``reset_key``) only when not at their default, so
  files that do not use them keep their digest;
- not ``LbConfig.path`` (location), not ``digest`` itself, not
  ``ServiceConfig.linkable`` (derived from the cid_configs);
- order only where it means something: services are sorted by name and
  backends by server ID (tables are built sorted); cid_configs keep file order
  (backends mint with the last one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

from lb.control.config import DIGEST, DIGEST_UNLESS_DEFAULT, LbConfig
from lb.core.addresses import format_address
from lb.core.cid_config import CidConfig

#: Version of the canonical form; bump it when the form changes meaning.
CANONICAL_FORMAT = 1
_FINGERPRINT_PERSON = b"quiclb-keyfp"

#: Digest rules for fields of classes this package does not own (no metadata there).
_FOREIGN_RULES: dict[tuple[type, str], str] = {(CidConfig, "key"): "fingerprint"}


def fingerprint(key: bytes) -> str:
    """A one-way, domain-separated fingerprint of key material."""
    return hashlib.blake2b(key, digest_size=16, person=_FINGERPRINT_PERSON).hexdigest()


def canonical_form(config: LbConfig) -> dict[str, Any]:
    """The JSON-ready form the digest hashes (see the module docstring for what is in it)."""
    form = _canonical(config, config.path.parent.absolute())
    assert isinstance(form, dict)
    return {"format": CANONICAL_FORMAT, **form}


def config_digest(config: LbConfig) -> str:
    """SHA-256 hex of :func:`canonical_form`; ``config.digest`` itself is ignored."""
    encoded = json.dumps(canonical_form(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()


def _is_address(value: tuple[Any, ...]) -> bool:
    return len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int) and not isinstance(
        value[1], bool
    )


def _canonical(value: Any, base: Path) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _field(value, f, base)
            for f in dataclasses.fields(value)
            if _rule(value, f) != "omit"
            and not (f.metadata.get(DIGEST_UNLESS_DEFAULT) and getattr(value, f.name) == f.default)
        }
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return os.path.relpath(value, base)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple) and _is_address(value):
        return format_address(value)
    if isinstance(value, (tuple, list)):
        return [_canonical(item, base) for item in value]
    raise TypeError(f"config digest: no canonical form for {type(value).__name__}; add one or mark the field")


def _rule(owner: object, f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get(DIGEST, _FOREIGN_RULES.get((type(owner), f.name), "value")))


def _field(owner: object, f: dataclasses.Field[Any], base: Path) -> Any:
    value = getattr(owner, f.name)
    rule = _rule(owner, f)
    if rule == "fingerprint":
        return None if value is None else fingerprint(value)
    if rule == "presence":
        return value is not None
    if rule == "sorted":
        items = [_canonical(item, base) for item in value]
        return sorted(items, key=lambda item: str(item[f.metadata["sort_by"]]))
    if rule != "value":
        raise TypeError(f"config digest: unknown rule {rule!r} on field {f.name}")
    return _canonical(value, base)
