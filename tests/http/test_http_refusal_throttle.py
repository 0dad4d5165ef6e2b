"""A flood of bad tokens is audited in bounded space: the first refusals one by one, the rest as
one summary event that still says how many, which codes, and when."""

from __future__ import annotations

from gateway.http.auth import RefusalThrottle


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


async def test_flood_of_bad_tokens_is_bounded_and_summarised(make_gateway) -> None:
    gw = await make_gateway(extra={"audit": {"refusal_burst": 5, "refusal_window_s": 3600}})
    for i in range(40):
        resp = await gw.http.post("/v1/verify", data=b"<a/>",
                                  headers={"Authorization": f"Bearer gw_0123456789ab_bad{i}",
                                           "Content-Type": "application/xml"})
        assert resp.status == 401
    during = [r for r in await gw.storage.audit_records(0, 10_000) if r.actor == "anonymous"]
    assert [r.event_type for r in during] == ["auth.refused"] * 5
    await gw.http.close()  # shutdown writes the summary of the open window
    after = [r for r in await gw.storage.audit_records(0, 10_000) if r.actor == "anonymous"]
    summaries = [r for r in after if r.event_type == "auth.refused.suppressed"]
    assert len(summaries) == 1 and summaries[0].details["count"] == 35
    assert summaries[0].details["codes"] == {"invalid_token": 35}
