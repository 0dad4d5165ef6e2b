"""`gateway.toml`: read with the environment's overrides; an unusable file is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings


def _home(tmp_path: Path, text: str) -> Path:
    (tmp_path / "gateway.toml").write_text(text)
    return tmp_path


def test_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _home(tmp_path, '[hsm]\ntoken_label = "t"\nsessions = 3\n[server]\nport = 9000\n'
                           'drain_timeout_s = 2\n[database]\nurl = ""\n')
    monkeypatch.setenv("GATEWAY_HSM_PIN", "4321")
    monkeypatch.setenv("GATEWAY_DATABASE_URL", "postgresql://127.0.0.1/test")
    settings = load_settings(home)
    assert (settings.hsm.token_label, settings.hsm.sessions, settings.hsm.user_pin) == ("t", 3, "4321")
    assert (settings.server.port, settings.server.drain_timeout_s) == (9000, 2)
    assert settings.effective_database_url == "postgresql://127.0.0.1/test"


@pytest.mark.parametrize(("text", "words"), [
    ("[hsm]\nsessions = \"4\"\n", "sessions: expected int, got str"),
    ("[server]\nport = true\n", "port: expected int, got bool"),
    ("[server]\ndrain_timeout_s = \"soon\"\n", "drain_timeout_s: expected float"),
    ("[hsm]\nbogus = 1\n", "unknown keys ['bogus']"),
    ("database = \"sqlite\"\n", "[database] must be a table"),
    ("[hsm\n", "not valid TOML"),
    # [database] engine settings: numbers in range, of their type, no unknown keys
    ("[database]\ncommand_timeout_s = 0\n", "command_timeout_s: must be a finite number > 0"),
    ("[database]\ncommand_timeout_s = -1\n", "command_timeout_s: must be a finite number > 0"),
    ("[database]\ncommand_timeout_s = nan\n", "command_timeout_s: must be a finite number"),
    ("[database]\ncommand_timeout_s = inf\n", "command_timeout_s: must be a finite number"),
    ("[database]\ncommand_timeout_s = 3601\n", "command_timeout_s: must be a finite number"),
    ("[database]\ncommand_timeout_s = \"30\"\n", "command_timeout_s: expected float, got str"),
    ("[database]\ncommand_timeout_s = true\n", "command_timeout_s: expected float, got bool"),
    ("[database]\nmin_free_bytes = -1\n", "min_free_bytes: must be a finite number >= 0"),
    ("[database]\nmin_free_bytes = 1.5\n", "min_free_bytes: expected int, got float"),
    ("[database]\nmin_free_bytes = \"64M\"\n", "min_free_bytes: expected int, got str"),
    ("[database]\ncommand_timeout = 5\n", "[database]: unknown keys ['command_timeout']"),
])
def test_unusable_files_are_config_errors(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_home(tmp_path, text))
    assert err.value.code == "config_invalid" and words in str(err.value)


@pytest.mark.parametrize(("text", "words"), [
    # Each of these was accepted and failed later, elsewhere: every body refused with 408
    # (body_timeout_s 0, negative or nan), every signature refused with 429 (queue_deadline_ms),
    # no size limit at all on chunked bodies (aiohttp reads max_body_bytes = 0 as "unlimited"),
    # an error from bind() (port), "one per core" for a negative session count.
    ("[server]\nbody_timeout_s = 0\n", "body_timeout_s: must be a finite number > 0, got 0"),
    ("[server]\nbody_timeout_s = -1.5\n", "body_timeout_s: must be a finite number > 0"),
    ("[server]\nidle_timeout_s = 0\n", "idle_timeout_s: must be a finite number > 0, got 0"),
    ("[server]\nbody_timeout_s = nan\n", "body_timeout_s: must be a finite number > 0, got nan"),
    ("[server]\nbody_timeout_s = inf\n", "body_timeout_s: must be a finite number > 0, got inf"),
    ("[server]\ndrain_timeout_s = -5\n", "drain_timeout_s: must be a finite number >= 0"),
    ("[server]\nmax_body_bytes = 0\n", "max_body_bytes: must be a finite number >= 1, got 0"),
    ("[server]\nqueue_size = -1\n", "queue_size: must be a finite number >= 0, got -1"),
    ("[server]\nqueue_deadline_ms = 0\n", "queue_deadline_ms: must be a finite number >= 1"),
    ("[server]\nretry_after_s = -1\n", "retry_after_s: must be a finite number >= 0"),
    ("[server]\nport = 70000\n", "port: must be a finite number 0 to 65535, got 70000"),
    ("[server]\nport = -1\n", "port: must be a finite number 0 to 65535"),
    ("[hsm]\nsessions = -3\n", "sessions: must be a finite number >= 0, got -3"),
    ("[hsm]\nworkers = -1\n", "workers: must be a finite number >= 0"),
    ("[hsm]\nworker_nice = -5\n", "worker_nice: must be a finite number 0 to 19"),
    # "" means "the default" for [database] url and [trust] bundle; an empty host would make
    # aiohttp listen on every interface.
    ("[server]\nhost = \"\"\n", "[server] host: must not be empty"),
    ("[hsm]\ntoken_label = \" \"\n", "[hsm] token_label: must not be empty"),
    # A misspelt key or table was ignored: the archive stayed in SQLite, the port at 8443.
    ("[database]\nuri = \"postgresql://127.0.0.1/test\"\n", "[database]: unknown keys ['uri']"),
    ("[database]\nurl = 5\n", "[database] url: expected str, got int 5"),
    ("[database]\nurl = \"mysql://u:secret@h/db\"\n", "'mysql' is not a database URL"),
    ("[trust]\nbundel = \"/etc/ca.pem\"\n", "[trust]: unknown keys ['bundel']"),
    ("[sever]\nport = 9000\n", "unknown tables or keys ['sever']"),
    # A zero period kept an idle gateway's event loop busy: a whole core, spinning.
    ("[audit]\nrefusal_window_s = 0\n", "refusal_window_s: must be a finite number > 0, got 0"),
    ("[audit]\ncheckpoint_every_seconds = 0\n", "checkpoint_every_seconds: must be a finite number > 0"),
    ("[audit]\ncheckpoint_every_records = 0\n", "checkpoint_every_records: must be a finite number >= 1"),
    ("[audit]\ncheckpoint_every_records = \"lots\"\n", "checkpoint_every_records: expected int, got str"),
    ("[audit]\nrefusal_bursts = 5\n", "[audit]: unknown keys ['refusal_bursts']"),
    ("[readiness]\nkey = 7\n", "[readiness] key: expected str, got int 7"),
])
def test_values_out_of_range_are_config_errors(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_home(tmp_path, text))
    assert err.value.code == "config_invalid" and words in str(err.value)
    assert "secret" not in str(err.value)  # a URL's password is never echoed


def test_limits_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    settings = load_settings(_home(tmp_path, "[server]\nport = 0\nqueue_size = 0\nbody_timeout_s = 0.5\n"
                                             "drain_timeout_s = 0\nmax_body_bytes = 1\n"
                                             "[hsm]\nsessions = 0\nworker_nice = 19\n"
                                             "[audit]\ncheckpoint_every_records = 10\n"))
    assert (settings.server.port, settings.server.queue_size, settings.server.body_timeout_s) == (0, 0, 0.5)
    assert settings.section("audit") == {"checkpoint_every_records": 10}


@pytest.mark.parametrize("url", ["garbage", "mysql://u:secret@h/db", "sqlite:/relative"])
def test_a_database_url_from_the_environment_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         url: str) -> None:
    """GATEWAY_DATABASE_URL=garbage was a ValueError traceback from `gateway clients list`."""
    monkeypatch.setenv("GATEWAY_DATABASE_URL", url)
    with pytest.raises(ConfigError) as err:
        load_settings(_home(tmp_path, ""))
    assert err.value.code == "config_invalid" and "GATEWAY_DATABASE_URL" in str(err.value)
    assert "secret" not in str(err.value)
