"""The storage as gateway.toml configures it, on the real engines.

* `[database] min_free_bytes`: the SQLite storage probe behind `/readyz` fails (StorageUnavailable,
  HTTP 503 `database_unavailable`, naming the free space) while the database's filesystem has less
  free space than that, before commits start failing for lack of space; checked on a real small
  tmpfs and on the test's own filesystem with a threshold above its free space.
* `[database] command_timeout_s`: a PostgreSQL statement blocked longer than that is cancelled and
  the caller gets StorageUnavailable.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from storage_backends import PG_URL, Backend, drop_pg_schema, make_backend

from gateway.audit import verify_trail
from gateway.clients import add_client, authenticate, revoke_client, token_hash
from gateway.config import Settings, load_settings
from gateway.storage import (
    AuditEvent, MigrationError, NewDocument, Storage, StorageUnavailable, open_storage,
)
from gateway.storage.migrations import load
from tests.http.conftest import (  # noqa: F401 - fixtures
    copy_home, http_keys, servers, start_server, stop_server, wait_ready,
)

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_database_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_DATABASE_URL", raising=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs, unmounted at the end."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[Backend]:
    """PostgreSQL in a schema of its own (skipped locally when the server is unreachable)."""
    b = await make_backend("postgresql", tmp_path)
    yield b
    await drop_pg_schema(b.schema or "")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_until(path: Path, left: int) -> Path:
    """A filler file that leaves about `left` bytes free on the filesystem of `path`."""
    filler = path / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free_bytes(path) - left))
    assert free_bytes(path) <= left + 64 * 1024
    return filler


def home_with(home: Path, database: str) -> Settings:
    home.mkdir(parents=True, exist_ok=True)
    (home / "gateway.toml").write_text(f"[database]\n{database}\n")
    return load_settings(home)


def order(n: int) -> NewDocument:
    return NewDocument("csos_order", f"<CSOSOrder n='{n}'/>".encode(), "application/xml",
                       client="purchaser-1", natural_key=f"order-{n}")


async def test_probe_fails_on_a_nearly_full_disk_while_writes_still_fit(small_disk: Path) -> None:
    """Before: the one-row probe fit until the last page, so /readyz said ready while the next
    archived document could no longer be written."""
    settings = home_with(small_disk, f"min_free_bytes = {MIB}")
    storage = open_storage(settings)
    await storage.open()
    try:
        await storage.health_check()  # plenty of room: ready
        filler = fill_until(small_disk, MIB // 2)
        with pytest.raises(StorageUnavailable) as err:
            await storage.health_check()
        free = free_bytes(small_disk)
        assert err.value.code == "database_unavailable"
        assert "bytes free" in err.value.message and str(MIB) in err.value.message
        assert 0 < err.value.details["free_bytes"] < MIB
        assert abs(err.value.details["free_bytes"] - free) <= 64 * 1024
        # the point of failing early: a commit still fits, nothing is lost meanwhile
        result = await storage.commit_unit(documents=[order(1)],
                                           audit=[AuditEvent("document.signed", "t", "success")])
        assert await storage.get_document(result.document_ids[0]) is not None
        filler.unlink()  # space freed: ready again, without a restart
        await storage.health_check()
        assert (await verify_trail(storage, None)).ok
    finally:
        await storage.close()


async def test_probe_fails_when_the_threshold_is_above_the_free_space(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    settings = home_with(tmp_path / "home", f"min_free_bytes = {free + 1024 * MIB}")
    async with open_storage(settings) as storage:
        with pytest.raises(StorageUnavailable) as err:
            await storage.health_check()
        assert "bytes free" in err.value.message
    # 0 turns the check off
    settings = home_with(tmp_path / "home", "min_free_bytes = 0")
    async with open_storage(settings) as storage:
        await storage.health_check()


async def test_postgres_has_nothing_local_to_check(pg: Backend, tmp_path: Path) -> None:
    settings = home_with(tmp_path / "home", f'url = "{pg.cli_url}"\nmin_free_bytes = {2**62}')
    async with open_storage(settings) as storage:
        await storage.health_check()


async def test_readyz_of_a_served_gateway_fails_on_a_nearly_full_disk(
        softhsm_settings: Settings, http_keys: dict, small_disk: Path, tmp_path: Path,  # noqa: F811
        servers: list) -> None:  # noqa: F811
    home = copy_home(softhsm_settings, tmp_path / "home",
                     database_url=f"sqlite:///{small_disk / 'gw.sqlite3'}")
    with open(home / "gateway.toml", "a") as fh:  # [database] is the file's last table
        fh.write(f"min_free_bytes = {MIB}\n")
    server = start_server(home)
    servers.append(server)
    await wait_ready(server.url)
    filler = fill_until(small_disk, MIB // 2)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503, body
        assert body["error"]["code"] == "database_unavailable"
        assert "bytes free" in body["error"]["message"]
        filler.unlink()
        await wait_ready(server.url)
    assert stop_server(server) == 0


async def test_postgres_command_timeout_from_gateway_toml(pg: Backend, tmp_path: Path) -> None:
    """A lock held elsewhere on the audit head: the append is cancelled after the configured
    command_timeout_s (1 s here, 30 s by default), not held for as long as the lock is."""
    settings = home_with(tmp_path / "home", f'url = "{pg.cli_url}"\ncommand_timeout_s = 1')
    async with open_storage(settings) as storage:
        blocker = await asyncpg.connect(PG_URL, server_settings={"search_path": pg.schema or ""})
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT * FROM audit_head FOR UPDATE")
            with pytest.raises(StorageUnavailable) as err:
                await asyncio.wait_for(
                    storage.append_audit(AuditEvent("client_added", "t", "success")), 20)
            assert "within 1 s" in err.value.message
            await tx.rollback()
        finally:
            await blocker.close()
        await storage.append_audit(AuditEvent("client_added", "t", "success"))  # lock gone: works
        assert (await verify_trail(storage, None)).ok


# --- API client tokens ------------------------------------------------------------------------

async def test_tokens_that_are_not_ours_authenticate_no_one(storage: Storage) -> None:
    """A token naming a real client's public id with a secret UTF-8 cannot encode (a lone
    surrogate, as a hand-edited demo.json can hold) raised UnicodeEncodeError from the hashing
    instead of answering "no client"; `gateway init` ended in a traceback."""
    client, token = await add_client(storage, "review-client", "purchaser", ["k1"])
    assert (await authenticate(storage, token)) == client
    secret = token.split("_", 2)[2]
    for bad in (f"gw_{client.token_id}_\udcff", f"gw_{client.token_id}_{secret}\udcff",
                f"gw_{client.token_id}_{secret}\x00", f"gw_{client.token_id}_{secret}é",
                f"gw_{client.token_id}_{secret[:-1]}", f"gw_{'0' * 12}_{secret}", ""):
        assert await authenticate(storage, bad) is None, ascii(bad)
    stored = await storage.client_by_token_id(client.token_id)
    assert stored is not None and stored[1] == token_hash(token)  # only the hash is kept
    await revoke_client(storage, "review-client")
    assert await authenticate(storage, token) is None
    events = [r.event_type for r in await storage.audit_records()]
    assert events == ["client_added", "client_revoked"]


# --- a database from a newer gateway -----------------------------------------------------------

async def test_a_database_from_a_newer_schema_is_refused_untouched(backend: Backend) -> None:
    async with backend.storage() as s:
        await s.append_audit(AuditEvent("client_added", "t", "success"))
    await backend.raw(f"INSERT INTO schema_migrations (version, name, applied_at) "
                      f"VALUES (9999, 'future', {backend.p(1)})", "2030-01-01T00:00:00.000000Z"
                      if backend.name == "sqlite" else datetime(2030, 1, 1, tzinfo=UTC))
    before = await backend.raw("SELECT seq, hash FROM audit_log ORDER BY seq")
    for read_only in (False, True):
        s = backend.storage(read_only=read_only)
        with pytest.raises(MigrationError) as err:
            await s.open()
        assert err.value.code == "migration_failed" and "[9999]" in err.value.message
    assert await backend.raw("SELECT seq, hash FROM audit_log ORDER BY seq") == before
    versions = [r[0] for r in await backend.raw("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [*(m.version for m in load(backend.name)), 9999]


MIGRATE = """
import asyncio, sys
from gateway.storage import storage_for_url
async def main():
    async with storage_for_url(sys.argv[1]) as s:
        print(await s.schema_versions())
asyncio.run(main())
"""


async def test_three_processes_migrating_one_new_postgres_schema_at_once(pg: Backend) -> None:
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", MIGRATE, pg.cli_url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE) for _ in range(3)]
    outs = [await asyncio.wait_for(p.communicate(), 120) for p in procs]
    versions = [m.version for m in load("postgresql")]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == str(versions)
    rows = await pg.raw("SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == versions  # each applied once
    assert await pg.raw("SELECT seq FROM audit_log") == []
