"""POST /v1/sign with a key whose certificate relying parties would refuse (revoked, expired):
422 with the verifier's code, audited, nothing signed or archived (21 CFR 1311.55(c),
1305.22(c)). The real app on loopback, the session's SoftHSM token and test PKI with its CRLs."""

from __future__ import annotations

import datetime as dt
import uuid

from gateway.clients import add_client
from gateway.signing import pki
from gateway.signing.hsm import Hsm

UTC = dt.timezone.utc
ORDER = b'<Order xmlns="urn:csos-gateway:order:1"><OrderNumber>26X000001</OrderNumber></Order>'


async def _client_with_key(gw, hsm, softhsm_settings, **issue) -> tuple[dict, str, object]:
    label = f"http-check-{uuid.uuid4().hex[:8]}"
    hsm.generate_keypair(label, "p256")
    cert = pki.issue_certificate(softhsm_settings.pki_dir, hsm.public_key(label), "epcs-pharmacy",
                                 common_name=f"HTTP check {label}", label=label, **issue).certificate
    hsm.store_certificate(label, cert)
    _client, token = await add_client(gw.storage, f"signer-{label}", "pharmacy", [label])
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/xml"}, label, cert


async def _sign(gw, headers, label, body: bytes = ORDER):
    return await gw.http.post(f"/v1/sign?key={label}&format=xmldsig", data=body, headers=headers)


async def _events(gw, label):
    records = await gw.storage.audit_records(after_seq=0, limit=10_000)
    return [(r.event_type, r.outcome, r.details.get("code")) for r in records
            if r.subject == label or r.details.get("key_label") == label]


async def test_a_key_with_a_revoked_certificate_does_not_sign(make_gateway, hsm, http_keys,
                                                              softhsm_settings) -> None:
    gw = await make_gateway()
    headers, label, cert = await _client_with_key(gw, hsm, softhsm_settings)
    pki.revoke(softhsm_settings.pki_dir, cert.serial_number, "key_compromise")
    response = await _sign(gw, headers, label)
    body = await response.json()
    assert response.status == 422 and body["error"]["code"] == "certificate_revoked", body
    assert "revoked" in body["error"]["message"]
    assert await _events(gw, label) == [("sign.refused", "refused", "certificate_revoked")]


async def test_a_key_with_an_expired_certificate_does_not_sign_and_a_good_one_does(
        make_gateway, hsm, http_keys, softhsm_settings) -> None:
    gw = await make_gateway()
    now = dt.datetime.now(UTC)
    headers, label, _ = await _client_with_key(gw, hsm, softhsm_settings,
                                               not_before=now - dt.timedelta(days=30),
                                               not_after=now - dt.timedelta(days=1))
    response = await _sign(gw, headers, label)
    assert response.status == 422 and (await response.json())["error"]["code"] == "certificate_expired"
    assert await _events(gw, label) == [("sign.refused", "refused", "certificate_expired")]

    headers, label, _ = await _client_with_key(gw, hsm, softhsm_settings)
    response = await _sign(gw, headers, label)
    assert response.status == 200, await response.text()
    assert (await _events(gw, label))[-1] == ("document.signed", "success", None)


async def test_a_key_generated_again_elsewhere_signs_after_one_key_not_found(make_gateway, hsm, http_keys,
                                                                            softhsm_settings) -> None:
    """Another process deletes the key and generates it again with a new certificate. The signer
    kept for a minute is bound to the old key: that request is 404 key_not_found, and the cached
    signer is dropped, so the next request signs with the new key (it waited out the minute)."""
    from gateway.signing.validation import load_trust
    from gateway.signing.verify import verify_xml
    from tests.signing.test_hsm_review import _in_other_process  # deletes and generates again

    gw = await make_gateway()
    headers, label, _ = await _client_with_key(gw, hsm, softhsm_settings)
    assert (await _sign(gw, headers, label)).status == 200
    _in_other_process(softhsm_settings, label, "p256")
    other = Hsm.open(softhsm_settings, sessions=1)  # enrolment elsewhere: its own view of the token
    try:
        cert = pki.issue_certificate(softhsm_settings.pki_dir, other.public_key(label), "epcs-pharmacy",
                                     common_name=f"HTTP check {label} again", label=label).certificate
        other.store_certificate(label, cert)
    finally:
        other.close()
    response = await _sign(gw, headers, label)
    assert response.status == 404 and (await response.json())["error"]["code"] == "key_not_found"
    response = await _sign(gw, headers, label, ORDER.replace(b"000001", b"000002"))
    assert response.status == 200, await response.text()
    signed = await response.read()
    report, _ = verify_xml(signed, load_trust(softhsm_settings.trust_bundle_path, softhsm_settings.pki_dir / "crl"))
    assert report.valid and report.signer_certificate == cert


async def test_a_pin_the_token_refused_is_hsm_login_failed_not_retry_later(make_gateway, hsm, http_keys) -> None:
    """Once the token refused the PIN on a reconnect, the HSM layer never offers it again
    (tests/signing/test_hsm_review.py changes the PIN for real); the API said hsm_unavailable,
    "retry later", where an operator must act. The refusal state is set on the real pool here."""
    from gateway.http import keys as app_keys

    gw = await make_gateway()
    pool_hsm = gw.app[app_keys.HSM]
    pool_hsm._login_refused = "login to token refused: PinIncorrect"
    try:
        ready = await gw.http.get("/readyz")
        signed = await gw.http.post(f"/v1/sign?key={http_keys['rsa']}&format=xmldsig", data=ORDER,
                                    headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
        for response in (ready, signed):
            assert response.status == 503, await response.text()
            assert (await response.json())["error"]["code"] == "hsm_login_failed"
            assert "Retry-After" in response.headers
    finally:
        pool_hsm._login_refused = None
    assert (await gw.http.get("/readyz")).status == 200
