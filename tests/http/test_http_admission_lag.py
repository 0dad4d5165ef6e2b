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
