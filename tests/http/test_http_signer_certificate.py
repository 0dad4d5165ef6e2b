"""POST /v1/sign with a key whose certificate relying parties would refuse (revoked, expired):
422 with the verifier's code, audited, nothing signed or archived (21 CFR 1311.55(c),
1305.22(c)). The real app on loopback, the session's SoftHSM token and test PKI with its CRLs."""

from __future__ import annotations

import datetime as dt
import uuid

from gateway.clients import add_client
from gateway.signing import pki

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


async def _sign(gw, headers, label):
    return await gw.http.post(f"/v1/sign?key={label}&format=xmldsig", data=ORDER, headers=headers)


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
