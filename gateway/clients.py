"""API clients: tokens, roles and the key labels each client may use.

A token is `gw_<token_id>_<secret>`: `token_id` (12 hex characters) is public and finds the row;
`secret` is 32 random bytes (base64url). Only SHA-256 of the whole token is stored: for a
256-bit random secret a fast hash is enough (no password stretching needed), and the stored value
is compared in constant time. The token is shown once, when the client is added.

Every change to clients (add, revoke, key grants) is an audit event written in the same unit as
the change (21 CFR 1311.150: changes to access controls are auditable events).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from gateway.storage.base import (
    ROLES, AuditEvent, Client, ClientNotFound, InvalidRecord, NewClient, Storage,
)

TOKEN_PREFIX = "gw_"
_TOKEN_ID_HEX = 12


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_token() -> tuple[str, str]:
    """(token_id, token): a fresh random token and its public lookup id."""
    token_id = secrets.token_hex(_TOKEN_ID_HEX // 2)
    return token_id, f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def parse_token_id(token: str) -> str | None:
    """The token's lookup id, or None when the token is not of our shape.

    Our tokens are printable ASCII; anything else (a lone surrogate from a hand-edited
    demo.json, which UTF-8 cannot even encode for hashing) is no token of ours."""
    if not (token.isascii() and token.isprintable()) or not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX):].partition("_")
    if not sep or len(token_id) != _TOKEN_ID_HEX or not secret:
        return None
    if any(c not in "0123456789abcdef" for c in token_id):
        return None
    return token_id


def normalise_keys(keys: Iterable[str] | str | None) -> frozenset[str]:
    """Key labels from a list or a comma-separated string; blanks dropped.

    Raises InvalidRecord for a label no HSM key can carry (enrolment's rule: 1 to 64 printable
    ASCII characters, no '/'): such a grant could never be used, and a control character in it
    would reach terminals and logs through `clients list` and the audit trail."""
    from gateway.signing.hsm import MAX_LABEL, valid_label

    if keys is None:
        return frozenset()
    if isinstance(keys, str):
        keys = keys.split(",")
    labels = frozenset(k.strip() for k in keys if k and k.strip())
    bad = sorted(label for label in labels if not valid_label(label))
    if bad:
        raise InvalidRecord(f"key labels are 1 to {MAX_LABEL} printable ASCII characters "
                            f"(no '/', no leading '.'): {', '.join(map(ascii, bad))}", key_labels=bad)
    return labels


def check_client_name(name: str) -> str:
    """The name, stripped; InvalidRecord unless 1-200 printable characters without spaces.

    The name is the actor of every audit record the client causes and a column of `clients
    list`: a control or format character (an escape sequence, a right-to-left override) would
    rewrite what a reviewer's terminal shows."""
    name = name.strip()
    if not name or len(name) > 200 or not name.isprintable() or any(c.isspace() for c in name):
        raise InvalidRecord("client name must be 1-200 printable characters without spaces",
                            name=ascii(name))
    return name


async def add_client(storage: Storage, name: str, role: str,
                     keys: Iterable[str] | str | None = None, *, actor: str = "cli",
                     request_id: str | None = None) -> tuple[Client, str]:
    """Create a client; returns it and its token (shown once, never stored).

    Raises InvalidRecord (unknown role, bad name) or ClientExists.
    """
    name = check_client_name(name)
    if role not in ROLES:
        raise InvalidRecord(f"role must be one of {', '.join(ROLES)}", role=role)
    labels = normalise_keys(keys)
    token_id, token = new_token()
    event = AuditEvent("client_added", actor, "success", subject=name,
                       details={"role": role, "key_labels": sorted(labels), "token_id": token_id},
                       request_id=request_id)
    client = await storage.add_client(
        NewClient(name=name, role=role, key_labels=labels, token_id=token_id,
                  token_hash=token_hash(token)), audit=[event])
    return client, token


def _could_exist(name: str) -> None:
    """ClientNotFound for a name no client can have (`check_client_name` refuses it at `add`):
    an undecodable byte of a command line (a lone surrogate) was a UnicodeEncodeError traceback
    from the database driver."""
    try:
        check_client_name(name)
    except InvalidRecord:
        raise ClientNotFound(f"no client named {name!r}", name=ascii(name)) from None


async def find_client(storage: Storage, name: str) -> Client | None:
    """The client with that name, revoked or not; None also for a name no client can have."""
    try:
        _could_exist(name)
    except ClientNotFound:
        return None
    return await storage.get_client(name)


async def revoke_client(storage: Storage, name: str, *, actor: str = "cli",
                        request_id: str | None = None) -> Client:
    """Revoke a client's token for good. Raises ClientNotFound.

    Revoking again changes nothing and returns the client with its first revocation time; it
    writes no audit event either, so the trail shows one revocation, when it happened."""
    _could_exist(name)
    existing = await storage.get_client(name)
    if existing is not None and existing.revoked_at is not None:
        return existing
    event = AuditEvent("client_revoked", actor, "success", subject=name, request_id=request_id)
    return await storage.revoke_client(name, audit=[event])


async def set_client_keys(storage: Storage, name: str, keys: Iterable[str] | str, *,
                          actor: str = "cli", request_id: str | None = None) -> Client:
    """Replace the key labels a client may use. Raises ClientNotFound."""
    _could_exist(name)
    labels = normalise_keys(keys)
    event = AuditEvent("client_keys_changed", actor, "success", subject=name,
                       details={"key_labels": sorted(labels)}, request_id=request_id)
    return await storage.set_client_keys(name, labels, audit=[event])


async def _check_token(storage: Storage, token: str) -> tuple[Client | None, dict[str, str]]:
    """(the active client holding this token, else None; the client it names and, refused,
    why: "unknown_token", "wrong_secret" or "revoked"). The stored hash is compared in constant
    time; a revoked client never authenticates."""
    token_id = parse_token_id(token)
    found = await storage.client_by_token_id(token_id) if token_id is not None else None
    if found is None:
        return None, {"reason": "unknown_token"}
    client, stored = found
    if not hmac.compare_digest(stored, token_hash(token)):
        return None, {"client": client.name, "reason": "wrong_secret"}
    if not client.active:
        return None, {"client": client.name, "reason": "revoked"}
    return client, {"client": client.name}


async def authenticate(storage: Storage, token: str) -> Client | None:
    """The active client holding this token, else None (unknown, malformed or revoked)."""
    return (await _check_token(storage, token))[0]


async def refusal_reason(storage: Storage, token: str) -> dict[str, str]:
    """Why `authenticate` refused this token, for the audit event (21 CFR 1311.150: who tried):
    {"reason": "unknown_token"} or, when the token names a client, its name and
    "revoked" / "wrong_secret". Never the secret. A token found valid by this second lookup
    (its client added in between) names its client and "unknown_token"."""
    why = (await _check_token(storage, token))[1]
    return {**why, "reason": why.get("reason", "unknown_token")}
