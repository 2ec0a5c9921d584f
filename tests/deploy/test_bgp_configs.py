"""deploy/bgp: BIRD parses the production examples and the lab's rendered configurations; the unit verifies.

``bird -p`` parses a configuration and exits without starting anything. The
lab's configurations (``quiclb_harness.scaleout.bird``) are checked the same
way, so the example files and what the scale-out test runs keep one shape.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quiclb_harness.scaleout.bird import VIP_PROTOCOL, Timers, lb_config, router_config

BGP = Path(__file__).parents[2] / "deploy" / "bgp"
BIRD = shutil.which("bird") or next((p for p in ("/usr/sbin/bird", "/sbin/bird") if os.access(p, os.X_OK)), None)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PREFIXES = ["192.0.2.10/32", "10.255.0.1/32"]

needs_bird = pytest.mark.skipif(BIRD is None, reason="BIRD 2 is not installed (apt-get install bird2)")


def parse(path: Path) -> None:
    assert BIRD is not None
    out = subprocess.run([BIRD, "-p", "-c", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_bird
@pytest.mark.parametrize("name", ["lb-bird.conf", "tor-bird.conf"])
def test_production_examples_parse(name: str) -> None:
    parse(BGP / name)


@needs_bird
@pytest.mark.parametrize("bfd", [True, False], ids=["bfd", "hold-timer-only"])
def test_lab_configs_parse(tmp_path: Path, bfd: bool) -> None:
    timers = Timers(bfd=bfd)
    router = tmp_path / "router.conf"
    router.write_text(router_config("10.0.0.1", [("10.1.1.1", "10.1.1.2"), ("10.1.2.1", "10.1.2.2")], PREFIXES, timers))
    lb = tmp_path / "lb.conf"
    lb.write_text(lb_config("10.1.1.2", "10.1.1.2", "10.1.1.1", PREFIXES, timers))
    parse(router)
    parse(lb)


def test_examples_and_lab_share_the_shape() -> None:
    """The speaker starts withdrawn and exports only its static protocol; the ToR merges paths and runs BFD."""
    lb_example = (BGP / "lb-bird.conf").read_text()
    tor_example = (BGP / "tor-bird.conf").read_text()
    lab_lb = lb_config("10.1.1.2", "10.1.1.2", "10.1.1.1", PREFIXES, Timers())
    lab_router = router_config("10.0.0.1", [("10.1.1.1", "10.1.1.2")], PREFIXES, Timers())
    for text in (lb_example, lab_lb):
        assert re.search(rf"protocol static {VIP_PROTOCOL} \{{\s*\n\s*disabled yes;", text)
        assert f'export where proto = "{VIP_PROTOCOL}";' in text
        assert "import none;" in text and "bfd on;" in text
    for text in (tor_example, lab_router):
        assert "merge paths yes" in text and "bfd on;" in text and "passive on;" in text
    unit = (BGP / "quiclb-announce.service").read_text()
    assert f"--protocol {VIP_PROTOCOL}" in unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (package systemd)")
def test_announce_unit_verifies(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    scripts = Path(sys.executable).parent
    unit = tmp_path / "quiclb-announce.service"
    unit.write_text((BGP / "quiclb-announce.service").read_text().replace("/opt/quiclb/bin/", f"{scripts}/"))
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, env=env,
                         timeout=60, check=False)
    ours = [line for line in out.stderr.splitlines() if str(tmp_path) in line or unit.name in line]
    assert out.returncode == 0 and not ours, out.stderr
