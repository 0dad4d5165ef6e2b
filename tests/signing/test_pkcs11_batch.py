"""The GIL-free batch path (`pkcs11_batch`) against the real SoftHSM token."""

from __future__ import annotations

import ctypes

import pytest
from pkcs11 import Mechanism

from gateway.config import Settings
from gateway.signing.errors import HsmError, KeyNotFound, TokenUnavailable
from gateway.signing.hsm import Hsm, _batch_signer
from gateway.signing import pkcs11_batch
from gateway.signing.pkcs11_batch import BatchSigner


def test_the_function_list_gives_the_modules_own_sign_functions(hsm: Hsm) -> None:
    """C_SignInit and C_Sign are found at their places in CK_FUNCTION_LIST (SoftHSM also exports
    them by name, which lets this test check the offsets)."""
    batch = BatchSigner(hsm.module)
    dll = ctypes.CDLL(hsm.module)
    assert batch.sign_init_address == ctypes.cast(dll.C_SignInit, ctypes.c_void_p).value
    assert batch.sign_address == ctypes.cast(dll.C_Sign, ctypes.c_void_p).value


def test_warm_up_loads_the_one_compiled_loop_that_signing_uses(hsm: Hsm, rsa_key: str) -> None:
    batch = BatchSigner(hsm.module)
    batch.warm_up()
    assert len(pkcs11_batch._sign_from.signatures) == 1
    hsm.signer(rsa_key).verify(hsm.sign_batch([(rsa_key, b"x")])[0], b"x")
    assert len(pkcs11_batch._sign_from.signatures) == 1  # no second compilation on first use


def test_a_mixed_batch_gives_each_job_its_own_signature_or_error(hsm: Hsm, rsa_key: str, ec_key: str) -> None:
    jobs = [(rsa_key, b"first"), (ec_key, b"second"), ("no-such-key", b"third"),
            (ec_key, b""), (rsa_key, b"x" * 100_000)]
    results = hsm.sign_batch(jobs)
    assert len(results) == len(jobs)
    assert isinstance(results[2], KeyNotFound)
    for (label, data), signature in zip(jobs, results):
        if label == "no-such-key":
            continue
        assert isinstance(signature, bytes)
        hsm.signer(label).verify(signature, data)  # raises InvalidSignature when wrong
    # ECDSA signatures are DER SEQUENCEs of r and s, as the single-call path returns them.
    assert results[1][0] == 0x30 and len(results[0]) == 256
    # The same data signed through the single-call path verifies with the same key.
    hsm.signer(ec_key).verify(hsm.sign(ec_key, b"second"), b"second")


def test_refusals_come_back_per_signature_with_their_return_code(hsm: Hsm, rsa_key: str) -> None:
    """A mechanism the key cannot sign with is refused (CKR_MECHANISM_INVALID) and the next
    signature on the same session still works: no operation is left active."""
    batch = _batch_signer(hsm.module)
    with hsm._session() as (_conn, pooled):
        key, _key_type = hsm._key_on(pooled, rsa_key)
        results = batch.sign(pooled.session.handle, [
            (key.handle, Mechanism.AES_CBC, b"\0" * 32),
            (key.handle, Mechanism.SHA256_RSA_PKCS, b"after the refusal"),
            (0xFFFF_FFF0, Mechanism.SHA256_RSA_PKCS, b"no such object"),
        ])
    assert results[0] == 0x70
    assert isinstance(results[1], bytes)
    hsm.signer(rsa_key).verify(results[1], b"after the refusal")
    assert results[2] in (0x60, 0x82)  # CKR_KEY_HANDLE_INVALID or CKR_OBJECT_HANDLE_INVALID
    assert batch.sign(0xFFFF_FFF0, [(1, Mechanism.SHA256_RSA_PKCS, b"x")]) == [0xB3]  # no such session
    assert batch.sign(1, []) == []


def test_a_dead_handle_stops_the_batch(hsm: Hsm, rsa_key: str) -> None:
    """A dead handle ends the batch: what follows is not attempted (on a network HSM each call
    could wait out a timeout) and gets the same return code."""
    batch = _batch_signer(hsm.module)
    with hsm._session() as (_conn, pooled):
        key, _key_type = hsm._key_on(pooled, rsa_key)
        results = batch.sign(pooled.session.handle, [
            (key.handle, Mechanism.SHA256_RSA_PKCS, b"before"),
            (0xFFFF_FFF0, Mechanism.SHA256_RSA_PKCS, b"no such object"),
            (key.handle, Mechanism.SHA256_RSA_PKCS, b"not attempted"),
        ])
        hsm.signer(rsa_key).verify(results[0], b"before")
        assert results[1] in (0x60, 0x82) and results[2] == results[1]
        # The session itself is fine: the next batch on it signs.
        assert isinstance(batch.sign(pooled.session.handle, [(key.handle, Mechanism.SHA256_RSA_PKCS, b"x")])[0], bytes)


