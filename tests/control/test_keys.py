"""Key and token files (acceptance S-3, S-7)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lb.control.keys import KEY_LEN, generate_key, read_key_file, read_token_file, write_key_file
from lb.errors import ConfigError

KEY = bytes.fromhex("fdf726a9893ec05c0632d3956680baf0")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_generate_key_is_16_random_bytes() -> None:
    keys = {generate_key() for _ in range(64)}
    assert len(keys) == 64
    assert all(len(k) == KEY_LEN for k in keys)


def test_write_then_read_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    key = write_key_file(path)
    assert len(key) == KEY_LEN
    assert path.read_text() == key.hex() + "\n"
    assert _mode(path) == 0o600
    assert read_key_file(path) == key


def test_write_creates_private_parent_dir(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "echo-0.key"
    write_key_file(path, KEY)
    assert read_key_file(path) == KEY
    assert _mode(path.parent) & 0o077 == 0


def test_write_is_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k.key"
        write_key_file(path, KEY)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_key_file(path, KEY)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_key_file(path)
    assert read_key_file(path) == KEY


def test_write_overwrite_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_key_file(path, KEY)
    new = write_key_file(path, overwrite=True)
    assert new != KEY
    assert read_key_file(path) == new
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]  # no temporary left behind


@pytest.mark.parametrize("bad", [b"", b"\x00" * 15, b"\x00" * 17], ids=["empty", "15B", "17B"])
def test_write_rejects_wrong_length(tmp_path: Path, bad: bytes) -> None:
    with pytest.raises(ConfigError, match="16 bytes"):
        write_key_file(tmp_path / "k.key", bad)
    assert not (tmp_path / "k.key").exists()


@pytest.mark.parametrize(
    "text",
    [
        KEY.hex(),
        KEY.hex().upper() + "\n",
        "  " + KEY.hex() + "\n\n",
        ":".join(f"{b:02x}" for b in KEY),
        ":".join(f"{b:02X}" for b in KEY) + "\n",
    ],
    ids=["bare", "upper-newline", "whitespace", "yang-colons", "yang-upper"],
)
def test_read_accepts_hex_forms(tmp_path: Path, text: str) -> None:
    assert read_key_file(_private(tmp_path / "k.key", text)) == KEY


@pytest.mark.parametrize(
    "text",
    [
        "",
        KEY.hex()[:-2],
        KEY.hex() + "00",
        KEY.hex()[:-1] + "g",
        "0x" + KEY.hex(),
        KEY.hex()[:16] + " " + KEY.hex()[16:],
        ":".join(f"{b:02x}" for b in KEY)[:-3],
        "é" * 16,
    ],
    ids=["empty", "15B", "17B", "non-hex", "0x-prefix", "inner-space", "yang-short", "non-ascii"],
)
def test_read_rejects_bad_content_without_leaking_it(tmp_path: Path, text: str) -> None:
    path = _private(tmp_path / "k.key", text)
    with pytest.raises(ConfigError) as info:
        read_key_file(path)
    message = str(info.value)
    assert str(path) in message
    for i in range(0, len(KEY.hex()) - 7):
        assert KEY.hex()[i : i + 8] not in message.lower()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610])
def test_read_refuses_group_or_world_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    write_key_file(path, KEY)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        read_key_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert KEY.hex() not in message


def test_read_accepts_owner_read_only(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_key_file(path, KEY)
    path.chmod(0o400)
    assert read_key_file(path) == KEY


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read key file: No such file"):
        read_key_file(tmp_path / "absent.key")


def test_read_refuses_directory(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="regular file"):
        read_key_file(directory)


def test_read_refuses_huge_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than"):
        read_key_file(_private(tmp_path / "k.key", "0" * 10_000))


def test_token_roundtrip(tmp_path: Path) -> None:
    assert read_token_file(_private(tmp_path / "t", "  s3cr3t-Token_x-0123\n")) == "s3cr3t-Token_x-0123"


@pytest.mark.parametrize(
    ("text", "match"),
    [("", "empty"), (" \n\t", "empty"), ("two words", "visible ASCII"), ("tok\x01en", "visible ASCII"),
     ("fifteen-chars-x", "at least 16")],
    ids=["empty", "blank", "space", "control", "short"],
)
def test_token_rejects_bad_content(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        read_token_file(_private(tmp_path / "t", text))


def test_token_refuses_world_readable(tmp_path: Path) -> None:
    path = _private(tmp_path / "t", "sekrit-token-0123456")
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        read_token_file(path)
    assert "chmod 600" in str(info.value)
    assert "sekrit-token-0123456" not in str(info.value)
