"""Run metadata and the JSON result file shared by the bench scripts (run from the repo root)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def run_metadata(bench: str) -> dict[str, Any]:
    """What every result records: the benchmark, commit, Python, machine and CPU count."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"bench": bench, "commit": commit, "python": sys.version.split()[0],
            "machine": platform.machine(), "cpus": os.cpu_count()}


def write_result(doc: dict[str, Any]) -> Path:
    """Write ``doc`` to bench/results/<bench>-<time>.json and say where."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{doc['bench']}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return path
