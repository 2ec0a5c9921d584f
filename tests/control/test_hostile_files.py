"""Hostile files as configuration, key or token: refused at once, in one line (issue 12 items 1-3).

Each case goes through the real command line (``python -m lb``) where a hang
or a traceback is what an operator would see; a subprocess timeout turns a
hang into a failure instead of a stuck test run.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lb.control.config import load_config
from lb.control.files import MAX_CONFIG_BYTES
from lb.errors import ConfigError
from quiclb_harness.admin_client import admin_json, admin_request
from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec
from quiclb_harness.processes import start_lb
from quiclb_harness.waiting import wait_until

#: Generous: the fixed code answers in well under a second; today's code hangs on a FIFO forever.
CLI_TIMEOUT = 20.0
#: Address-space cap for children that might read /dev/zero: a runaway read dies fast, not the host.
CHILD_MEMORY_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_LIMIT, CHILD_MEMORY_LIMIT))


def quiclb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, check=False, preexec_fn=_limit_memory)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert result.returncode == code, (result.returncode, result.stderr)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    d = Deployment(tmp_path / "dep", [ServiceSpec(backends=[BackendSpec("0001")])], admin=True,
                   fallback_key=False, extra_lb='fallback_key_file = "keys/fallback.key"')
    d.directory.mkdir()
    d.write()
    from lb.control.keys import write_key_file  # noqa: PLC0415

    write_key_file(d.directory / "keys" / "fallback.key")
    return d


def _fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)
    return path


# ---- item 1: FIFOs, devices and directories are not files we read


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_fifo_as_config_is_refused_at_once(tmp_path: Path, command: str) -> None:
    fifo = _fifo(tmp_path / "lb.toml")
    result = quiclb(command, "-c", str(fifo))
    assert_one_line_error(result, 2, str(fifo), "not a regular file", "FIFO")


@pytest.mark.parametrize("kind", ["dev-zero", "symlink-to-dev-zero", "directory"])
def test_device_or_directory_as_config_is_refused(tmp_path: Path, kind: str) -> None:
    if kind == "dev-zero":
        target = Path("/dev/zero")
    elif kind == "symlink-to-dev-zero":
        target = tmp_path / "lb.toml"
        target.symlink_to("/dev/zero")
    else:
        target = tmp_path
    result = quiclb("check-config", "-c", str(target))
    assert "MemoryError" not in result.stderr
    assert_one_line_error(result, 2, str(target), "not a regular file")


@pytest.mark.parametrize(
    ("file", "key_path"),
    [
        ("keys/echo-0.key", "service[0].cid_config[0].key_file"),
        ("admin.token", "lb.admin_token_file"),
        ("keys/fallback.key", "lb.fallback_key_file"),
    ],
)
def test_fifo_as_secret_file_is_refused_naming_file_and_key(dep: Deployment, file: str, key_path: str) -> None:
    fifo = _fifo(dep.directory / file)
    result = quiclb("check-config", "-c", str(dep.path))
    assert_one_line_error(result, 2, str(dep.path), key_path, str(fifo), "not a regular file", "FIFO")


def test_symlink_to_a_device_as_key_file_is_refused(dep: Deployment) -> None:
    key = dep.directory / "keys" / "echo-0.key"
    key.unlink()
    key.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"cid_config\[0\]\.key_file: .*not a regular file \(a character device\)"):
        load_config(dep.path)


# ---- item 2: size cap before reading


def test_oversized_config_is_refused_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "lb.toml"
    with big.open("wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ConfigError) as info:
        load_config(big)
    assert str(info.value) == f"{big}: configuration is larger than 4 MiB ({MAX_CONFIG_BYTES} bytes); refusing it"


def test_config_cap_is_four_mib() -> None:
    assert MAX_CONFIG_BYTES == 4 * 1024 * 1024


# ---- item 3: parser blow-ups are configuration errors


def _deep(depth: int = 10_000) -> str:
    return "x = " + "[" * depth + "]" * depth + "\n"


def test_deeply_nested_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(_deep())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "nested too deeply" in message and "\n" not in message


def test_deeply_nested_value_inside_a_valid_file_is_a_config_error(dep: Deployment) -> None:
    text = dep.path.read_text().replace("[lb]\n", "[lb]\n" + _deep(3_000), 1)
    dep.path.write_text(text)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(dep.path)


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_deeply_nested_toml_through_the_cli(tmp_path: Path, command: str) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(_deep())
    assert_one_line_error(quiclb(command, "-c", str(path)), 2, str(path), "nested too deeply")


def test_unexpected_validation_failure_is_a_config_error(dep: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any bug-class exception while validating content surfaces as a ConfigError naming the file."""
    import lb.control.config_parser as parser_module  # noqa: PLC0415

    def explode(*_args: object, **_kwargs: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(parser_module.Parser, "parse_backend", explode)
    with pytest.raises(ConfigError) as info:
        load_config(dep.path)
    assert str(info.value).startswith(f"{dep.path}: ") and "KeyError" in str(info.value)


@pytest.mark.parametrize("key", ["certificate", "private_key"])
def test_fifo_as_tls_file_is_named_for_what_it_is(dep: Deployment, key: str) -> None:
    tls = dep.directory / "tls"
    tls.mkdir(exist_ok=True)
    (tls / "cert.pem").write_text("c")
    (tls / "key.pem").write_text("k")
    _fifo(tls / ("cert.pem" if key == "certificate" else "key.pem"))
    text = dep.path.read_text().replace("[[service]]\n", '[[service]]\ncertificate = "tls/cert.pem"\n'
                                        'private_key = "tls/key.pem"\n', 1)
    dep.path.write_text(text)
    with pytest.raises(ConfigError, match=rf"service\[0\]\.{key}: .*not a regular file \(a FIFO"):
        load_config(dep.path)


# ---- the running LB: a hostile file is a rejected reload, and the LB keeps serving


def _deep_config(dep: Deployment) -> None:
    dep.path.write_text(_deep())


def _fifo_config(dep: Deployment) -> None:
    _fifo(dep.path)


def _dev_zero_config(dep: Deployment) -> None:
    dep.path.unlink()
    dep.path.symlink_to("/dev/zero")


def _fifo_key(dep: Deployment) -> None:
    _fifo(dep.directory / "keys" / "echo-0.key")


@pytest.mark.parametrize("spoil", [_deep_config, _fifo_config, _dev_zero_config, _fifo_key],
                         ids=["deep-toml", "fifo-config", "dev-zero-config", "fifo-key"])
@pytest.mark.parametrize("trigger", ["sighup", "post-reload"])
def test_hostile_file_is_a_rejected_reload_and_the_lb_keeps_serving(
    dep: Deployment, spoil: Callable[[Deployment], None], trigger: str
) -> None:
    lb = start_lb(dep.path)
    try:
        host, port = lb.wait_ready()["admin"].rsplit(":", 1)
        admin = (host, int(port))
        token = dep.token
        _, before = admin_json(admin, "/config", token)
        spoil(dep)
        if trigger == "sighup":
            lb.signal(signal.SIGHUP)
            wait_until(lambda: admin_json(admin, "/config", token)[1]["rejected"] == before["rejected"] + 1,
                       10.0, "the reload to be rejected")
        else:
            status, body = admin_request(admin, "POST", "/reload", token, timeout=10.0)
            assert status == 422, body
        _, after = admin_json(admin, "/config", token)
        assert after["digest"] == before["digest"]  # still the configuration it started with
        error = after["last_reload_error"]
        assert error and "\n" not in error and str(dep.directory) in error
        assert admin_request(admin, "GET", "/healthz", None)[0] == 200
        assert lb.alive()
        assert "Traceback" not in lb.output() and "never retrieved" not in lb.output()
    finally:
        lb.kill()


# ---- sizes inside a file under the cap: validation stays linear and bounded


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "lb.toml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size <= MAX_CONFIG_BYTES
    return path


_LB = ['[lb]', 'inside = "127.0.0.1:4434"']
_SERVICE = ['[[service.cid_config]]', 'config_id = 0', 'server_id_len = 3', 'nonce_len = 13', 'plaintext = true']


def _many_backends(tmp_path: Path) -> Path:
    lines = [*_LB, '[[service]]', 'name = "echo"', 'vip = "127.0.0.1:4433"', *_SERVICE]
    for i in range(1, 50_001):
        address = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:5"
        lines += ['[[service.backend]]', f'server_id = "{i:06x}"', f'address = "{address}"']
    return _write(tmp_path, lines)


def _many_services(tmp_path: Path) -> Path:
    lines = list(_LB)
    for i in range(20_000):
        lines += ['[[service]]', f'name = "s{i}"', f'vip = "127.1.{i >> 8}.{i & 255}:443"', *_SERVICE]
    return _write(tmp_path, lines)


def _many_versions(tmp_path: Path) -> Path:
    versions = ",".join(str(v) for v in range(0x10000000, 0x10000000 + 250_000))
    return _write(tmp_path, [*_LB, f"supported_versions = [{versions}]", '[[service]]', 'name = "e"',
                             'vip = "127.0.0.1:4433"', *_SERVICE])


def _many_sources(tmp_path: Path) -> Path:
    sources = ",".join(f'"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:4434"' for i in range(150_000))
    return _write(tmp_path, [*_LB, f"lb_sources = [{sources}]", '[[service]]', 'name = "e"',
                             'vip = "127.0.0.1:4433"', *_SERVICE])


@pytest.mark.parametrize(
    ("make", "key_path", "problem"),
    [
        (_many_backends, "lb.maglev_size", "at most 2621 backends per service"),
        (_many_services, "service", "at most 64 services, got 20000"),
        (_many_versions, "lb.supported_versions", "at most 32 versions, got 250000"),
        (_many_sources, "lb.lb_sources", "at most 256 addresses, got 150000"),
    ],
    ids=["backends", "services", "versions", "lb-sources"],
)
def test_huge_lists_are_refused_at_once(tmp_path: Path, make: Callable[[Path], Path], key_path: str,
                                        problem: str) -> None:
    """Duplicate checks were quadratic: 20k backends took 30 s of CPU, on the loop during a reload."""
    path = make(tmp_path)
    result = quiclb("check-config", "-c", str(path))
    assert_one_line_error(result, 2, f"{path}: {key_path}: ", problem)
