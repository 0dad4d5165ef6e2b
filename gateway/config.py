"""The home directory and its configuration (`gateway.toml`).

Everything a deployment owns lives under one home: `--home DIR`, else `$GATEWAY_HOME`, else
`.gateway` in the current directory. Environment variables override the file for the things an
operator changes per process (database URL, PKCS#11 module).

`[database]` holds `url` (empty: SQLite in the home), `command_timeout_s` (PostgreSQL: the
longest one statement, a COMMIT included, may take before it is cancelled and the request gets
503; 30 s, at most 3600) and `min_free_bytes` (SQLite: readiness, `/readyz`, fails while the
database's filesystem has less free space than this, before writes start failing; 64 MiB, 0 turns
the check off).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_SOFTHSM_LIBS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def default_pkcs11_lib() -> str:
    for candidate in DEFAULT_SOFTHSM_LIBS:
        if Path(candidate).exists():
            return candidate
    return DEFAULT_SOFTHSM_LIBS[0]


@dataclass(frozen=True)
class HsmSettings:
    module: str = field(default_factory=default_pkcs11_lib)
    token_label: str = "gateway"
    user_pin: str = "1234"
    so_pin: str = "12345678"
    sessions: int = 0  # 0: one per core
    workers: int = 0  # 0: one per core
    # CPU priority (nice) of the signing workers, above the event loop's: when the cores are
    # saturated the loop keeps reading requests and refusing the excess at once. 0: same priority.
    worker_nice: int = 0


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8443
    max_body_bytes: int = 1_048_576
    queue_size: int = 32
    queue_deadline_ms: int = 250
    retry_after_s: int = 1
    drain_timeout_s: float = 10.0
    # A body not fully received within this time is refused (408): a client that trickles its
    # upload must not hold a connection and its buffers for as long as it likes.
    body_timeout_s: float = 15.0
    # A connection without a complete request is closed after this long, before its first
    # request too: a client trickling its headers (slowloris) holds it this long, not the hour
    # of aiohttp's AppRunner default (3630 s). 75 s, as aiohttp's run_app and nginx.
    idle_timeout_s: float = 75.0


@dataclass(frozen=True)
class DatabaseSettings:
    """`[database]` besides `url` (kept as `Settings.database_url`)."""

    # PostgreSQL: a statement (a COMMIT included) running longer is cancelled (503), so a lock
    # held elsewhere or a silent server never holds the writer and its queue for ever.
    command_timeout_s: float = 30.0
    # SQLite: the storage probe behind /readyz fails below this much free space on the
    # database's filesystem, so a balancer stops sending work before commits fail for lack of
    # space. 0: no check.
    min_free_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    home: Path
    hsm: HsmSettings = field(default_factory=HsmSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    database_url: str = ""  # empty: embedded SQLite in the home
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    trust_bundle: str = ""  # empty: the home's test PKI bundle
    extra: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """A table of gateway.toml that has no settings class of its own ([audit], [som],
        [readiness]...); empty when absent."""
        table = self.extra.get(name)
        return table if isinstance(table, dict) else {}

    # Paths inside the home, in one place so that nobody guesses them.
    @property
    def config_path(self) -> Path:
        return self.home / "gateway.toml"

    @property
    def softhsm_conf(self) -> Path:
        return self.home / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        return self.home / "tokens"

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.csv"

    @property
    def sqlite_path(self) -> Path:
        return self.home / "gateway.sqlite3"

    @property
    def demo_json(self) -> Path:
        return self.home / "demo.json"

    @property
    def trust_bundle_path(self) -> Path:
        return Path(self.trust_bundle) if self.trust_bundle else self.pki_dir / "ca-bundle.pem"

    @property
    def effective_database_url(self) -> str:
        """The database URL in use. A relative `sqlite:///PATH` is in the home, like every other
        file of it: taken from the working directory, a command run elsewhere (a service
        started from /, the operator's shell in the home) opened another database, a second
        archive and audit trail that each looked intact."""
        url = self.database_url or f"sqlite:///{self.sqlite_path}"
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            return f"sqlite:///{self.home.absolute() / url.removeprefix('sqlite:///')}"
        return url


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("GATEWAY_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / ".gateway").resolve()


class ConfigError(ValueError):
    """`gateway.toml` cannot be used: not TOML, an unknown key, a value of the wrong type."""

    code = "config_invalid"


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"gateway.toml: [{name}] must be a table, not {type(raw).__name__}")
    return raw


# The range of each number, (lowest, highest, lowest excluded). A value outside it would not
# fail where it is written but later and elsewhere: `body_timeout_s = 0` (or nan) refuses every
# body with 408, `queue_deadline_ms = 0` every signature with 429, `max_body_bytes = 0` lifts
# aiohttp's limit on chunked bodies altogether, `port = 70000` fails in bind(), a negative
# `sessions` silently means "one per core".
_RANGES: dict[str, dict[str, tuple[float, float | None, bool]]] = {
    "hsm": {"sessions": (0, None, False), "workers": (0, None, False), "worker_nice": (0, 19, False)},
    "server": {"port": (0, 65535, False), "max_body_bytes": (1, None, False),
               "queue_size": (0, None, False), "queue_deadline_ms": (1, None, False),
               "retry_after_s": (0, None, False), "drain_timeout_s": (0, None, False),
               "body_timeout_s": (0, None, True), "idle_timeout_s": (0, None, True)},
    # Above an hour a stalled database holds requests longer than any client waits; migrations
    # have their own, longer limit. min_free_bytes = 0 turns the free-space check off.
    "database": {"command_timeout_s": (0, 3600, True), "min_free_bytes": (0, None, False)},
    # A zero period made the checkpointer and the refusal summariser spin the event loop.
    "audit": {"checkpoint_every_records": (1, None, False), "checkpoint_every_seconds": (0, None, True),
              "refusal_burst": (0, None, False), "refusal_window_s": (0, None, True)},
}
# Tables without a settings class of their own, read with `Settings.section`: each key's type.
# ([som] is checked by gateway.som's own configuration.)
_PLAIN_TABLES: dict[str, dict[str, type]] = {
    "audit": {"key": str, "checkpoint_every_records": int, "checkpoint_every_seconds": float,
              "refusal_burst": int, "refusal_window_s": float},
    "readiness": {"key": str},
}
# Strings that must not be empty: elsewhere in this file "" means "the default", but an empty
# `host` makes aiohttp listen on every interface, and an empty module or token label names nothing.
_NON_EMPTY = {"hsm": {"module", "token_label"}, "server": {"host"}, "audit": {"key"},
              "readiness": {"key"}}
# Tables read by some part of the gateway; any other one is a typo (`[sever]`) whose settings
# would silently not apply. A new area that reads `settings.section(NAME)` adds NAME here.
KNOWN_TABLES = frozenset({"hsm", "server", "database", "trust", "audit", "som", "readiness"})
_DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


def _check_range(name: str, key: str, value: int | float) -> None:
    low, high, low_open = _RANGES.get(name, {}).get(key, (-math.inf, None, False))
    bad = (isinstance(value, float) and not math.isfinite(value)) or value < low \
        or (low_open and value == low) or (high is not None and value > high)
    if bad:
        want = f"> {low:g}" if low_open else (f"{low:g} to {high:g}" if high is not None else f">= {low:g}")
        raise ConfigError(f"gateway.toml [{name}] {key}: must be a finite number {want}, got {value!r}")


def _check_table(name: str, raw: dict[str, Any], types: dict[str, type]) -> None:
    unknown = set(raw) - set(types)
    if unknown:
        raise ConfigError(f"gateway.toml [{name}]: unknown keys {sorted(unknown)}")
    # A value of the wrong type would otherwise surface much later, far from its cause
    # (`sessions = "4"` as a TypeError inside the HSM pool).
    for key, value in raw.items():
        want = types[key]
        ok = isinstance(value, int | float) if want is float else isinstance(value, want)
        if not ok or (isinstance(value, bool) and want is not bool):
            raise ConfigError(f"gateway.toml [{name}] {key}: expected {want.__name__}, "
                              f"got {type(value).__name__} {value!r}")
        if want in (int, float):
            _check_range(name, key, value)
        elif key in _NON_EMPTY.get(name, ()) and not value.strip():
            raise ConfigError(f"gateway.toml [{name}] {key}: must not be empty")


def _section(data: dict[str, Any], name: str, cls: type) -> Any:
    raw = _table(data, name)
    defaults = cls()
    _check_table(name, raw, {f: type(getattr(defaults, f)) for f in cls.__dataclass_fields__})
    return cls(**raw)


def _database(data: dict[str, Any]) -> tuple[str, DatabaseSettings]:
    """`[database]`: the URL (checked) and the engine settings."""
    raw = _table(data, "database")
    _check_table("database", raw, {"url": str, "command_timeout_s": float, "min_free_bytes": int})
    url = raw.get("url", "")
    _check_database_url(url, "gateway.toml [database] url")
    defaults = DatabaseSettings()
    return url, DatabaseSettings(
        command_timeout_s=float(raw.get("command_timeout_s", defaults.command_timeout_s)),
        min_free_bytes=raw.get("min_free_bytes", defaults.min_free_bytes))


def _one_string(data: dict[str, Any], name: str, key: str) -> str:
    """A table holding one string setting ([trust] bundle); "" when absent."""
    raw = _table(data, name)
    unknown = set(raw) - {key}
    if unknown:  # `[trust] bundel = ...` would otherwise leave the default in use, silently
        raise ConfigError(f"gateway.toml [{name}]: unknown keys {sorted(unknown)}")
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"gateway.toml [{name}] {key}: expected str, got {type(value).__name__} {value!r}")
    return value


def _check_database_url(url: str, where: str) -> None:
    if url and not url.startswith(_DATABASE_SCHEMES):
        # Only the scheme is shown: the rest of a URL may hold a password.
        raise ConfigError(f"{where}: {url.split(':', 1)[0]!r} is not a database URL: "
                          "use sqlite:///PATH or postgresql://...")
    if url.startswith("sqlite:///"):
        # The rest is a file name, taken as it is: `?mode=ro` named a file "gw.db?mode=ro" that
        # was written to, `:memory:` a file of that name while each connection saw a database
        # of its own (a migrated writer, readers finding no tables), "" the current directory.
        path = url.removeprefix("sqlite:///")
        if not path or path == ":memory:" or "?" in path or "#" in path:
            raise ConfigError(f"{where}: {url!r} names no database file: use sqlite:///PATH "
                              "(an absolute path is sqlite:////PATH), without ?options; an "
                              "in-memory database cannot keep the archive")


def load_settings(home: str | os.PathLike[str] | None = None) -> Settings:
    """Read `gateway.toml` from the home (absent file: defaults), then apply the environment."""
    root = resolve_home(home)
    path = root / "gateway.toml"
    data: dict[str, Any] = {}
    # A dangling symlink counts as a file: an operator's configuration kept elsewhere and gone
    # missing must not silently become the defaults (SQLite in the home instead of PostgreSQL).
    if path.exists() or path.is_symlink():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:  # a directory, no permission, a dangling symlink
            raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    unknown = set(data) - KNOWN_TABLES
    if unknown:
        raise ConfigError(f"gateway.toml: unknown tables or keys {sorted(unknown)}")
    hsm = _section(data, "hsm", HsmSettings)
    server = _section(data, "server", ServerSettings)
    for name, types in _PLAIN_TABLES.items():
        _check_table(name, _table(data, name), types)
    database_url, database = _database(data)
    settings = Settings(
        home=root,
        hsm=hsm,
        server=server,
        database_url=database_url,
        database=database,
        trust_bundle=_one_string(data, "trust", "bundle"),
        extra={k: v for k, v in data.items() if k not in {"hsm", "server", "database", "trust"}},
    )
    if os.environ.get("GATEWAY_PKCS11_LIB"):
        settings = replace(settings, hsm=replace(settings.hsm, module=os.environ["GATEWAY_PKCS11_LIB"]))
    if os.environ.get("GATEWAY_HSM_PIN"):
        settings = replace(settings, hsm=replace(settings.hsm, user_pin=os.environ["GATEWAY_HSM_PIN"]))
    if os.environ.get("GATEWAY_DATABASE_URL"):
        _check_database_url(os.environ["GATEWAY_DATABASE_URL"], "GATEWAY_DATABASE_URL")
        settings = replace(settings, database_url=os.environ["GATEWAY_DATABASE_URL"])
    return settings


def write_default_config(settings: Settings) -> None:
    """Write `gateway.toml` once; an existing file is the operator's and is left alone.

    The file holds the HSM PINs: it is created owner-only (0600), in a home created 0700, and
    never overwritten (O_EXCL: two `gateway init` at once do not both write it). What the
    environment overrides (GATEWAY_PKCS11_LIB, GATEWAY_HSM_PIN) is written as the default.
    """
    if settings.config_path.exists():
        return
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    # An override from the environment is for the process that has it; the file gets the
    # default. A PIN is put in GATEWAY_HSM_PIN to keep it out of files, and a module named for
    # one run (which may not even load) must not stay with the home after that run failed.
    defaults = HsmSettings()
    hsm = settings.hsm
    if os.environ.get("GATEWAY_PKCS11_LIB"):
        hsm = replace(hsm, module=defaults.module)
    if os.environ.get("GATEWAY_HSM_PIN"):
        hsm = replace(hsm, user_pin=defaults.user_pin)
    settings = replace(settings, hsm=hsm)
    text = (
        "# Gateway configuration. Environment overrides: GATEWAY_DATABASE_URL, GATEWAY_PKCS11_LIB,\n"
        "# GATEWAY_HSM_PIN.\n"
        "[hsm]\n"
        f"module = {_toml_str(settings.hsm.module)}\n"
        f"token_label = {_toml_str(settings.hsm.token_label)}\n"
        f"user_pin = {_toml_str(settings.hsm.user_pin)}\n"
        f"so_pin = {_toml_str(settings.hsm.so_pin)}\n"
        "sessions = 0  # 0: one per core\n\n"
        "[server]\n"
        f"host = {_toml_str(settings.server.host)}\n"
        f"port = {settings.server.port}\n"
        f"max_body_bytes = {settings.server.max_body_bytes}\n"
        f"queue_size = {settings.server.queue_size}\n"
        f"queue_deadline_ms = {settings.server.queue_deadline_ms}\n\n"
        "[database]\n"
        'url = ""  # empty: embedded SQLite in the home; or postgresql://...\n'
        f"command_timeout_s = {settings.database.command_timeout_s:g}  "
        "# PostgreSQL: a longer statement is cancelled (503)\n"
        f"min_free_bytes = {settings.database.min_free_bytes}  "
        "# SQLite: /readyz fails below this much free disk; 0: no check\n"
    )
    try:
        fd = os.open(settings.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's): paths and PINs may hold quotes."""
    return json.dumps(value)
