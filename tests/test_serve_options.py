"""`gateway serve` options checked before anything starts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gateway.cli import cli


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_refused_not_every_interface(tmp_path, host) -> None:
    # aiohttp takes an empty host as "every interface": a loopback-only gateway would have been
    # exposed by a script that passed an unset variable (--host "$HOST").
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "serve", "--host", host])
    assert result.exit_code == 2
    assert "an empty host would listen on every interface" in result.output
    assert not (tmp_path / "home").exists()  # refused before the home was opened
