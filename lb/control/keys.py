"""Key and token files: generation, atomic private creation, strict loading.

Rules (acceptance S-3, S-7):

- keys are 16 bytes from :mod:`secrets`, stored as 32 hex digits and a newline;
- files are created ``0600`` in one step (``O_CREAT | O_EXCL``), never widened
  afterwards, and never silently overwritten;
- a key or token file that its group or other users can access is refused,
  with the fix (``chmod 600 ...``) in the message;
- no error message ever contains key or token material, not even a fragment.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from lb.control.files import file_kind, read_regular_file
from lb.errors import ConfigError

#: Length of a QUIC-LB AES-128 key, and of a fallback hash key file, in bytes.
KEY_LEN = 16
#: Key and token files are tiny; anything larger is not one of ours.
MAX_SECRET_FILE_BYTES = 4096
#: Permission bits that must be clear on a secret file (group and other: rwx).
_FORBIDDEN_MODE_BITS = 0o077

_HEX_KEY = re.compile(rf"[0-9a-fA-F]{{{2 * KEY_LEN}}}")
# draft-ietf-quic-load-balancers YANG `yang:hex-string` form: "fd:f7:26:...".
_COLON_HEX_KEY = re.compile(rf"[0-9a-fA-F]{{2}}(?::[0-9a-fA-F]{{2}}){{{KEY_LEN - 1}}}")


def generate_key() -> bytes:
    """Return a fresh 16-byte key from the OS CSPRNG (:func:`secrets.token_bytes`)."""
    return secrets.token_bytes(KEY_LEN)


def write_key_file(path: Path, key: bytes | None = None, *, overwrite: bool = False) -> bytes:
    """Write ``key`` (default: a new :func:`generate_key`) to ``path`` as hex, mode 0600.

    The file never exists with wider permissions or partial content: without
    ``overwrite`` it is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (an
    existing file or symlink is refused, so a key in use is never replaced by
    accident); with ``overwrite`` a private temporary file in the same directory
    is renamed over ``path``, and only an absent path or a regular file is ever
    replaced - never a symlink, device, FIFO or directory (checked with
    ``lstat``, so a symlink is not followed). A missing parent directory is
    created with mode 0700, one level only: a missing grandparent is an error,
    so a typo does not grow a directory tree. Every failure is a one-line
    :class:`~lb.errors.ConfigError`. Returns the key.
    """
    if key is None:
        key = generate_key()
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        raise ConfigError(f"{path}: a key must be exactly {KEY_LEN} bytes")
    key = bytes(key)
    data = (key.hex() + "\n").encode("ascii")
    path = Path(path)
    _ensure_parent(path.parent)
    try:
        if not overwrite:
            try:
                _write_new_private(path, data)
            except FileExistsError:
                _refuse_unless_absent_or_regular(path)  # a symlink, device, FIFO, directory: say which
                raise ConfigError(
                    f"{path}: refusing to overwrite an existing key file (a key in use would be lost); "
                    "delete it first or ask for overwrite"
                ) from None
            return key
        _refuse_unless_absent_or_regular(path)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        _write_new_private(tmp, data)
        try:
            _refuse_unless_absent_or_regular(path)  # again, just before the rename
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write key file: {exc.strerror}") from None
    return key


def _ensure_parent(parent: Path) -> None:
    """``parent`` is a directory, created (mode 0700) if it alone is missing."""
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        try:
            os.mkdir(parent, 0o700)
        except FileNotFoundError:
            raise ConfigError(f"{parent}: directory does not exist, nor does its parent; create it first") from None
        except OSError as exc:
            raise ConfigError(f"{parent}: cannot create directory: {exc.strerror}") from None
        return
    except NotADirectoryError:
        raise ConfigError(f"{parent}: not a directory (a path component is a file)") from None
    except OSError as exc:
        raise ConfigError(f"{parent}: cannot use directory: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{parent}: not a directory ({file_kind(st.st_mode)})")


def _refuse_unless_absent_or_regular(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise ConfigError(
            f"{path}: refusing to write a key over {file_kind(mode)}; only an absent path or a regular file "
            "is ever replaced"
        )


def _write_new_private(path: Path, data: bytes) -> None:
    """Create ``path`` exclusively with mode 0600 and write ``data``; remove it on failure."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        try:
            # The umask can only narrow 0600; fchmod pins it exactly.
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _read_private_file(path: Path, what: str) -> bytes:
    """Read a small regular file that only its owner may access (``mode & 0o077 == 0``).

    Read through :func:`~lb.control.files.read_regular_file` (no FIFO, device or
    huge file); the mode checked is the opened file's, so it is the file read.
    """
    content = read_regular_file(path, MAX_SECRET_FILE_BYTES, what)
    mode = stat.S_IMODE(content.mode)
    if mode & _FORBIDDEN_MODE_BITS:
        raise ConfigError(
            f"{path}: {what} has mode {mode:04o}, which lets group or other users access it; "
            f"refusing to use it. Fix: chmod 600 {path}"
        )
    return content.data


def read_key_file(path: Path) -> bytes:
    """Load a 16-byte key: 32 hex digits, or the colon-separated YANG form; whitespace ignored.

    Raises :class:`~lb.errors.ConfigError` naming the file (never its content)
    when the file is missing, group/world-accessible, or not a 16-byte hex key.
    """
    path = Path(path)
    raw = _read_private_file(path, "key file")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: key file is not ASCII hex text") from None
    if _COLON_HEX_KEY.fullmatch(text):
        text = text.replace(":", "")
    elif not _HEX_KEY.fullmatch(text):
        # Describe the shape only: a length or a count leaks nothing useful.
        hex_digits = sum(c in "0123456789abcdefABCDEF" for c in text)
        raise ConfigError(
            f"{path}: key file must hold exactly {2 * KEY_LEN} hex digits ({KEY_LEN} bytes, AES-128), "
            f"got {len(text)} characters of which {hex_digits} are hex digits; "
            "create one with `quiclb keygen`"
        )
    return bytes.fromhex(text)


#: Shortest admin token accepted (16 visible ASCII characters: about 100 bits when random).
MIN_TOKEN_LEN = 16


def read_token_file(path: Path) -> str:
    """Load the admin bearer token: owner-only file, stripped, non-empty, visible ASCII only.

    Visible ASCII (0x21..0x7e) is what an HTTP ``Authorization: Bearer`` value can carry.
    """
    path = Path(path)
    raw = _read_private_file(path, "token file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: token file must be ASCII text") from None
    if not token:
        raise ConfigError(f"{path}: token file is empty")
    if not all("\x21" <= c <= "\x7e" for c in token):
        raise ConfigError(f"{path}: token must be visible ASCII only (no spaces or control characters)")
    if len(token) < MIN_TOKEN_LEN:
        # The admin API serves the right token even to a peer locked out for wrong ones, so
        # the lockout does not slow guessing: the token's length is the defence.
        raise ConfigError(f"{path}: token must be at least {MIN_TOKEN_LEN} characters (got {len(token)}); "
                          "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token
