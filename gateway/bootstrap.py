"""`gateway init`: set up a home, idempotently.

Order matters and each step is safe to repeat: configuration, SoftHSM token, the audit key, the
test PKI with the demo subscribers' keys (generated inside the HSM) and certificates, the product
catalog, the database (migrations), the demo API clients, and `demo.json` naming all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp

from gateway.audit.verify import checkpoint_signature_ok
from gateway.catalog import demo_catalog, write_catalog
from gateway.clients import add_client, authenticate
from gateway.config import Settings, load_settings, write_default_config
from gateway.signing.enrol import DEMO_IDENTITIES, issue_demo_identities
from gateway.signing.errors import KeyNotFound
from gateway.signing.hsm import Hsm
from gateway.signing.softhsm import ensure_softhsm_token, is_softhsm
from gateway.storage import open_storage
from gateway.storage.base import AuditEvent, Storage, StorageError

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
    """What the last `init` wrote; {} when absent or unreadable. A file of another shape (`null`,
    a list: edited by hand) counts as absent: it stopped every later `init` and `demo` with a
    traceback until someone deleted it."""
    try:
        return _dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


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


class AuditKeyMismatch(StorageError):
    """The database's audit trail is checkpointed with an audit key this home's HSM does not hold."""

    code = "audit_key_mismatch"


async def _check_audit_key(storage: Storage, hsm: Hsm, settings: Settings) -> None:
    """Refuse a database whose last audit checkpoint this home's HSM did not sign: the trail of
    another gateway (two homes, each with its own SoftHSM token, on one PostgreSQL database), or
    of this home before its token was made anew. Going on wrote this home's records and
    checkpoints into that trail, and `gateway audit verify` (and the demo's last step) found it
    broken from then on, for both homes: checkpoints are append-only."""
    last = await storage.last_checkpoint()
    if last is None:
        return
    try:
        public = await asyncio.to_thread(hsm.public_key, last.key_label)
    except KeyNotFound:
        public = None
    if public is None or not checkpoint_signature_ok(last, public):
        raise AuditKeyMismatch(
            f"the database's audit trail is checkpointed with an audit key ('{last.key_label}') "
            "this home's HSM does not hold: it is another gateway's database, or this home's "
            "token was made anew. Give this home a database (or PostgreSQL schema) of its own"
            + ("" if settings.database_url else f" (move {settings.sqlite_path} aside)")
            + "; nothing was written to this one")


async def _ensure_clients(settings: Settings, previous: dict[str, Any], hsm: Hsm) -> dict[str, dict[str, str]]:
    """Demo clients exist and demo.json holds a working token for each."""
    known = _dict(previous.get("clients"))
    out: dict[str, dict[str, str]] = {}
    storage = open_storage(settings)
    await storage.open()
    try:
        await _check_audit_key(storage, hsm, settings)
        for name, (role, labels) in DEMO_CLIENTS.items():
            token = _dict(known.get(name)).get("token")
            if isinstance(token, str) and token:
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
    _check_home_path(settings)
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)  # PINs, tokens, patient data
    _make_private(settings.home)
    with home_lock(settings):
        return _init_locked(settings)


# SoftHSM's configuration file has no quoting: a value ends at '#' (a comment) or at a second
# '=', so a token directory under such a path names another directory, and softhsm2-util failed
# with a traceback.
_SOFTHSM_UNSAFE = "#=\n\r"


def _check_home_path(settings: Settings) -> None:
    """Refuse, before anything is written, a home `init` cannot set up (home_unusable)."""
    home = settings.home
    if home.exists() and not home.is_dir():  # was "File exists", which says nothing
        raise NotADirectoryError(errno.ENOTDIR, "not a directory: the home must be a directory",
                                 str(home))
    if is_softhsm(settings.hsm.module) and any(c in str(settings.token_dir) for c in _SOFTHSM_UNSAFE):
        raise OSError(errno.EINVAL, "SoftHSM cannot keep its token under a path containing '#', "
                      "'=' or a line break (its configuration file cannot quote them): choose "
                      "another home", str(home))


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
        hsm.drop_incomplete_keys([AUDIT_KEY_LABEL, *(ident.label for ident in DEMO_IDENTITIES)])
        ensure_audit_key(hsm)
        keys = issue_demo_identities(settings, hsm)
        if not settings.catalog_path.exists():
            write_catalog(demo_catalog(), settings.catalog_path)
        clients = asyncio.run(_ensure_clients(settings, previous, hsm))
    finally:
        hsm.close()

    prescriber = _dict(previous.get("prescriber"))
    demo = {
        "home": str(settings.home),
        "trust_bundle": str(settings.trust_bundle_path.resolve()),
        "crl_dir": str((settings.pki_dir / "crl").resolve()),
        "catalog": str(settings.catalog_path.resolve()),
        # a PostgreSQL URL may hold a password: its scheme only
        "database": (settings.effective_database_url
                     if settings.effective_database_url.startswith("sqlite:") else "postgresql"),
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
