"""The home directory and its configuration (`gateway.toml`).

Everything a deployment owns lives under one home: `--home DIR`, else `$GATEWAY_HOME`, else
`.gateway` in the current directory. Environment variables override the file for the things an
operator changes per process (database URL, PKCS#11 module).
"""

from __future__ import annotations

import json
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


@dataclass(frozen=True)
class Settings:
    home: Path
    hsm: HsmSettings = field(default_factory=HsmSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    database_url: str = ""  # empty: embedded SQLite in the home
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
        return self.database_url or f"sqlite:///{self.sqlite_path}"


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


def _section(data: dict[str, Any], name: str, cls: type) -> Any:
    raw = _table(data, name)
    known = {f for f in cls.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"gateway.toml [{name}]: unknown keys {sorted(unknown)}")
    # A value of the wrong type would otherwise surface much later, far from its cause
    # (`sessions = "4"` as a TypeError inside the HSM pool).
    defaults = cls()
    for key, value in raw.items():
        want = type(getattr(defaults, key))
        ok = isinstance(value, int | float) if want is float else isinstance(value, want)
        if not ok or (isinstance(value, bool) and want is not bool):
            raise ConfigError(f"gateway.toml [{name}] {key}: expected {want.__name__}, "
                              f"got {type(value).__name__} {value!r}")
    return cls(**raw)


def load_settings(home: str | os.PathLike[str] | None = None) -> Settings:
    """Read `gateway.toml` from the home (absent file: defaults), then apply the environment."""
    root = resolve_home(home)
    path = root / "gateway.toml"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    hsm = _section(data, "hsm", HsmSettings)
    server = _section(data, "server", ServerSettings)
    settings = Settings(
        home=root,
        hsm=hsm,
        server=server,
        database_url=str(_table(data, "database").get("url", "")),
        trust_bundle=str(_table(data, "trust").get("bundle", "")),
        extra={k: v for k, v in data.items() if k not in {"hsm", "server", "database", "trust"}},
    )
    if os.environ.get("GATEWAY_PKCS11_LIB"):
        settings = replace(settings, hsm=replace(settings.hsm, module=os.environ["GATEWAY_PKCS11_LIB"]))
    if os.environ.get("GATEWAY_HSM_PIN"):
        settings = replace(settings, hsm=replace(settings.hsm, user_pin=os.environ["GATEWAY_HSM_PIN"]))
    if os.environ.get("GATEWAY_DATABASE_URL"):
        settings = replace(settings, database_url=os.environ["GATEWAY_DATABASE_URL"])
    return settings


def write_default_config(settings: Settings) -> None:
    """Write `gateway.toml` once; an existing file is the operator's and is left alone.

    The file holds the HSM PINs: it is created owner-only (0600), in a home created 0700, and
    never overwritten (O_EXCL: two `gateway init` at once do not both write it).
    """
    if settings.config_path.exists():
        return
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
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
