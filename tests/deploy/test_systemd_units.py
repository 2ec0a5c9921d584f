"""deploy/systemd: units that systemd accepts, reload by SIGHUP, and capabilities only for direct return.

``systemd-analyze verify`` needs the commands to exist, so the units are
checked as installed: copied with ``/opt/quiclb/bin/`` replaced by this
virtualenv's scripts. ``systemd-analyze security --offline`` scores the
hardening without a running systemd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "deploy" / "systemd"
INSTALLED_PREFIX = "/opt/quiclb/bin/"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
#: Highest acceptable overall exposure (systemd's 0-10 scale; "OK" is below 2.0).
MAX_EXPOSURE = 2.5
NET_CAPS_CHECK = "CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)"

pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (package systemd)")


def install(tmp_path: Path, unit: str, instance: str | None = None, drop_ins: tuple[str, ...] = ()) -> Path:
    """Copy ``unit`` (as ``instance`` of a template) and its drop-ins as installed, with this venv's scripts."""
    scripts = Path(sys.executable).parent
    assert (scripts / "quiclb").exists() and (scripts / "quiclb-backend").exists()
    name = unit.replace("@.", f"@{instance}.") if instance else unit
    target = tmp_path / name
    target.write_text((UNITS / unit).read_text().replace(INSTALLED_PREFIX, f"{scripts}/"))
    for drop_in in drop_ins:
        directory = tmp_path / f"{name}.d"
        directory.mkdir(exist_ok=True)
        text = (UNITS / drop_in).read_text().replace(INSTALLED_PREFIX, f"{scripts}/")
        (directory / drop_in).write_text(text)
    return target


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def verify(unit: Path) -> None:
    result = analyze("verify", str(unit))
    # verify exits 0 on unknown keys and bad values, so its warnings count as failures too.
    ours = [line for line in result.stderr.splitlines() if str(unit.parent) in line or unit.name in line]
    assert result.returncode == 0 and not ours, result.stderr


def security(unit: Path) -> tuple[float, dict[str, bool]]:
    """(overall exposure, {check name: passed}) from the offline security analysis."""
    checks = analyze("security", "--offline=true", "--json=short", str(unit))
    assert checks.returncode == 0, checks.stderr
    passed = {entry["name"]: bool(entry["set"]) for entry in json.loads(checks.stdout)}
    text = analyze("security", "--offline=true", str(unit)).stdout
    overall = next(line for line in text.splitlines() if "Overall exposure level" in line)
    return float(overall.split(":")[1].split()[0]), passed


@pytest.mark.parametrize(
    ("unit", "instance", "drop_ins"),
    [
        ("quiclb.service", None, ()),
        ("quiclb-backend@.service", "0001", ()),
        ("quiclb-backend@.service", "0001", ("quiclb-backend-direct.conf",)),
        ("quiclb-backend@.service", "nlb-a", ("quiclb-backend-nlb.conf",)),
    ],
    ids=["lb", "backend", "backend-direct", "backend-nlb"],
)
def test_units_verify_and_are_hardened(tmp_path: Path, unit: str, instance: str | None,
                                       drop_ins: tuple[str, ...]) -> None:
    installed = install(tmp_path, unit, instance, drop_ins)
    verify(installed)
    exposure, _ = security(installed)
    assert exposure <= MAX_EXPOSURE, exposure


@pytest.mark.parametrize("unit", ["quiclb.service", "quiclb-backend@.service"])
def test_reload_sends_sighup(unit: str) -> None:
    lines = (UNITS / unit).read_text().splitlines()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines


def test_capabilities_only_where_direct_return_needs_them(tmp_path: Path) -> None:
    (tmp_path / "via-lb").mkdir()
    (tmp_path / "direct").mkdir()
    backend = install(tmp_path / "via-lb", "quiclb-backend@.service", "0001")
    direct = install(tmp_path / "direct", "quiclb-backend@.service", "0001", ("quiclb-backend-direct.conf",))
    assert security(backend)[1][NET_CAPS_CHECK] is True  # via-lb: no network capability at all
    assert security(direct)[1][NET_CAPS_CHECK] is False  # direct: CAP_NET_RAW, for the raw socket
    drop_in = (UNITS / "quiclb-backend-direct.conf").read_text()
    assert "CapabilityBoundingSet=CAP_NET_RAW" in drop_in.splitlines()
    assert "AmbientCapabilities=CAP_NET_RAW" in drop_in.splitlines()
    for line in (UNITS / "quiclb.service").read_text().splitlines():
        if line.startswith(("AmbientCapabilities=", "CapabilityBoundingSet=")):
            assert line.split("=", 1)[1] == "CAP_NET_BIND_SERVICE", line  # VIPs on port 443, nothing else
