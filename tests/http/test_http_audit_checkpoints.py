"""The running gateway signs audit checkpoints with the HSM audit key, and a last one on shutdown."""

from __future__ import annotations

import asyncio

from gateway.audit import verify_trail
from gateway.bootstrap import ensure_audit_key
from tests.http.conftest import HTTP_RSA


async def test_checkpoints_are_signed_while_serving_and_on_shutdown(make_gateway, hsm) -> None:
    ensure_audit_key(hsm)
    gw = await make_gateway(extra={"audit": {"checkpoint_every_records": 1, "checkpoint_every_seconds": 0.2}})
    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}&format=xmldsig", data=b"<Doc>checkpoint me</Doc>",
                              headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert resp.status == 200
    for _ in range(50):
        if await gw.storage.checkpoints():
            break
        await asyncio.sleep(0.1)
    during = await gw.storage.checkpoints()
    assert during, "no checkpoint while serving"
    await gw.http.close()  # app cleanup: the checkpointer makes a final checkpoint
    after = await gw.storage.checkpoints()
    head_seq, _ = await gw.storage.audit_head()
    assert after[-1].seq >= head_seq - 1  # only the last checkpoint's own event may follow it
    result = await verify_trail(gw.storage, hsm.public_key("audit"))
    assert result.ok and result.checkpoints_checked == len(after) and result.checkpoints_unverified == 0
