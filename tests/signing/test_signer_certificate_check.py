"""A key whose certificate relying parties would refuse does not sign (21 CFR 1311.55(c),
1305.22(c)): `gateway sign` refuses with the verifier's code before the HSM signs, and audits the
refusal. Keys of the session's SoftHSM token, certificates of the session home's test PKI."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from pkihelp import signing_pki, trust  # noqa: F401 - fixtures
from test_cli_signing import ORDER, audit_events, gateway

from gateway.signing.errors import SignerCertificateRefused
from gateway.signing.validation import check_signer_certificate

UTC = dt.timezone.utc


@pytest.fixture()
def home(softhsm_settings):
    return softhsm_settings.home


def _key_with(hsm, signing_pki, **issue) -> tuple[str, object]:
    """A new P-256 key in the token with a certificate of the home's PKI stored beside it."""
    label = f"certcheck-{uuid.uuid4().hex[:8]}"
    hsm.generate_keypair(label, "p256")
    cert = signing_pki.issue(hsm.public_key(label), common_name=f"Check {label}", **issue).certificate
    hsm.store_certificate(label, cert)
    return label, cert


def _sign(home, label, tmp_path):
    document = tmp_path / "order.xml"
    document.write_bytes(ORDER)
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    result = gateway(home, "sign", "--key", label, "--format", "xmldsig", str(document),
                     env={"GATEWAY_DATABASE_URL": url})
    return result, audit_events(url)


def test_a_revoked_certificate_does_not_sign(hsm, signing_pki, home, tmp_path):
    label, cert = _key_with(hsm, signing_pki)
    (tmp_path / "before").mkdir()
    result, _ = _sign(home, label, tmp_path / "before")
    assert result.returncode == 0, result.stderr  # signs while the certificate is good
    signing_pki.revoke(cert)
    result, events = _sign(home, label, tmp_path)
    assert result.returncode == 1 and result.stdout == b""
    assert b"error [certificate_revoked]" in result.stderr and b"Traceback" not in result.stderr
    assert [(e.event_type, e.outcome, e.subject, e.details["code"]) for e in events] == [
        ("sign.refused", "refused", label, "certificate_revoked")]


def test_an_expired_or_not_yet_valid_certificate_does_not_sign(hsm, signing_pki, home, tmp_path):
    now = dt.datetime.now(UTC)
    for code, window in (("certificate_expired", (now - dt.timedelta(days=40), now - dt.timedelta(days=1))),
                         ("certificate_not_yet_valid", (now + dt.timedelta(days=1), now + dt.timedelta(days=40)))):
        label, _ = _key_with(hsm, signing_pki, not_before=window[0], not_after=window[1])
        work = tmp_path / code
        work.mkdir()
        result, events = _sign(home, label, work)
        assert result.returncode == 1 and f"error [{code}]".encode() in result.stderr, result.stderr
        assert [(e.event_type, e.details["code"]) for e in events] == [("sign.refused", code)]


def test_the_check_refuses_what_relying_parties_refuse_and_passes_the_rest(hsm, signing_pki, trust):
    label, cert = _key_with(hsm, signing_pki)
    assert check_signer_certificate(trust, cert).valid
    signing_pki.revoke(cert)
    with pytest.raises(SignerCertificateRefused) as refused:
        check_signer_certificate(trust, cert)
    assert refused.value.code == "certificate_revoked"


def test_threads_checking_one_certificate_at_once_all_see_it_valid(hsm, signing_pki):
    """asn1crypto parses lazily and is not thread-safe: threads checking paths through the same
    cached certificate and CRLs at once saw half-parsed fields, and a good certificate came out
    certificate_chain_invalid (a burst of first sign requests got 422s and 500s)."""
    import threading

    from gateway.signing import validation

    _label, cert = _key_with(hsm, signing_pki)
    outcomes: list[object] = []
    for _ in range(40):
        validation._asn1_cache.clear()  # parsed afresh each round, as after a start
        trust = signing_pki.trust()
        barrier = threading.Barrier(8)

        def check(trust=trust, barrier=barrier) -> None:
            barrier.wait()
            try:
                outcomes.append(trust.validate_certificate(cert).code)
            except Exception as exc:  # noqa: BLE001 - counted as an outcome
                outcomes.append(repr(exc))

        threads = [threading.Thread(target=check) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert outcomes == [None] * 320, sorted({str(o) for o in outcomes})
