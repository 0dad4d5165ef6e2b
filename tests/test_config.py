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
])
def test_unusable_files_are_config_errors(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_home(tmp_path, text))
    assert err.value.code == "config_invalid" and words in str(err.value)
