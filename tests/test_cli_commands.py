"""``quiclb demo`` comes from the harness through the ``quiclb.commands`` entry point, not an import."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import lb.cli
from quiclb_harness import cli_commands


def test_demo_is_registered_through_the_entry_point_group() -> None:
    args = lb.cli.build_parser().parse_args(["demo", "--workdir", "/tmp/x", "--keep"])
    assert args.func is cli_commands._run_demo_command
    assert (args.workdir, args.keep) == (Path("/tmp/x"), True)


def test_a_broken_command_plugin_does_not_stop_the_lb_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = EntryPoint(name="broken", value="quiclb_harness.no_such_module:register", group="quiclb.commands")
    monkeypatch.setattr(lb.cli, "entry_points", lambda group: [broken])
    args = lb.cli.build_parser().parse_args(["keygen"])
    assert args.func is lb.cli.cmd_keygen
    assert "command 'broken' unavailable" in capsys.readouterr().err
