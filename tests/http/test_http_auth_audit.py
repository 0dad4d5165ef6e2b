"""A refused token leaves its public id in the audit trail, never the presented secret."""

from __future__ import annotations

import json


async def test_unknown_token_is_audited_by_its_public_id_only(gw) -> None:
    secret = "S3cretPartThatMustNotBeStored"
    for token, expected_id in ((f"gw_0123456789ab_{secret}", "0123456789ab"),
                               (f"{secret}.{secret}", None)):
        resp = await gw.http.post("/v1/verify", data=b"<a/>",
                                  headers={"Authorization": f"Bearer {token}", "Content-Type": "application/xml"})
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_token"
        request_id = resp.headers["X-Request-Id"]
        events = [r for r in await gw.storage.audit_records(0, 10_000) if r.request_id == request_id]
        assert [(e.event_type, e.actor, e.outcome) for e in events] == [("auth.refused", "anonymous", "refused")]
        assert events[0].details.get("token_id") == expected_id
        assert secret not in json.dumps(events[0].details)
