"""The HSM benchmark's measuring helpers, on the real token: short runs, no timing asserted."""

from __future__ import annotations

import pytest

from benchmarks import hsm_sign
from gateway.signing.hsm import Hsm


def test_raw_rates_sign_on_the_token(hsm: Hsm, ec_key: str) -> None:
    assert hsm_sign.raw_rate(hsm, ec_key, "p256", 2, 0.2) > 0
    assert hsm_sign.raw_c_rate(hsm, ec_key, "p256", 2, 0.2) > 0


def test_a_thread_that_cannot_start_fails_the_run_instead_of_hanging(hsm: Hsm) -> None:
    with pytest.raises(RuntimeError, match="a signing thread failed") as info:
        hsm_sign.raw_rate(hsm, "no-such-key", "p256", 2, 0.2)
    assert "NoSuchKey" in repr(info.value.__cause__)
