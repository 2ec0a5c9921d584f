"""Load and validate the TOML configuration (design.md §5, a contract).

One file is read by every LB instance and every backend. It is validated as a
whole into frozen dataclasses; the first problem found raises
:class:`~lb.errors.ConfigError` whose message is ``"<file>: <key path>: <problem>"``,
for example ``lb.toml: service[0].cid_config[1].nonce_len: must be 4..18, got 3``.
Nothing is half-applied: callers get a complete :class:`LbConfig` or an error,
so a failed reload keeps the running configuration (acceptance F-5).

Extensions beyond design.md §5 (all optional, keys only added, none renamed):
top-level ``version``; in ``[lb]``: ``maglev_size``, ``health_interval``,
``health_timeout``, ``health_threshold``, ``supported_versions``, ``lb_sources``
and ``admin_bind_any``.

Identity: :attr:`LbConfig.digest` is a SHA-256 over a canonical JSON form of
the validated values, with key material replaced by fingerprints, so every
process that reads equal files (and equal key files) reports the same digest
(design implication 5). It does not depend on where the file lives.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from lb.control.config_model import (
    DEFAULT_MAGLEV_SIZE,
    DEFAULT_SUPPORTED_VERSIONS,
    MAGLEV_SLOTS_PER_BACKEND,
    MAX_CID_CONFIGS,
    MAX_MAGLEV_SIZE,
    Address,
    BackendConfig,
    BackendState,
    LbConfig,
    LbSection,
    ReturnMode,
    ServiceConfig,
    UnroutableShortHeader,
    derive_fallback_key,
    parse_address,
)
from lb.control.config_parser import Parser
from lb.control.files import MAX_CONFIG_BYTES, read_regular_file
from lb.core.addresses import format_address
from lb.core.maglev import is_prime
from lb.errors import ConfigError, LbError

__all__ = [
    "DEFAULT_MAGLEV_SIZE",
    "DEFAULT_SUPPORTED_VERSIONS",
    "MAGLEV_SLOTS_PER_BACKEND",
    "MAX_CID_CONFIGS",
    "MAX_MAGLEV_SIZE",
    "Address",
    "BackendConfig",
    "BackendState",
    "LbConfig",
    "LbSection",
    "ReturnMode",
    "ServiceConfig",
    "UnroutableShortHeader",
    "derive_fallback_key",
    "format_address",
    "is_prime",
    "load_config",
    "parse_address",
    "parse_config",
]


def load_config(path: str | Path) -> LbConfig:
    """Read, parse and validate the TOML file at ``path``.

    Raises only :class:`~lb.errors.ConfigError` (one line, naming the file) for
    anything wrong with the file or its content, so a reload can always be
    rejected cleanly: a FIFO, device or directory, a file over
    :data:`~lb.control.files.MAX_CONFIG_BYTES`, bad UTF-8 or TOML, values
    nested too deeply for the parser, and any unexpected failure while validating.
    """
    path = Path(path)
    raw = read_regular_file(path, MAX_CONFIG_BYTES, "configuration").data
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: byte {exc.start}: not valid UTF-8 (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if where:
            base = message[: where.start()].rstrip()
            raise ConfigError(
                f"{path}: line {where.group(1)}, column {where.group(2)}: TOML syntax error: {base}"
            ) from None
        raise ConfigError(f"{path}: TOML syntax error: {message}") from None
    except RecursionError:
        raise ConfigError(f"{path}: TOML values are nested too deeply to parse; refusing it") from None
    except Exception as exc:  # tomllib has no other documented errors; never let one escape a reload
        raise ConfigError(f"{path}: TOML parser failed: {_one_line(exc)}") from None
    return parse_config(data, path)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def parse_config(data: dict[str, Any], path: Path) -> LbConfig:
    """Validate an already-parsed TOML document; relative paths resolve against ``path.parent``.

    Raises only :class:`~lb.errors.ConfigError`: a failure the validator did not
    anticipate (a bug, or a document nested too deeply) is reported as one.
    """
    path = Path(path)
    try:
        return Parser(path).parse(data)
    except LbError:
        raise
    except RecursionError:
        raise ConfigError(f"{path}: values are nested too deeply to validate; refusing them") from None
    except Exception as exc:
        raise ConfigError(f"{path}: unexpected error while validating: {_one_line(exc)}") from None
