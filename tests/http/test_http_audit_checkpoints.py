"""The running gateway signs audit checkpoints with the HSM audit key, and a last one on shutdown."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway.audit import verify_trail
from gateway.bootstrap import ensure_audit_key
from gateway.http.app import create_app
from gateway.storage import storage_for_url
from tests.http.conftest import HTTP_RSA, create_clients


async def test_checkpoints_are_signed_while_serving_and_on_shutdown(softhsm_settings, hsm, http_keys,
                                                                    tmp_path: Path) -> None:
    ensure_audit_key(hsm)
    url = f"sqlite:///{tmp_path / 'cp.sqlite3'}"
    settings = replace(softhsm_settings, database_url=url,
                       extra={"audit": {"checkpoint_every_records": 1, "checkpoint_every_seconds": 0.2}})
    storage = storage_for_url(url)
    await storage.open()
    try:
        tokens, _ = await create_clients(storage)
        client = TestClient(TestServer(create_app(settings, hsm=hsm, storage=storage), host="127.0.0.1"))
        await client.start_server()
        resp = await client.post(f"/v1/sign?key={HTTP_RSA}&format=xmldsig", data=b"<Doc>checkpoint me</Doc>",
                                 headers={"Authorization": f"Bearer {tokens['purchaser']}",
                                          "Content-Type": "application/xml"})
        assert resp.status == 200
        for _ in range(50):
            if await storage.checkpoints():
                break
            await asyncio.sleep(0.1)
        during = await storage.checkpoints()
        assert during, "no checkpoint while serving"
        await client.close()  # app cleanup: the checkpointer makes a final checkpoint
        after = await storage.checkpoints()
        head_seq, _ = await storage.audit_head()
        assert after[-1].seq >= head_seq - 1  # only the last checkpoint's own event may follow it
        result = await verify_trail(storage, hsm.public_key("audit"))
        assert result.ok and result.checkpoints_checked == len(after) and result.checkpoints_unverified == 0
    finally:
        await storage.close()
