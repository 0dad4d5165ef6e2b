"""`[database]` engine settings in gateway.toml: `command_timeout_s` (PostgreSQL) and
`min_free_bytes` (SQLite readiness), checked like every other number of the file, written with
their defaults by `gateway init`, and handed to the storage that `open_storage` builds."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.catalog import CatalogError, demo_catalog, load_catalog, parse_catalog, render_catalog
from gateway.clients import authenticate
from gateway.config import ConfigError, DatabaseSettings, load_settings, write_default_config
from gateway.storage import open_storage
from gateway.storage.postgres import PostgresStorage
from gateway.storage.sqlite import SqliteStorage
from tests.test_bootstrap import _gateway


def _home(tmp_path: Path, text: str) -> Path:
    (tmp_path / "gateway.toml").write_text(text)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_database_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_DATABASE_URL", raising=False)


def test_database_settings_are_read_from_gateway_toml(tmp_path: Path) -> None:
    home = _home(tmp_path, '[database]\nurl = ""\ncommand_timeout_s = 2.5\nmin_free_bytes = 1048576\n')
    settings = load_settings(home)
    assert settings.database == DatabaseSettings(command_timeout_s=2.5, min_free_bytes=1048576)
    # an integer timeout is a number of seconds too
    assert load_settings(_home(tmp_path, "[database]\ncommand_timeout_s = 5\n")).database.command_timeout_s == 5.0


def test_the_cli_reports_a_wrong_database_value_as_config_invalid(tmp_path: Path) -> None:
    home = _home(tmp_path, "[database]\ncommand_timeout_s = 0\n")
    done = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "clients", "list"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "[config_invalid]" in done.stderr and "command_timeout_s" in done.stderr
    assert "Traceback" not in done.stderr


def test_limits_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    settings = load_settings(_home(tmp_path, "[database]\ncommand_timeout_s = 3600\nmin_free_bytes = 0\n"))
    assert (settings.database.command_timeout_s, settings.database.min_free_bytes) == (3600.0, 0)


def test_the_written_default_config_names_the_database_settings(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "home")
    write_default_config(settings)
    text = settings.config_path.read_text()
    assert "command_timeout_s = 30" in text and "min_free_bytes = 67108864" in text
    assert load_settings(settings.home).database == DatabaseSettings()


def test_open_storage_hands_each_engine_its_settings(tmp_path: Path) -> None:
    settings = load_settings(_home(tmp_path, "[database]\ncommand_timeout_s = 7\nmin_free_bytes = 12345\n"))
    sqlite = open_storage(settings)
    assert isinstance(sqlite, SqliteStorage) and sqlite.min_free_bytes == 12345
    pg = open_storage(replace(settings, database_url="postgresql://postgres@127.0.0.1:5432/test"))
    assert isinstance(pg, PostgresStorage) and pg._command_timeout_s == 7.0  # noqa: SLF001
    # a caller's own option wins (`audit verify` opens read-only)
    assert open_storage(settings, min_free_bytes=1).min_free_bytes == 1  # type: ignore[attr-defined]


def test_init_replaces_a_hand_edited_token_it_cannot_hash(tmp_path: Path) -> None:
    """demo.json edited by hand: a purchaser token with the real public id and a secret holding
    a lone surrogate (valid JSON, `\\udcff`). `init` ended in a UnicodeEncodeError traceback;
    now that token is simply not a working one and a new purchaser client is made."""
    home = tmp_path / "home"
    first = _gateway(home, "init")
    assert first.returncode == 0, first.stderr[-2000:]
    demo = json.loads((home / "demo.json").read_text())
    old = demo["clients"]["purchaser"]
    token_id = old["token"].split("_")[1]
    demo["clients"]["purchaser"]["token"] = f"gw_{token_id}_\udcff"
    (home / "demo.json").write_text(json.dumps(demo))  # ensure_ascii: written as \udcff
    again = _gateway(home, "init")
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    new = json.loads((home / "demo.json").read_text())["clients"]["purchaser"]
    assert new["client"] != old["client"] and new["token"] != old["token"]

    async def check() -> None:
        async with open_storage(load_settings(home), read_only=True) as storage:
            client = await authenticate(storage, new["token"])
            assert client is not None and client.name == new["client"]
            added = [r.subject for r in await storage.audit_records() if r.event_type == "client_added"]
            assert new["client"] in added

    asyncio.run(check())


@pytest.mark.parametrize("kind", ["directory", "dangling symlink"])
def test_a_gateway_toml_that_cannot_be_read_is_config_invalid(tmp_path: Path, kind: str) -> None:
    """A directory named gateway.toml gave an IsADirectoryError traceback; a symlink to a
    configuration kept elsewhere that has gone missing was silently read as "no file", i.e.
    all defaults (SQLite in the home instead of the configured database)."""
    home = tmp_path / "home"
    home.mkdir()
    if kind == "directory":
        (home / "gateway.toml").mkdir()
    else:
        (home / "gateway.toml").symlink_to(tmp_path / "etc" / "gateway.toml")
    with pytest.raises(ConfigError) as err:
        load_settings(home)
    assert err.value.code == "config_invalid" and "cannot be read" in str(err.value)
    done = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "clients", "list"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "config_invalid" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (home / "gateway.sqlite3").exists()


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite:///:memory:", "sqlite:///gw.db?mode=ro",
                                 "sqlite:///gw.db#x"])
@pytest.mark.parametrize("where", ["file", "environment"])
def test_sqlite_urls_that_name_no_database_file_are_config_invalid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, where: str) -> None:
    """Before: `?mode=ro` made a file named "gw.db?mode=ro" (and wrote a client into it),
    `:memory:` a stray ":memory:" file and an init failing with "no such table", "" an
    "Is a directory" on the current directory."""
    home = tmp_path / "home"
    home.mkdir()
    if where == "file":
        (home / "gateway.toml").write_text(f'[database]\nurl = "{url}"\n')
    else:
        monkeypatch.setenv("GATEWAY_DATABASE_URL", url)
    with pytest.raises(ConfigError) as err:
        load_settings(home)
    assert err.value.code == "config_invalid" and "names no database file" in str(err.value)
    monkeypatch.chdir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "clients", "add",
                           "bob", "--role", "admin"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "config_invalid" in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no stray database file


def test_sqlite_urls_with_a_path_are_accepted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/gw.sqlite3"
    assert load_settings(_home(tmp_path, f'[database]\nurl = "{url}"\n')).effective_database_url == url


def test_a_relative_sqlite_path_is_in_the_home_whatever_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was taken from the working directory: a command run from elsewhere opened (and
    created) another database, a second archive and audit trail, each intact on its own."""
    home = _home(tmp_path, '[database]\nurl = "sqlite:///data/gw.sqlite3"\n')
    assert load_settings(home).effective_database_url == f"sqlite:///{home.absolute()}/data/gw.sqlite3"
    (home / "data").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, name in ((elsewhere, "one"), (home, "two")):
        done = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "clients", "add",
                               name, "--role", "admin"], capture_output=True, text=True, timeout=120,
                              cwd=cwd)
        assert done.returncode == 0, done.stderr[-2000:]
    listed = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "clients", "list"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "one" in listed.stdout and "two" in listed.stdout, listed.stdout + listed.stderr
    assert list(elsewhere.iterdir()) == [] and not (home / "gw.sqlite3").exists()


