"""`gateway clients ...`: a name or key label that would mislead a reviewer or could never be used
is refused with a code and nothing is written; revoking twice is one revocation in the trail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _gateway(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_DATABASE_URL"}  # SQLite in the home
    return subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("args", "words"), [
    # The name is the actor of every record the client causes and a column of `clients list`:
    # an escape sequence or a right-to-left override would rewrite what the reviewer sees.
    (["evil\x1b[2J\x1b[31mname", "--role", "admin"], "client name must be 1-200 printable characters"),
    (["rtl\u202enimda", "--role", "admin"], "client name must be 1-200 printable characters"),
    (["zero\u200bwidth", "--role", "admin"], "client name must be 1-200 printable characters"),
    # Labels no HSM key can carry (enrolment's rule): a grant that could never be used.
    (["ok-1", "--role", "purchaser", "--keys", "good,a/b"], "key labels are 1 to 64 printable ASCII"),
    (["ok-2", "--role", "purchaser", "--keys", "L" * 65], "key labels are 1 to 64 printable ASCII"),
    (["ok-3", "--role", "purchaser", "--keys", "bad\x1b[31m"], "key labels are 1 to 64 printable ASCII"),
])
def test_odd_names_and_labels_are_refused_and_nothing_is_written(tmp_path: Path, args: list[str],
                                                                   words: str) -> None:
    proc = _gateway(tmp_path, "clients", "add", *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "invalid_record" in proc.stderr and words in proc.stderr
    assert "\x1b" not in proc.stderr  # the refusal does not echo the escape either
    assert "gw_" not in proc.stdout
    assert json.loads(_gateway(tmp_path, "clients", "list", "--json").stdout) == []
    assert _gateway(tmp_path, "audit", "list", "--type", "client_added").stdout == ""


def test_printable_names_in_any_script_are_accepted_and_key_grants_checked(tmp_path: Path) -> None:
    proc = _gateway(tmp_path, "clients", "add", "pharmacie-émile", "--role", "pharmacy", "--keys", "rx-1")
    assert proc.returncode == 0 and proc.stdout.startswith("gw_"), proc.stderr
    refused = _gateway(tmp_path, "clients", "keys", "pharmacie-émile", "--keys", "rx-1,../x")
    assert refused.returncode == 1 and "key labels are 1 to 64 printable ASCII" in refused.stderr
    listed = json.loads(_gateway(tmp_path, "clients", "list", "--json").stdout)
    assert [(c["name"], c["keys"]) for c in listed] == [("pharmacie-émile", ["rx-1"])]


def test_revoking_twice_is_one_revocation(tmp_path: Path) -> None:
    assert _gateway(tmp_path, "clients", "add", "app-1", "--role", "admin").returncode == 0
    first = _gateway(tmp_path, "clients", "revoke", "app-1")
    again = _gateway(tmp_path, "clients", "revoke", "app-1")
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    when = first.stdout.split(" revoked at ")[1]
    assert again.stdout == f"client app-1 was already revoked at {when}"
    events = _gateway(tmp_path, "audit", "list", "--json", "--type", "client_revoked").stdout.splitlines()
    assert len(events) == 1 and json.loads(events[0])["subject"] == "app-1"


@pytest.mark.parametrize("command", [["revoke"], ["keys", "--keys", "rx-1"]])
def test_a_name_no_client_can_have_is_client_not_found(tmp_path: Path, command: list[str]) -> None:
    """An undecodable byte in the name (a lone surrogate once decoded) was a UnicodeEncodeError
    traceback from the database driver."""
    proc = _gateway(tmp_path, "clients", command[0], "a\udcffb", *command[1:])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error [client_not_found]" in proc.stderr
