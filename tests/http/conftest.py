"""Fixtures for the HTTP service: keys with certificates in the session token, one API client per
role, and a factory that starts the real app on loopback (aiohttp's TestServer) against a real
SQLite database, or a real `gateway serve` process on a copy of the session home."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.clients import add_client
from gateway.config import Settings
from gateway.http.app import create_app
from gateway.signing.hsm import Hsm
from gateway.signing.pki import ensure_test_pki, issue_certificate
from gateway.signing.softhsm import write_softhsm_conf
from gateway.storage import storage_for_url

HTTP_RSA = "http-rsa"
HTTP_EC = "http-ec"
HTTP_OTHER = "http-other"
ROLES = ("purchaser", "supplier", "prescriber_app", "pharmacy", "compliance", "admin")

# Which keys each test client may use: every role gets a client, purchaser and supplier own keys.
CLIENT_KEYS: dict[str, frozenset[str]] = {
    "purchaser": frozenset({HTTP_RSA, HTTP_EC}),
    "supplier": frozenset({HTTP_OTHER}),
    "prescriber_app": frozenset(),
    "pharmacy": frozenset(),
    "compliance": frozenset(),
    "admin": frozenset(),
}

PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def http_keys(softhsm_settings: Settings, hsm: Hsm) -> dict[str, str]:
    """Three keys in the session token, each with a certificate from the test PKI."""
    ensure_test_pki(softhsm_settings.pki_dir)
    present = {k.label for k in hsm.list_keys()}
    for label, key_type in ((HTTP_RSA, "rsa2048"), (HTTP_EC, "p256"), (HTTP_OTHER, "rsa2048")):
        if label not in present:
            hsm.generate_keypair(label, key_type)
        if hsm.certificate(label) is None:
            issued = issue_certificate(softhsm_settings.pki_dir, hsm.public_key(label), "epcs-pharmacy",
                                       common_name=f"HTTP test {label}", label=label)
            hsm.store_certificate(label, issued.certificate)
    return {"rsa": HTTP_RSA, "ec": HTTP_EC, "other": HTTP_OTHER}


@dataclass
class Gateway:
    """A running app on loopback and what tests need to drive it."""

    http: TestClient
    app: Any
    storage: Any
    settings: Settings
    tokens: dict[str, str]  # role -> token
    names: dict[str, str]  # role -> client name
    extra_tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


async def create_clients(storage: Any, suffix: str = "") -> tuple[dict[str, str], dict[str, str]]:
    tokens, names = {}, {}
    for role in ROLES:
        name = f"{role}{suffix}"
        _client, token = await add_client(storage, name, role, sorted(CLIENT_KEYS[role]))
        tokens[role], names[role] = token, name
    return tokens, names


@pytest.fixture
async def make_gateway(softhsm_settings: Settings, hsm: Hsm, http_keys: dict[str, str],
                       tmp_path: Path) -> AsyncIterator[Any]:
    """`await make_gateway(queue_size=..., workers=..., auth_cache_ttl_s=..., extra={...})` -> Gateway.
    `extra` holds gateway.toml tables without a settings class of their own ([audit]...)."""
    started: list[tuple[TestClient, Any]] = []

    async def factory(*, workers: int | None = None, auth_cache_ttl_s: float = 1.0,
                      routes: list | None = None, database_url: str | None = None,
                      extra: dict[str, Any] | None = None, **server: Any) -> Gateway:
        url = database_url or f"sqlite:///{tmp_path / f'gw{len(started)}.sqlite3'}"
        settings = replace(softhsm_settings, database_url=url,
                           server=replace(softhsm_settings.server, **server),
                           extra=extra if extra is not None else softhsm_settings.extra)
        storage = storage_for_url(url)
        await storage.open()
        tokens, names = await create_clients(storage)
        app = create_app(settings, hsm=hsm, storage=storage, workers=workers,
                         auth_cache_ttl_s=auth_cache_ttl_s, routes=routes)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        started.append((client, storage))
        return Gateway(client, app, storage, settings, tokens, names)

    yield factory
    for client, storage in reversed(started):
        await client.close()
        await storage.close()


@pytest.fixture
async def gw(make_gateway: Any) -> Gateway:
    return await make_gateway()


# --- real `gateway serve` processes ------------------------------------------------------------

def copy_home(source: Settings, target: Path, *, database_url: str = "", server: dict[str, Any] | None = None) -> Path:
    """A new home with a copy of the session token and PKI (SoftHSM's file store is portable)."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source.token_dir, target / "tokens", dirs_exist_ok=True)
    shutil.copytree(source.pki_dir, target / "pki", dirs_exist_ok=True)
    server = {"host": "127.0.0.1", "port": 0, **(server or {})}
    lines = ["[hsm]", f'module = "{source.hsm.module}"', f'token_label = "{source.hsm.token_label}"',
             f'user_pin = "{source.hsm.user_pin}"', "", "[server]"]
    for key, value in server.items():
        lines.append(f"{key} = {json.dumps(value)}")
    lines += ["", "[database]", f'url = "{database_url}"', ""]
    (target / "gateway.toml").write_text("\n".join(lines))
    from gateway.config import load_settings

    write_softhsm_conf(load_settings(target))
    return target


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(home: Path, name: str = "server", env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> ServerProcess:
    ready = home / f"{name}.port"
    ready.unlink(missing_ok=True)
    log_path = home / f"{name}.log"
    cmd = [sys.executable, "-m", "gateway", "--home", str(home), "serve", "--port", "0",
           "--ready-file", str(ready)]
    full_env = {**os.environ, **(env or {})}
    if "GATEWAY_DATABASE_URL" not in (env or {}):
        full_env.pop("GATEWAY_DATABASE_URL", None)  # the home's gateway.toml decides
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env=full_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists() and ready.read_text().strip():
            return ServerProcess(proc, int(ready.read_text()), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"gateway serve exited {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"gateway serve did not start:\n{log_path.read_text()}")


def stop_server(server: ServerProcess, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(sig)
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        raise


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Started servers are collected here and killed at the end if still running."""
    running: list[ServerProcess] = []
    yield running
    for server in running:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


async def wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready")
            await asyncio.sleep(0.1)