# --- catalog import ---------------------------------------------------------------------------

CATALOG_HEADER = "ndc,name,strength,schedule,family,units_per_package\n"


def _import(home: Path, source: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "catalog", "import",
                           str(source)], capture_output=True, text=True, timeout=120)


def test_catalog_import_of_a_spreadsheet_export(tmp_path: Path) -> None:
    """BOM, CRLF line ends, lowercase schedules and a 10-digit NDC: the catalog a spreadsheet
    writes is the catalog meant."""
    source = tmp_path / "export.csv"
    source.write_bytes(("\ufeff" + CATALOG_HEADER + "59011-410-10,Oxycodone ER,10 mg,ii,Oxycodone,100\n"
                        "00093-3109-01,Testosterone,200 mg/mL, iiin ,testosterone,1\n"
                        "00093-7155-98,Atorvastatin,20 mg,,atorvastatin,90\n").replace("\n", "\r\n")
                       .encode("utf-8"))
    home = tmp_path / "home"
    done = _import(home, source)
    assert done.returncode == 0, done.stderr
    catalog = load_catalog(home / "catalog.csv")
    assert {p.ndc: p.schedule for p in catalog.values()} == {
        "59011-0410-10": "II", "00093-3109-01": "IIIN", "00093-7155-98": None}
    assert catalog["59011-0410-10"].family == "oxycodone"


@pytest.mark.parametrize(("rows", "words"), [
    # the same NDC twice, once in its 10-digit form: which schedule would apply?
    ("59011-0410-10,A,1,II,a,1\n59011-410-10,B,1,IV,b,1\n", "line 3: NDC 59011-0410-10 listed twice"),
    # a NUL (read by the csv module without complaint) cannot be in the XML of an order
    ("59011-0410-10,Oxy\x00codone,1,II,a,1\n", "line 2: control character in name"),
    ("59011-0410-10,Oxycodone,1,II,a\x1b[2J,1\n", "line 2: control character in family"),
    # a field past the csv module's limit on line 3 was reported on line 2
    ("59011-0410-10,A,1,II,a,1\n00406-0552-01," + "x" * 200_000 + ",1,II,a,1\n",
     "line 3: not a readable CSV file"),
])
def test_catalog_import_refuses_bad_rows_and_keeps_the_catalog(tmp_path: Path, rows: str, words: str) -> None:
    home = tmp_path / "home"
    good = tmp_path / "good.csv"
    good.write_text(render_catalog(demo_catalog()))
    assert _import(home, good).returncode == 0
    before = (home / "catalog.csv").read_bytes()
    with pytest.raises(CatalogError) as err:
        parse_catalog(CATALOG_HEADER + rows)
    assert words in str(err.value), str(err.value)[:300]
    bad = tmp_path / "bad.csv"
    bad.write_text(CATALOG_HEADER + rows)
    done = _import(home, bad)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = json.loads(done.stderr)["error"]
    assert error["code"] == "catalog_invalid" and words in error["message"]
    assert (home / "catalog.csv").read_bytes() == before  # nothing lost
