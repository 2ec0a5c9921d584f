"""`quiclb demo` (the README's first command) runs the whole system and reports every promise held."""

from __future__ import annotations

import subprocess
import sys


def test_demo_exits_0_and_reports_every_promise() -> None:
    out = subprocess.run([sys.executable, "-m", "lb", "demo"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All promises held" in out.stdout
    assert "[FAIL]" not in out.stdout
    assert out.stdout.count("[PASS]") == 7
