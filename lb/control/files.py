"""The one way quiclb reads a file it was pointed at: regular files only, size-capped, never blocking.

Configuration, key and token files are named by operators and may be anything:
a FIFO (an ``open()`` that waits forever for a writer), ``/dev/zero`` or a
symlink to it (a read that never ends), a directory, a huge file. Every such
file is opened with ``O_NONBLOCK`` (so opening a FIFO returns at once), checked
with ``fstat`` on the opened descriptor (so the file checked is the file read),
refused unless it is a regular file, refused if larger than the caller's cap,
and only then read — at most ``max_bytes + 1`` bytes, in case it grows.

Errors are :class:`~lb.errors.ConfigError` with one line: ``"<path>: <what> ..."``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lb.errors import ConfigError

#: Largest configuration file quiclb reads (issue 12: a config is kilobytes; 4 MiB is generous).
MAX_CONFIG_BYTES = 4 * 1024 * 1024

_READ_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class FileContent:
    """What :func:`read_regular_file` read, and the mode of the file it read it from."""

    data: bytes
    mode: int
    """``st_mode`` of the opened file (permission bits included)."""


def file_kind(mode: int) -> str:
    """A reader's name for the kind of file ``mode`` describes ("a FIFO", "a directory", ...)."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    for test, name in kinds:
        if test(mode):
            return name
    return "an unknown kind of file"


def _size_text(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB ({n} bytes)"
    return f"{n} bytes"


def check_regular_file(path: Path | str, what: str) -> None:
    """Raise :class:`~lb.errors.ConfigError` unless ``path`` is an existing regular file (symlinks followed).

    For files another process reads (backends read the TLS files): the same
    refusals as :func:`read_regular_file`, without reading.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: {what} is not a regular file ({file_kind(st.st_mode)}); refusing it")


def read_regular_file(path: Path | str, max_bytes: int, what: str) -> FileContent:
    """Read the regular file at ``path`` (symlinks followed), refusing anything else.

    ``what`` names the file in errors ("configuration", "key file"). Raises
    :class:`~lb.errors.ConfigError` when the file cannot be opened, is not a
    regular file (FIFO, device, directory, socket), or is larger than
    ``max_bytes``. Never blocks on a FIFO and never reads more than
    ``max_bytes + 1`` bytes.
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: {what} is not a regular file ({file_kind(st.st_mode)}); refusing it")
        if st.st_size > max_bytes:
            raise ConfigError(f"{path}: {what} is larger than {_size_text(max_bytes)}; refusing it")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # it grew while we read it, or fstat under-reported (/proc, FUSE)
            raise ConfigError(f"{path}: {what} is larger than {_size_text(max_bytes)}; refusing it")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return FileContent(b"".join(chunks), st.st_mode)
