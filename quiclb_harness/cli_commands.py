"""Subcommands the harness adds to ``quiclb`` through the ``quiclb.commands`` entry-point group.

``lb.cli`` loads every entry point of that group and calls it with its
subparsers, so ``quiclb demo`` works when the harness is installed while the
load balancer's own code never imports test infrastructure. This module stays
cheap to import (argparse only): ``quiclb run`` loads it too.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _run_demo_command(args: argparse.Namespace) -> int:
    from quiclb_harness.demo import run_demo  # noqa: PLC0415 - only `quiclb demo` pays for the cluster kit

    return run_demo(workdir=args.workdir, keep=args.keep)


def _run_scaleout_command(args: argparse.Namespace) -> int:
    from quiclb_harness.scaleout.demo import run_scaleout_demo  # noqa: PLC0415 - namespaces, BIRD: only here

    return run_scaleout_demo(out=args.out, workdir=args.workdir, keep=args.keep)


def add_demo_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``quiclb demo`` (the README's first command) and ``quiclb demo-scaleout``."""
    demo = subparsers.add_parser("demo", help="LB + 3 backends on loopback, real QUIC clients, a report")
    demo.add_argument("--workdir", type=Path, help="where to write keys and config (default: a temp dir)")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=_run_demo_command)
    scale = subparsers.add_parser("demo-scaleout", help="3 LBs behind one VIP: network namespaces, kernel ECMP, "
                                                        "BGP (BIRD), real QUIC clients, a report (root)")
    scale.add_argument("--out", type=Path, help="write the measurements here as JSON")
    scale.add_argument("--workdir", type=Path, help="where to write keys and configs (default: a temp dir)")
    scale.add_argument("--keep", action="store_true", help="keep the work directory")
    scale.set_defaults(func=_run_scaleout_command)
