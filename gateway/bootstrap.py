"""`gateway init`: set up a home, idempotently.

Order matters and each step is safe to repeat: configuration, SoftHSM token, the audit key, the
test PKI with the demo subscribers' keys (generated inside the HSM) and certificates, the product
catalog, the database (migrations), the demo API clients, and `demo.json` naming all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp

from gateway.catalog import demo_catalog, write_catalog
from gateway.clients import add_client, authenticate
from gateway.config import Settings, load_settings, write_default_config
from gateway.signing.enrol import issue_demo_identities
from gateway.signing.errors import KeyNotFound
from gateway.signing.hsm import Hsm
from gateway.signing.softhsm import ensure_softhsm_token
from gateway.storage import open_storage
from gateway.storage.base import AuditEvent

AUDIT_KEY_LABEL = "audit"

# Demo API clients: name -> (role, key labels it may use). demo.json names them by role.
DEMO_CLIENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "purchaser": ("purchaser", ("demo-purchaser",)),
    "supplier": ("supplier", ("demo-supplier",)),
    "prescriber_app": ("prescriber_app", ("demo-prescriber", "demo-prescriber-ec")),
    "pharmacy": ("pharmacy", ("demo-pharmacy",)),
    "compliance": ("compliance", ()),
    "admin": ("admin", ()),
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write, readable by the owner only: demo.json holds API tokens and secrets."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".demo-")  # created 0600
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # no stray copy of the tokens
        raise


def ensure_audit_key(hsm: Hsm) -> None:
    try:
        hsm.public_key(AUDIT_KEY_LABEL)
    except KeyNotFound:
        hsm.generate_keypair(AUDIT_KEY_LABEL, "rsa2048")


async def _ensure_clients(settings: Settings, previous: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Demo clients exist and demo.json holds a working token for each."""
    known = previous.get("clients", {}) if isinstance(previous.get("clients"), dict) else {}
    out: dict[str, dict[str, str]] = {}
    storage = open_storage(settings)
    await storage.open()
    try:
        for name, (role, labels) in DEMO_CLIENTS.items():
            token = (known.get(name) or {}).get("token")
            if token:
                client = await authenticate(storage, token)
                if client is not None and client.role == role:
                    out[name] = {"token": token, "role": role, "client": client.name}
                    continue
            # No working token on record: make a fresh client (names are unique for good,
            # so a lost token means a new name; the old client is left as it is).
            base, n = f"demo-{name}", 1
            client_name = base
            while await storage.get_client(client_name) is not None:
                n += 1
                client_name = f"{base}-{n}"
            client, token = await add_client(storage, client_name, role, labels, actor="init")
            out[name] = {"token": token, "role": role, "client": client.name}
        await storage.append_audit(AuditEvent("home_initialised", "init", "success",
                                              subject=str(settings.home)))
    finally:
        await storage.close()
    return out


def init_home(home: str | os.PathLike[str] | None = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """Set up (or check) a home; returns what was written to demo.json."""
    settings = settings or load_settings(home)
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)  # PINs, tokens, patient data
    _make_private(settings.home)
    with home_lock(settings):
        return _init_locked(settings)


def _make_private(home: Path) -> None:
    """The home is its owner's alone (0700), also when it existed before `init` (made by hand,
    under a lax umask). Whoever may write the directory may replace the files in it whatever
    their own modes: gateway.toml names the PKCS#11 library the gateway loads, softhsm2.conf the
    token store, demo.json the tokens scripts use."""
    if home.stat().st_mode & 0o077:
        os.chmod(home, 0o700)


@contextlib.contextmanager
def home_lock(settings: Settings) -> Iterator[None]:
    """One look-then-create at a time per home (`gateway init`, `gateway keys generate`): PKCS#11
    has no "create unless the label exists", and two processes that both looked first made two
    keys with one label, which no later lookup by label can resolve."""
    with open(settings.home / ".init.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _init_locked(settings: Settings) -> dict[str, Any]:
    write_default_config(settings)
    settings = load_settings(settings.home)
    ensure_softhsm_token(settings)
    previous = _read_json(settings.demo_json)

    hsm = Hsm.open(settings)
    try:
        ensure_audit_key(hsm)
        keys = issue_demo_identities(settings, hsm)
    finally:
        hsm.close()

    if not settings.catalog_path.exists():
        write_catalog(demo_catalog(), settings.catalog_path)

    clients = asyncio.run(_ensure_clients(settings, previous))

    prescriber = previous.get("prescriber") or {}
    demo = {
        "home": str(settings.home),
        "trust_bundle": str(settings.trust_bundle_path.resolve()),
        "crl_dir": str((settings.pki_dir / "crl").resolve()),
        "catalog": str(settings.catalog_path.resolve()),
        "database": settings.effective_database_url if not settings.database_url else "postgresql",
        "audit_key": AUDIT_KEY_LABEL,
        "clients": clients,
        "keys": keys,
        "prescriber": {
            "password": prescriber.get("password") or secrets.token_urlsafe(12),
            "totp_secret": prescriber.get("totp_secret") or pyotp.random_base32(),
        },
    }
    for extra in ("portal_users",):
        if extra in previous:
            demo[extra] = previous[extra]
    _write_private_json(settings.demo_json, demo)
    return demo
