"""Interoperability: what the gateway signs verifies with xmlsec1, signxml and openssl; what they
reject, the gateway rejects too. Every signature is made by the SoftHSM keys.

The external verifiers trust the test root only; intermediates travel in the signature.
- xmlsec1: `xmlsec1 --verify --trusted-pem ca-bundle.pem --enabled-reference-uris empty FILE`
  (xmlsec1 1.2 takes the first certificate of a PEM file, the root; it has no CRL option, it
  reads CRLs from X509Data/X509CRL in the document);
- signxml: `XMLVerifier().verify(data, ca_pem_file=ca-bundle.pem)` (chain and validity, no CRLs);
- openssl: `openssl cms -verify -inform DER -binary -content F -CAfile ca-bundle.pem -purpose any`,
  plus `-crl_check -CRLfile ...` for revocation.
"""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree
from pkihelp import (  # noqa: F401 - fixtures
    ec_signer,
    openssl_cms_verify,
    other_ec_label,
    pem,
    rsa_signer,
    signer,
    signing_pki,
    trust,
    untrusted_pki,
    xmlsec1_verify,
)
from signxml import XMLSigner, XMLVerifier, methods
from signxml.exceptions import InvalidCertificate, InvalidDigest, InvalidInput, InvalidSignature

from gateway.signing import pki
from gateway.signing.cms import sign_detached
from gateway.signing.verify import verify_cms, verify_xml
from gateway.signing.xmldsig import DS_NS, sign_enveloped

NS = {"ds": DS_NS}
UTC = dt.timezone.utc
ORDER = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
         b'<CSOSOrder xmlns="urn:csos-gateway:order:1">\n'
         b'  <OrderNumber>26X000777</OrderNumber>\n'
         b'  <Items><Item line="1"><NDC>12345-6789-01</NDC><Packages>4</Packages></Item></Items>\n'
         b'</CSOSOrder>\n')
CONTENT = b"detached content\r\n\x00\x01 with binary bytes"
SIGNXML_REJECTS = (InvalidCertificate, InvalidDigest, InvalidInput, InvalidSignature)


def signxml_verify(data: bytes, signing_pki) -> bytes:
    """signxml with the same trust: returns what signxml says was signed (raises when invalid)."""
    result = XMLVerifier().verify(data, ca_pem_file=str(signing_pki.bundle))
    return etree.tostring(result.signed_xml, method="c14n", exclusive=True)


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- what we sign verifies elsewhere --------------------------------------------------------


def test_xmldsig_verifies_with_xmlsec1(signer, signing_pki, tmp_path):
    signed = sign_enveloped(ORDER, signer)
    result = xmlsec1_verify(write(tmp_path, "order.xml", signed), signing_pki)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout + result.stderr


def test_xmldsig_verifies_with_signxml(signer, signing_pki, trust):
    signed = sign_enveloped(ORDER, signer)
    theirs = signxml_verify(signed, signing_pki)
    report, ours = verify_xml(signed, trust)
    assert report.valid
    # Both verifiers hand back the same signed content.
    assert etree.tostring(ours, method="c14n", exclusive=True) == theirs


def test_cms_verifies_with_openssl(signer, signing_pki, tmp_path):
    der = sign_detached(CONTENT, signer)
    sig, content = write(tmp_path, "sig.p7s", der), write(tmp_path, "content.bin", CONTENT)
    result = openssl_cms_verify(sig, content, signing_pki, crl=True)
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr


# --- what others sign (with the same HSM keys) verifies with us ----------------------------