def test_a_signature_longer_than_the_room_is_finished_and_the_batch_goes_on(
        hsm: Hsm, rsa_key: str, ec_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CKR_BUFFER_TOO_SMALL leaves the operation active: the batch finishes that signature with
    the length the module asked for, and the session stays usable (no CKR_OPERATION_ACTIVE)."""
    monkeypatch.setattr(pkcs11_batch, "SIGNATURE_ROOM", 100)  # RSA-2048 needs 256, P-256 64
    jobs = [(rsa_key, b"one"), (ec_key, b"two"), (rsa_key, b"three"), (rsa_key, b"four")]
    results = hsm.sign_batch(jobs)
    for (label, data), signature in zip(jobs, results):
        assert isinstance(signature, bytes), signature
        hsm.signer(label).verify(signature, data)
    assert all(isinstance(r, bytes) for r in hsm.sign_batch(jobs))
    hsm.signer(rsa_key).verify(hsm.sign(rsa_key, b"single"), b"single")


def test_a_dead_session_is_token_unavailable_and_the_pool_reconnects(softhsm_settings: Settings,
                                                                   rsa_key: str) -> None:
    hsm = Hsm.open(softhsm_settings, sessions=1)
    try:
        hsm.reconnect_interval = 0.0
        assert isinstance(hsm.sign_batch([(rsa_key, b"before")])[0], bytes)
        assert hsm._conn is not None
        hsm._conn.sessions[0].session.close()  # its handle is now invalid under the pool
        results = hsm.sign_batch([(rsa_key, b"during"), (rsa_key, b"during, second")])
        assert all(isinstance(r, TokenUnavailable) for r in results), results
        after = hsm.sign_batch([(rsa_key, b"after")])[0]
        assert isinstance(after, bytes)
        hsm.signer(rsa_key).verify(after, b"after")
    finally:
        hsm.close()


def test_a_refused_signature_is_an_hsm_error_for_that_job_only(hsm: Hsm, rsa_key: str, ec_key: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # RSA keys given CKM_AES_CBC: the token refuses those jobs; the P-256 jobs between them are
    # signed, and the sessions are not marked dead.
    mechanism_for = Hsm._mechanism_for
    monkeypatch.setattr(Hsm, "_mechanism_for", staticmethod(
        lambda conn, key_type, data: (Mechanism.AES_CBC, data) if key_type == "rsa2048"
        else mechanism_for(conn, key_type, data)))
    results = hsm.sign_batch([(rsa_key, b"x"), (ec_key, b"y"), (rsa_key, b"z"), (ec_key, b"w")])
    for refused in (results[0], results[2]):
        assert isinstance(refused, HsmError) and not isinstance(refused, TokenUnavailable)
        assert "MechanismInvalid" in str(refused)
    hsm.signer(ec_key).verify(results[1], b"y")
    hsm.signer(ec_key).verify(results[3], b"w")
    assert hsm._conn is not None and hsm._broken_generation != hsm._conn.generation


# python-pkcs11's search iterator complains from __del__ when its module is finalised under it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_key_lookup_on_a_finalised_module_is_token_unavailable_and_the_pool_recovers(
        softhsm_settings: Settings, rsa_key: str, ec_key: str) -> None:
    """The module finalised under the pool (as a crashed or reset HSM client library would): a job
    whose key is not cached yet fails in the lookup, a cached one in the compiled loop; both are
    TokenUnavailable, and the next call reconnects and signs."""
    hsm = Hsm.open(softhsm_settings, sessions=1)
    try:
        hsm.reconnect_interval = 0.0
        assert isinstance(hsm.sign_batch([(rsa_key, b"cached")])[0], bytes)
        dll = ctypes.CDLL(hsm.module)
        dll.C_Finalize.argtypes = [ctypes.c_void_p]
        assert dll.C_Finalize(None) == 0
        results = hsm.sign_batch([(rsa_key, b"cached"), (ec_key, b"not cached"), (rsa_key, b"cached")])
        assert all(isinstance(r, TokenUnavailable) for r in results), results
        after = hsm.sign_batch([(ec_key, b"after"), (rsa_key, b"after")])
        hsm.signer(ec_key).verify(after[0], b"after")
        hsm.signer(rsa_key).verify(after[1], b"after")
    finally:
        hsm.close()


def test_the_codes_that_stop_a_batch_are_the_ones_that_mean_a_dead_token() -> None:
    from gateway.signing.hsm import _error_of, _is_device_failure

    for code in pkcs11_batch.SESSION_FAILURES:
        assert _is_device_failure(_error_of(code)), hex(code)
    for code in (0x02, 0x20, 0x21, 0x50, 0x62, 0x63, 0x68, 0x70, 0x71):  # one request's refusals
        assert code not in pkcs11_batch.SESSION_FAILURES
        assert not _is_device_failure(_error_of(code)), hex(code)
