"""The `quiclb` command line: codec, keygen, check-config, exit codes and error messages."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lb.cli import main
from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec

WORKED_KEY = "fdf726a9893ec05c0632d3956680baf0"


def quiclb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_cid_encode_and_decode_from_flags_reproduce_the_worked_example(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--key", WORKED_KEY]
    assert main(["cid", "encode", *flags, "--server-id", "31441a", "--nonce", "9c69c275"]) == 0
    assert capsys.readouterr().out.strip() == "0767947d29be054a"
    assert main(["cid", "decode", *flags, "0767947d29be054a"]) == 0
    out = capsys.readouterr().out
    assert "server_id   31441a" in out and "nonce       9c69c275" in out


def test_cid_decode_with_a_config_file_names_the_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dep = Deployment(tmp_path, [ServiceSpec(backends=[BackendSpec("0001", port=5001), BackendSpec("0002", port=5002)])],
                     admin=False)
    dep.write()
    assert main(["cid", "encode", "-c", str(dep.path), "--server-id", "0002"]) == 0
    cid = capsys.readouterr().out.strip()
    assert len(bytes.fromhex(cid)) == 17
    assert main(["cid", "decode", "-c", str(dep.path), cid]) == 0
    assert "backend     127.0.0.1:5002 (active)" in capsys.readouterr().out
    # A CID for an unassigned server ID, and a 0b111 CID: unroutable, exit 1.
    assert main(["cid", "encode", "-c", str(dep.path), "--server-id", "0777"]) == 0
    stray = capsys.readouterr().out.strip()
    assert main(["cid", "decode", "-c", str(dep.path), stray]) == 1
    assert "not assigned" in capsys.readouterr().out
    assert main(["cid", "decode", "-c", str(dep.path), "e7" + "00" * 7]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cid", "encode", "--config-id", "0", "--server-id", "01"], "give -c FILE, or all of"),
        (["cid", "encode", "--config-id", "7", "--server-id-len", "3", "--nonce-len", "4", "--plaintext",
          "--server-id", "010203"], "config_id: must be 0..6, got 7"),
        (["cid", "encode", "--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--key", "00",
          "--server-id", "010203"], "key: must be exactly 16 bytes"),
        (["cid", "encode", "--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--plaintext",
          "--server-id", "zz"], "--server-id: not valid hex"),
        (["cid", "encode", "--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--plaintext",
          "--server-id", "01"], "server_id: must be 3 bytes"),
        (["cid", "encode", "--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--plaintext",
          "--key", WORKED_KEY, "--server-id", "010203"], "exactly one of --key, --key-file, --plaintext"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_keygen_writes_a_0600_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    assert main(["keygen", "-o", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = bytes.fromhex(path.read_text().strip())
    assert len(key) == 16
    assert main(["keygen", "-o", str(path)]) == 2  # exists: refused
    assert bytes.fromhex(path.read_text().strip()) == key
    assert main(["keygen", "-o", str(path), "--force"]) == 0
    assert bytes.fromhex(path.read_text().strip()) != key


def test_keygen_prints_distinct_keys() -> None:
    a, b = quiclb("keygen").stdout.strip(), quiclb("keygen").stdout.strip()
    assert len(bytes.fromhex(a)) == 16 and a != b


@pytest.mark.parametrize("fallback_key", [True, False], ids=["fallback_key_file", "derived"])
def test_check_config_flags_a_public_fallback_key(tmp_path: Path, fallback_key: bool) -> None:
    dep = Deployment(tmp_path, [ServiceSpec(backends=[BackendSpec("0001")])], admin=False, fallback_key=fallback_key)
    dep.write()
    ok = quiclb("check-config", "-c", str(dep.path))
    assert ok.returncode == 0, ok.stderr
    assert ("fallback key PUBLIC" in ok.stdout) is not fallback_key, ok.stdout


def test_check_config_reports_ok_and_names_the_bad_key(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, [ServiceSpec(backends=[BackendSpec("0001")])], admin=False)
    dep.write()
    ok = quiclb("check-config", "-c", str(dep.path))
    assert ok.returncode == 0 and "OK" in ok.stdout and "single-pass" in ok.stdout
    dep.path.write_text(dep.path.read_text().replace("nonce_len = 14", "nonce_len = 18"))
    bad = quiclb("check-config", "-c", str(dep.path))
    assert bad.returncode == 2
    assert "service[0].cid_config[0]" in bad.stderr and "19" in bad.stderr
    assert "Traceback" not in bad.stderr


# ---- issue 12 items 6 and 9, issue 13 item 5: one line, the right exit code, never a traceback


#: An INFO/DEBUG log record (``run`` logs its start and stop); anything else on stderr is an error line.
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ (DEBUG|INFO) ")


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if not LOG_RECORD.match(line)]
    assert len(lines) == 1, result.stderr[-3000:]
    assert result.returncode == code, (result.returncode, result.stderr)
    assert lines[0].startswith("quiclb: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("target", "kind"),
    [("symlink", "a symbolic link"), ("device", "a character device"), ("fifo", "a FIFO"),
     ("directory", "a directory")],
)
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_keygen_never_replaces_anything_but_a_regular_file(tmp_path: Path, target: str, kind: str,
                                                           force: bool) -> None:
    path = tmp_path / "k.key"
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    if target == "symlink":
        path.symlink_to(victim)
    elif target == "device":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 7))  # a private /dev/full (CI runs as root)
    elif target == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.mkdir()
    before = os.lstat(path)
    args = ["keygen", "-o", str(path)] + (["--force"] if force else [])
    assert_one_line_error(quiclb(*args), 2, str(path), f"refusing to write a key over {kind}")
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert victim.read_text() == "keep me\n"


def test_keygen_without_force_does_not_follow_a_dangling_symlink(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.symlink_to(tmp_path / "elsewhere.key")
    assert_one_line_error(quiclb("keygen", "-o", str(path)), 2, str(path))
    assert not (tmp_path / "elsewhere.key").exists()


@pytest.mark.parametrize("parent", ["missing-grandparent", "file-as-parent"])
def test_keygen_into_a_bad_parent_is_one_line(tmp_path: Path, parent: str) -> None:
    if parent == "missing-grandparent":
        path = tmp_path / "no" / "such" / "k.key"
        fragment = "does not exist"
    else:
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "k.key"
        fragment = "not a directory"
    assert_one_line_error(quiclb("keygen", "-o", str(path)), 2, str(path.parent), fragment)
    assert not (tmp_path / "no").exists()


def _deployment(tmp_path: Path, **kwargs: object) -> Deployment:
    dep = Deployment(tmp_path, [ServiceSpec(backends=[BackendSpec("0001")])], **kwargs)  # type: ignore[arg-type]
    dep.write()
    return dep


@pytest.mark.parametrize(
    ("vip", "problem"),
    [("[::ffff:127.0.0.1]:4433", "IPv4-mapped"), ("[fe80::1%lo]:4433", "scope"), ("[fe80::1]:4433", "link-local")],
)
def test_check_config_refuses_vips_no_socket_can_bind(tmp_path: Path, vip: str, problem: str) -> None:
    dep = _deployment(tmp_path, admin=False)
    text = dep.path.read_text()
    dep.path.write_text(text.replace(f'vip = "127.0.0.1:{dep.vip()[1]}"', f'vip = "{vip}"'))
    assert_one_line_error(quiclb("check-config", "-c", str(dep.path)), 2, "service[0].vip", problem)


def test_run_with_the_vip_port_taken_is_one_line_exit_1(tmp_path: Path) -> None:
    dep = _deployment(tmp_path, admin=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(dep.vip())
        result = quiclb("run", "-c", str(dep.path))
    assert_one_line_error(result, 1, f"127.0.0.1:{dep.vip()[1]}", "in use")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_with_the_admin_port_taken_is_one_line_exit_1(tmp_path: Path, workers: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        dep = _deployment(tmp_path, admin=True, admin_port=port)
        result = quiclb("run", "-c", str(dep.path), "--workers", workers)
    assert_one_line_error(result, 1, str(port), "in use")


def test_run_with_an_address_not_on_this_host_is_one_line_exit_1(tmp_path: Path) -> None:
    dep = _deployment(tmp_path, admin=False)
    text = dep.path.read_text().replace(f'vip = "127.0.0.1:{dep.vip()[1]}"', 'vip = "192.0.2.1:4433"')
    dep.path.write_text(text)
    assert quiclb("check-config", "-c", str(dep.path)).returncode == 0  # valid: another host may have it
    assert_one_line_error(quiclb("run", "-c", str(dep.path)), 1, "192.0.2.1", "not an address of this host")


def test_workers_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    dep = _deployment(tmp_path, admin=False)
    assert_one_line_error(quiclb("run", "-c", str(dep.path), "--workers", "100000"), 2, "--workers")


def test_workers_supervisor_gives_up_on_a_worker_that_is_not_ready_in_time(tmp_path: Path) -> None:
    dep = _deployment(tmp_path, admin=False)
    result = quiclb("run", "-c", str(dep.path), "--workers", "2", "--ready-timeout", "0.001")
    assert_one_line_error(result, 1, "not ready within 0.001 s")


# ---- issue 9: retry and reset keys are checked like every other key


def test_check_config_shows_retry_and_resets_and_names_a_missing_retry_key(tmp_path: Path) -> None:
    spec = ServiceSpec(backends=[BackendSpec("0001")], retry="flood", retry_flood_threshold=500, reset_key=True)
    dep = Deployment(tmp_path, [spec], admin=False)
    dep.write()
    ok = quiclb("check-config", "-c", str(dep.path))
    assert ok.returncode == 0, ok.stderr
    assert "retry flood (above 500/s)  resets on" in ok.stdout, ok.stdout
    text = dep.path.read_text()
    dep.path.write_text(text.replace('retry_key_file = "keys/echo-retry.key"\n', ""))
    assert_one_line_error(quiclb("check-config", "-c", str(dep.path)), 2, "service[0].retry_key_file", "required")
    dep.path.write_text(text.replace('retry = "flood"', 'retry = "sometimes"'))
    assert_one_line_error(quiclb("check-config", "-c", str(dep.path)), 2, "service[0].retry", "'always'")
    dep.path.write_text(text.replace("retry_flood_threshold = 500", "retry_flood_threshold = 0"))
    assert_one_line_error(quiclb("check-config", "-c", str(dep.path)), 2, "service[0].retry_flood_threshold")
    (tmp_path / "keys" / "echo-reset.key").chmod(0o644)
    dep.path.write_text(text)
    assert_one_line_error(quiclb("check-config", "-c", str(dep.path)), 2, "reset_key_file", "chmod 600")