def test_signxml_signature_made_with_the_hsm_key_verifies(signer, trust, signing_pki):
    """signxml signs through KeySigner.private_key(): the HSM does the private-key operation."""
    algorithm = {"rsa-sha256": "rsa-sha256", "ecdsa-sha256": "ecdsa-sha256"}[signer.algorithm]
    xml_signer = XMLSigner(method=methods.enveloped, signature_algorithm=algorithm,
                           digest_algorithm="sha256",
                           c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#")
    root = etree.fromstring(ORDER)
    certs = [pem(signer.certificate).decode(), pem(signer.chain[0]).decode()]
    signed = etree.tostring(xml_signer.sign(root, key=signer.private_key(), cert=certs))
    report, tree = verify_xml(signed, trust)
    assert report.valid, report.to_dict()
    assert report.signature_algorithm == signer.algorithm
    assert tree.getroot().findtext(".//{urn:csos-gateway:order:1}OrderNumber") == "26X000777"


def test_openssl_style_cms_from_cryptography_builder_verifies(signer, trust):
    """cryptography's PKCS7SignatureBuilder over the HSM-backed key: another encoder of CMS."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import pkcs7

    der = (
        pkcs7.PKCS7SignatureBuilder().set_data(CONTENT)
        .add_signer(signer.certificate, signer.private_key(), hashes.SHA256())
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature,
                                           pkcs7.PKCS7Options.Binary])
    )
    report = verify_cms(der, CONTENT, trust)
    assert report.valid, report.to_dict()
    assert verify_cms(der, CONTENT + b"x", trust).code == "signature_invalid"


# --- what they reject, we reject ------------------------------------------------------------


def _both_reject_xml(data: bytes, signing_pki, trust, tmp_path, expected_code: str,
                     signxml_checks: bool = True, xmlsec_says: str = "",
                     xmlsec_args: tuple[str, ...] = ()) -> None:
    report, tree = verify_xml(data, trust)
    assert report.code == expected_code, report.to_dict()
    assert tree is None
    result = xmlsec1_verify(write(tmp_path, "doc.xml", data), signing_pki, *xmlsec_args)
    assert result.returncode != 0, result.stdout
    assert xmlsec_says in result.stderr, result.stderr
    if signxml_checks:
        with pytest.raises(SIGNXML_REJECTS):
            signxml_verify(data, signing_pki)


def test_tampered_content_rejected_everywhere(signer, signing_pki, trust, tmp_path):
    signed = sign_enveloped(ORDER, signer)
    tampered = signed.replace(b"<Packages>4<", b"<Packages>400<")
    _both_reject_xml(tampered, signing_pki, trust, tmp_path, "signature_invalid",
                     xmlsec_says="data and digest do not match")
    der = sign_detached(CONTENT, signer)
    result = openssl_cms_verify(write(tmp_path, "s.p7s", der), write(tmp_path, "c.bin", CONTENT + b"x"),
                                signing_pki)
    assert result.returncode != 0
    assert verify_cms(der, CONTENT + b"x", trust).code == "signature_invalid"


def test_wrong_key_rejected_everywhere(ec_signer, hsm, other_ec_label, signing_pki, trust, tmp_path):
    """Signed by one HSM key, carrying another key's (trusted) certificate."""
    other = signing_pki.signer(hsm, other_ec_label, common_name="Interop Other")
    tree = etree.fromstring(sign_enveloped(ORDER, ec_signer)).getroottree()
    tree.find(".//ds:X509Certificate", NS).text = base64.b64encode(
        other.certificate.public_bytes(serialization.Encoding.DER)).decode()
    _both_reject_xml(etree.tostring(tree), signing_pki, trust, tmp_path, "signature_invalid")


def test_expired_certificate_rejected_everywhere(hsm, ec_key, signing_pki, trust, tmp_path):
    now = dt.datetime.now(UTC)
    expired = signing_pki.signer(hsm, ec_key, common_name="Interop Expired",
                                 not_before=now - dt.timedelta(days=60),
                                 not_after=now - dt.timedelta(days=30))
    signed = sign_enveloped(ORDER, expired)
    _both_reject_xml(signed, signing_pki, trust, tmp_path, "certificate_expired",
                     xmlsec_says="certificate has expired")
    # At a time inside the validity period, everybody accepts it.
    when = now - dt.timedelta(days=45)
    report, _ = verify_xml(signed, trust, at=when)
    assert report.valid, report.to_dict()
    assert report.signing_time == when and report.signing_time_source == "caller"
    result = xmlsec1_verify(write(tmp_path, "expired.xml", signed), signing_pki,
                            "--verification-gmt-time", when.strftime("%Y-%m-%d %H:%M:%S"))
    assert result.returncode == 0, result.stderr
    # CMS: openssl checks validity now; we judge at the signed signing time, which is now.
    der = sign_detached(CONTENT, expired)
    result = openssl_cms_verify(write(tmp_path, "e.p7s", der), write(tmp_path, "c.bin", CONTENT), signing_pki)
    assert result.returncode != 0
    assert verify_cms(der, CONTENT, trust).code == "certificate_expired"


def test_revoked_certificate_rejected_everywhere(hsm, rsa_key, signing_pki, trust, tmp_path):
    revoked = signing_pki.signer(hsm, rsa_key, common_name="Interop Revoked")
    signed = sign_enveloped(ORDER, revoked)
    der = sign_detached(CONTENT, revoked)
    assert verify_xml(signed, trust)[0].valid
    signing_pki.revoke(revoked.certificate)
    # xmlsec1 reads CRLs from the KeyInfo: put the CSOS CA's CRL there (KeyInfo is not signed).
    # It checks a CRL's signature only against trusted certificates: the CSOS CA is given as one.
    tree = etree.fromstring(signed).getroottree()
    crl = x509.load_pem_x509_crl(signing_pki.crl_pem().read_bytes())
    etree.SubElement(tree.find(".//ds:X509Data", NS), f"{{{DS_NS}}}X509CRL").text = base64.b64encode(
        crl.public_bytes(serialization.Encoding.DER)).decode()
    with_crl = etree.tostring(tree)
    # signxml has no revocation checking: it is left out here (see the benchmark's notes).
    _both_reject_xml(with_crl, signing_pki, trust, tmp_path, "certificate_revoked", signxml_checks=False,
                     xmlsec_says="certificate is revoked",
                     xmlsec_args=("--trusted-pem", str(signing_pki.layout.cert_path(pki.CSOS_CA))))
    assert verify_xml(signed, trust)[0].code == "certificate_revoked"
    result = openssl_cms_verify(write(tmp_path, "r.p7s", der), write(tmp_path, "c.bin", CONTENT),
                                signing_pki, crl=True)
    assert result.returncode != 0 and "revoked" in result.stderr
    assert verify_cms(der, CONTENT, trust).code == "certificate_revoked"


def test_untrusted_root_rejected_everywhere(hsm, ec_key, untrusted_pki, signing_pki, trust, tmp_path):
    foreign = untrusted_pki.signer(hsm, ec_key, common_name="Interop Untrusted")
    signed = sign_enveloped(ORDER, foreign)
    _both_reject_xml(signed, signing_pki, trust, tmp_path, "certificate_untrusted",
                     xmlsec_says="unable to get local issuer certificate")
    report, _ = verify_xml(signed, trust)
    assert report.indication.value == "INDETERMINATE"
    assert report.sub_indication.value == "NO_CERTIFICATE_CHAIN_FOUND"
    der = sign_detached(CONTENT, foreign)
    result = openssl_cms_verify(write(tmp_path, "u.p7s", der), write(tmp_path, "c.bin", CONTENT), signing_pki)
    assert result.returncode != 0
    assert verify_cms(der, CONTENT, trust).code == "certificate_untrusted"


def test_id_reference_signature_rejected(ec_signer, signing_pki, trust, tmp_path):
    """signxml, asked to, signs only the element with Id="part" (URI="#part"): a valid signature
    that covers part of the document. xmlsec1 limited to URI="" and the gateway refuse it."""
    doc = etree.fromstring(b'<Order><Part Id="part"><Qty>1</Qty></Part><Qty>999</Qty></Order>')
    xml_signer = XMLSigner(method=methods.enveloped, signature_algorithm="ecdsa-sha256",
                           digest_algorithm="sha256",
                           c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#")
    certs = [pem(ec_signer.certificate).decode(), pem(ec_signer.chain[0]).decode()]
    signed = etree.tostring(xml_signer.sign(doc, key=ec_signer.private_key(), cert=certs,
                                            reference_uri="#part", id_attribute="Id"))
    _both_reject_xml(signed, signing_pki, trust, tmp_path, "signature_malformed", signxml_checks=False)
