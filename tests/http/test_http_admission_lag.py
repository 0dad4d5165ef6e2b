"""Admission counts event-loop lag against the deadline: under overload the loop, not the queue,
makes admitted requests late."""

from __future__ import annotations

import pytest

from gateway.http.admission import Admission, Overloaded


def test_loop_lag_counts_against_the_deadline() -> None:
    admission = Admission(workers=2, queue_size=64, deadline_s=0.25)
    admission.service_s = 0.001
    for _ in range(4):  # two running, two waiting: about 1.5 ms of queue
        admission.admit()
    admission.check()  # a quiet loop: admitted
    for _ in range(10):
        admission.record_loop_lag(0.05)  # 50 ms of lag at each of several hops
    assert admission.loop_lag_s == pytest.approx(0.05, rel=0.01)
    with pytest.raises(Overloaded) as refused:
        admission.check()
    assert refused.value.code == "queue_deadline"
    for _ in range(10):
        admission.record_loop_lag(0.0)
    admission.check()  # the loop recovered: admitted again


def test_free_workers_admit_whatever_the_lag() -> None:
    admission = Admission(workers=2, queue_size=4, deadline_s=0.25)
    admission.record_loop_lag(1.0)
    admission.admit()  # a worker is free: the request is served at once
    assert admission.in_flight == 1


def test_requests_count_until_answered_not_only_while_at_the_pool() -> None:
    """A request whose job is done but whose commit or response is still pending keeps its place:
    otherwise a slow commit lets admitted requests pile up behind it without bound."""
    admission = Admission(workers=2, queue_size=2, deadline_s=0.25)
    with admission.request(), admission.request(), admission.request(), admission.request():
        assert admission.in_flight == 0  # no job at the pool: all four wait past it
        with pytest.raises(Overloaded) as refused, admission.request():
            pass
        assert refused.value.code == "queue_full"
        assert admission.open_requests == 4
    assert admission.open_requests == 0
    with admission.request():  # answered: there is room again
        assert admission.open_requests == 1
