"""`gateway demo`: the story end to end through the real HTTP API; exit 0 only when every step
behaved, with and without `python -O`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.demo import STEPS


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home of its own, initialised: the demo writes records to its database."""
    home = tmp_path_factory.mktemp("demo-home")
    proc = _gateway(home, "init")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return home


def _gateway(home: Path, *args: str, optimise: bool = False) -> subprocess.CompletedProcess:
    flags = ["-O"] if optimise else []
    return subprocess.run([sys.executable, *flags, "-m", "gateway", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())


def test_demo_plays_every_step(demo_home: Path) -> None:
    proc = _gateway(demo_home, "demo", optimise=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    marks = re.findall(r"^\s*\d+\. \[(ok|FAILED)\] (.+)$", proc.stdout, re.MULTILINE)
    assert marks == [("ok", title) for title, _ in STEPS]
    assert "signature_invalid" in proc.stdout  # the tampered order was refused for its signature
    assert re.search(r"audit trail intact: \d+ records chained, [1-9]\d* signed checkpoints", proc.stdout)


def test_demo_fails_when_a_step_misbehaves(demo_home: Path) -> None:
    """Take the purchaser's key away from its API client: signing is refused (403), the demo
    says which step failed, stops there and exits 1."""
    assert _gateway(demo_home, "clients", "keys", "demo-purchaser", "--keys", "").returncode == 0
    try:
        proc = _gateway(demo_home, "demo", optimise=True)
        assert proc.returncode == 1, proc.stdout[-3000:]
        marks = re.findall(r"^\s*\d+\. \[(ok|FAILED)\] (.+)$", proc.stdout, re.MULTILINE)
        assert marks == [("ok", STEPS[0][0]), ("FAILED", STEPS[1][0])]
        assert "sign answered 403" in proc.stdout
    finally:
        assert _gateway(demo_home, "clients", "keys", "demo-purchaser", "--keys", "demo-purchaser").returncode == 0
