"""The README's scale-out numbers are the kept run's (bench/reference/scaleout.json), not hand-typed ones."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).parents[2]
REFERENCE = ROOT / "bench" / "reference" / "scaleout.json"


def test_readme_quotes_the_reference_run() -> None:
    ref = json.loads(REFERENCE.read_text())
    readme = ROOT.joinpath("README.md").read_text()
    section = readme.split("## Scale-out", 1)[1].split("\n## ", 1)[0]
    assert ref["commit"] != "unknown" and not ref["commit"].endswith("-dirty"), "a run of committed code only"
    assert f"commit `{ref['commit']}`" in section
    host, proc = ref["via_lb"]["kill"]["host"], ref["via_lb"]["kill"]["process"]
    assert f"withdrawn by **{host['mechanism']}** in **{host['withdrawal_ms']} ms**" in section
    assert f"**{host['datagrams_lost']} datagrams lost**" in section
    assert f"health check in **{proc['withdrawal_ms']} ms**" in section
    assert f"**{proc['datagrams_lost']} datagrams lost**" in section
    retried = sum(h["retried"] for h in ref["via_lb"]["handshakes"].values())
    assert f"**{retried} retried**" in section
    assert ref["via_lb"]["workload"]["summary"] in section
    assert all(p["held"] for p in ref["promises"]), [p["text"] for p in ref["promises"] if not p["held"]]
