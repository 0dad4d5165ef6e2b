"""What the README promises of the command line, checked as a newcomer runs it.

The README says a command that is refused prints one line `error [code] message` and exits 1
(`gateway init`, `gateway sign`, `gateway pki ...`, the benchmarks): a script or an operator reads
the code in brackets. `gateway clients ...`, `gateway audit ...` and a `gateway.toml` that does
not parse printed click's `Error: code: message` or `Error: [code] message` instead, and some of
their refusals carried no code at all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# `gateway init` and `gateway pki` print `error [code] message`, `gateway sign` and the benchmarks
# `error [code]: message`: either reads the code the same way.
ERROR_LINE = re.compile(r"error \[([a-z_]+)\]:? \S")


def _gateway(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_DATABASE_URL"}  # SQLite in the home
    return subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def _refusal(proc: subprocess.CompletedProcess) -> str:
    """The code of a one-line refusal, after checking its shape and exit status."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    match = ERROR_LINE.match(lines[0])
    assert match, proc.stderr
    return match.group(1)


def test_client_refusals_print_their_code_as_every_refusal_does(tmp_path: Path) -> None:
    assert _gateway(tmp_path, "clients", "add", "app-1", "--role", "purchaser").returncode == 0
    assert _refusal(_gateway(tmp_path, "clients", "add", "app-1", "--role", "purchaser")) == "client_exists"
    assert _refusal(_gateway(tmp_path, "clients", "revoke", "nobody")) == "client_not_found"
    assert _refusal(_gateway(tmp_path, "clients", "keys", "nobody", "--keys", "k1")) == "client_not_found"
    assert _refusal(_gateway(tmp_path, "clients", "add", "two words", "--role", "admin")) == "invalid_record"


def test_a_gateway_toml_that_is_refused_prints_config_invalid(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text("[sever]\nport = 8443\n")  # a typo of [server]
    for args in (("clients", "list"), ("init",), ("audit", "verify")):
        proc = _gateway(tmp_path, *args)
        assert _refusal(proc) == "config_invalid", args
        assert "sever" in proc.stderr


def test_audit_checkpoint_without_a_usable_hsm_key_says_why_with_a_code(
        tmp_path: Path, initialized_home: dict) -> None:
    # A home with no token: nothing to sign with, and nothing is created there.
    assert _refusal(_gateway(tmp_path, "audit", "checkpoint")) == "hsm_unavailable"
    assert list(tmp_path.iterdir()) == []
    # A set-up home, asked for a key it does not hold.
    home = Path(initialized_home["home"])
    proc = _gateway(home, "audit", "checkpoint", "--key", "no-such-audit-key")
    assert _refusal(proc) == "key_not_found"
    assert "gateway init" in proc.stderr
