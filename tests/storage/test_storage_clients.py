"""API clients: hashed tokens, one role, key labels; every change is an audit event."""

from __future__ import annotations

import hashlib

import pytest
from storage_backends import Backend

from gateway import clients
from gateway.storage import ClientExists, ClientNotFound, InvalidRecord, Storage


async def test_add_authenticate_revoke(storage: Storage) -> None:
    client, token = await clients.add_client(storage, "acme-pharmacy", "purchaser",
                                             "purchaser-key, other-key")
    assert client.role == "purchaser"
    assert client.key_labels == {"purchaser-key", "other-key"}
    assert client.active and client.may_use("purchaser-key") and not client.may_use("supplier-key")

    authed = await clients.authenticate(storage, token)
    assert authed is not None and authed.name == "acme-pharmacy" and authed.id == client.id

    revoked = await clients.revoke_client(storage, "acme-pharmacy")
    assert revoked.revoked_at is not None and not revoked.active
    assert not revoked.may_use("purchaser-key")
    assert await clients.authenticate(storage, token) is None  # a revoked token fails
    # revoking again keeps the first time
    assert (await clients.revoke_client(storage, "acme-pharmacy")).revoked_at == revoked.revoked_at
    # keys of a revoked client cannot be changed
    with pytest.raises(InvalidRecord):
        await clients.set_client_keys(storage, "acme-pharmacy", "x")


async def test_wrong_and_malformed_tokens_fail(storage: Storage) -> None:
    _, token = await clients.add_client(storage, "dist-1", "supplier")
    token_id = clients.parse_token_id(token)
    assert token_id is not None
    other_secret = f"gw_{token_id}_" + "A" * 43  # right id, wrong secret
    for bad in (other_secret, token[:-1], token + "x", "", "Bearer " + token, "gw_", "gw_zz_x",
                "gw_" + "g" * 12 + "_abc", token.upper()):
        assert await clients.authenticate(storage, bad) is None, bad
    assert (await clients.authenticate(storage, token)).name == "dist-1"


async def test_only_a_hash_of_the_token_is_stored(backend: Backend, storage: Storage) -> None:
    _, token = await clients.add_client(storage, "rx-app", "prescriber_app", ["prescriber-key"])
    rows = await backend.raw("SELECT token_id, token_hash FROM clients")
    assert len(rows) == 1
    token_id, stored = rows[0]
    assert bytes(stored) == hashlib.sha256(token.encode()).digest()
    secret = token.split("_", 2)[2]  # the secret itself may contain "_"
    assert token == f"gw_{token_id}_{secret}" and len(secret) == 43
    # the secret appears in no column of the table
    assert secret not in repr(await backend.raw("SELECT * FROM clients"))


async def test_names_roles_and_lookup(storage: Storage) -> None:
    await clients.add_client(storage, "b-admin", "admin")
    await clients.add_client(storage, "a-compliance", "compliance")
    with pytest.raises(ClientExists) as err:
        await clients.add_client(storage, "b-admin", "pharmacy")
    assert err.value.code == "client_exists"
    with pytest.raises(InvalidRecord):
        await clients.add_client(storage, "x", "superuser")
    with pytest.raises(InvalidRecord):
        await clients.add_client(storage, "has space", "admin")
    with pytest.raises(ClientNotFound):
        await clients.revoke_client(storage, "nobody")
    with pytest.raises(ClientNotFound):
        await clients.set_client_keys(storage, "nobody", "k")
    assert [c.name for c in await storage.list_clients()] == ["a-compliance", "b-admin"]
    assert (await storage.get_client("a-compliance")).role == "compliance"
    assert await storage.get_client("nobody") is None

    changed = await clients.set_client_keys(storage, "a-compliance", ["k2", "k1", " "])
    assert changed.key_labels == {"k1", "k2"}
    assert (await storage.get_client("a-compliance")).key_labels == {"k1", "k2"}


async def test_client_changes_are_audit_events(storage: Storage) -> None:
    """21 CFR 1311.150: changes to access controls are auditable events."""
    client, _ = await clients.add_client(storage, "p-1", "pharmacy", "k1", actor="admin-1",
                                         request_id="req-7")
    await clients.set_client_keys(storage, "p-1", "k1,k2")
    await clients.revoke_client(storage, "p-1")
    records = await storage.audit_records()
    assert [(r.event_type, r.actor, r.subject, r.outcome) for r in records] == [
        ("client_added", "admin-1", "p-1", "success"),
        ("client_keys_changed", "cli", "p-1", "success"),
        ("client_revoked", "cli", "p-1", "success"),
    ]
    assert records[0].details == {"role": "pharmacy", "key_labels": ["k1"],
                                  "token_id": client.token_id}
    assert records[0].request_id == "req-7"
    # a refused change writes neither the change nor its audit event
    with pytest.raises(ClientExists):
        await clients.add_client(storage, "p-1", "admin")
    assert len(await storage.audit_records()) == 3


async def test_client_identity_cannot_be_rewritten_in_the_database(backend: Backend,
                                                                   storage: Storage) -> None:
    await clients.add_client(storage, "c-1", "pharmacy")
    await clients.revoke_client(storage, "c-1")
    for statement in ("UPDATE clients SET role = 'admin'",
                      "UPDATE clients SET revoked_at = NULL",
                      "UPDATE clients SET token_hash = token_hash || token_hash"):
        with pytest.raises(Exception, match="only key labels and revocation"):
            await backend.raw(statement)
    assert (await storage.get_client("c-1")).role == "pharmacy"
