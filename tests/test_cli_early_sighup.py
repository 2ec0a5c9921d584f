"""Issue 12 item 4: a SIGHUP that arrives while `quiclb run` still loads its configuration (before
the event loop can take signals) must not kill the LB; it is applied as a reload once started.

Run in a child interpreter: without the fix the signal's default action kills the process, which
must not be the test runner. The child replaces `load_config` by one that sends itself SIGHUP
mid-load, and `serve` by a stub that reports what the LB would be told.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import lb.app
    import lb.cli
    real_load = lb.cli.load_config

    def load_with_sighup(path):
        os.kill(os.getpid(), signal.SIGHUP)  # delivered now, while the configuration loads
        return real_load(path)

    async def fake_serve(cfg, ready, *, admin, io, reload_requested=None, **_scaleout):
        print("RELOAD-REQUESTED", bool(reload_requested and reload_requested()), flush=True)

    lb.cli.load_config = load_with_sighup
    lb.app.serve = fake_serve
    sys.exit(lb.cli.main(["run", "-c", sys.argv[1], "--io", "asyncio"]))
    """
)


def test_a_sighup_while_the_configuration_loads_is_a_reload_after_start(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, services=[ServiceSpec(name="echo", backends=[BackendSpec("0001")])], admin=False)
    dep.write()
    done = subprocess.run([sys.executable, "-c", CHILD, str(dep.path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "RELOAD-REQUESTED True" in done.stdout
