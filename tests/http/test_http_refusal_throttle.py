"""A flood of bad tokens is audited in bounded space: the first refusals one by one, the rest as
one summary event that still says how many, which codes, and when."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway.http.app import create_app
from gateway.http.auth import RefusalThrottle
from gateway.storage import storage_for_url


def test_throttle_counts_past_the_burst_and_summarises_the_window() -> None:
    throttle = RefusalThrottle(burst=3, window_s=10.0)
    decisions = [throttle.refusal("10.0.0.1", "invalid_token", now=100.0 + i)[0] for i in range(8)]
    assert decisions == [True] * 3 + [False] * 5
    assert throttle.refusal("10.0.0.2", "missing_token", now=105.0)[0] is True  # another peer
    individually, closed = throttle.refusal("10.0.0.1", "invalid_token", now=111.0)  # window over
    assert individually is True
    [summary] = closed
    assert summary.event_type == "auth.refused.suppressed" and summary.subject == "10.0.0.1"
    assert summary.details["count"] == 5 and summary.details["codes"] == {"invalid_token": 5}
    assert (summary.details["first"], summary.details["last"]) == (103.0, 107.0)
    assert throttle.flush() == []  # nothing suppressed in the open windows


async def test_flood_of_bad_tokens_is_bounded_and_summarised(softhsm_settings, hsm, http_keys,
                                                             tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flood.sqlite3'}"
    settings = replace(softhsm_settings, database_url=url,
                       extra={"audit": {"refusal_burst": 5, "refusal_window_s": 3600}})
    storage = storage_for_url(url)
    await storage.open()
    try:
        client = TestClient(TestServer(create_app(settings, hsm=hsm, storage=storage), host="127.0.0.1"))
        await client.start_server()
        for i in range(40):
            resp = await client.post("/v1/verify", data=b"<a/>",
                                     headers={"Authorization": f"Bearer gw_0123456789ab_bad{i}",
                                              "Content-Type": "application/xml"})
            assert resp.status == 401
        during = [r for r in await storage.audit_records(0, 10_000) if r.actor == "anonymous"]
        assert [r.event_type for r in during] == ["auth.refused"] * 5
        await client.close()  # shutdown writes the summary of the open window
        after = [r for r in await storage.audit_records(0, 10_000) if r.actor == "anonymous"]
        summaries = [r for r in after if r.event_type == "auth.refused.suppressed"]
        assert len(summaries) == 1 and summaries[0].details["count"] == 35
        assert summaries[0].details["codes"] == {"invalid_token": 35}
    finally:
        await storage.close()
