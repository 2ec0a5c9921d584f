"""``quiclb demo-scaleout`` without root says so in one line and exits 1 (it builds network namespaces)."""

from __future__ import annotations

import os

import pytest

from lb.cli import main


def test_demo_scaleout_without_root_says_it_needs_root(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["demo-scaleout"]) == 1
    err = capsys.readouterr().err
    assert "needs root" in err and "sudo make demo-scaleout" in err
