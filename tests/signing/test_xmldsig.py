"""Enveloped XML-DSig signed by the SoftHSM keys: the profile, tampering, and signature wrapping."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree
from pkihelp import (  # noqa: F401 - fixtures
    ec_signer,
    other_ec_label,
    rsa_signer,
    signer,
    signing_pki,
    trust,
    xmlsec1_verify,
)

from gateway.signing import xmldsig
from gateway.signing.errors import SigningError
from gateway.signing.verify import verify_xml
from gateway.signing.xmldsig import DS_NS, sign_enveloped, verify_enveloped

NS = {"ds": DS_NS}
ORDER = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
         b'<Order xmlns="urn:csos-gateway:order:1" xmlns:x="urn:unused">\n'
         b'  <OrderNumber>26X000123</OrderNumber>\n'
         b'  <!-- a comment is not signed -->\n'
         b'  <Item line="1"><NDC>12345-6789-01</NDC><Packages>10</Packages></Item>\n'
         b'</Order>\n')


def tree_of(data: bytes) -> etree._ElementTree:
    return etree.fromstring(data).getroottree()


def serialize(tree) -> bytes:
    return etree.tostring(tree, xml_declaration=True, encoding="UTF-8")


def resign(tree: etree._ElementTree, signer) -> bytes:
    """Recompute SignatureValue over the SignedInfo as it now stands, with the HSM key: turns a
    doctored signature into a cryptographically valid one, so that a refusal shows the profile at
    work rather than a broken signature."""
    signed_info = tree.find(".//ds:SignedInfo", NS)
    raw = signer.sign(etree.tostring(signed_info, method="c14n", exclusive=True))
    if signer.algorithm == "ecdsa-sha256":
        raw = xmldsig.der_to_raw_ecdsa(raw)
    tree.find(".//ds:SignatureValue", NS).text = base64.b64encode(raw).decode()
    return serialize(tree)


def code(data: bytes, trust) -> str | None:
    report, tree = verify_xml(data, trust)
    assert (tree is None) == (not report.valid)
    return report.code


# --- the profile -------------------------------------------------------------------------------


def test_round_trip(signer, trust):
    signed = sign_enveloped(ORDER, signer)
    report, tree = verify_xml(signed, trust)
    assert report.valid, report.to_dict()
    assert report.signature_algorithm == signer.algorithm
    assert report.signer.fingerprint_sha256 == signer.certificate.fingerprint(
        hashes.SHA256()).hex()
    assert [c.passed for c in report.checks] == [True] * len(report.checks)
    assert len(report.chain) == 3  # signer, CSOS CA, root
    # The tree handed back is what was signed: no Signature, no comments.
    root = tree.getroot()
    assert root.find(".//ds:Signature", NS) is None
    assert not [n for n in root.iter() if isinstance(n, etree._Comment)]
    assert root.findtext("{urn:csos-gateway:order:1}OrderNumber") == "26X000123"


def test_signature_shape(signer):
    signed = sign_enveloped(ORDER, signer)
    root = etree.fromstring(signed)
    signature = root[-1]
    assert signature.tag == f"{{{DS_NS}}}Signature"
    assert signature.xpath("ds:SignedInfo/ds:CanonicalizationMethod/@Algorithm", namespaces=NS) == [
        "http://www.w3.org/2001/10/xml-exc-c14n#"]
    expected = {"rsa-sha256": xmldsig.RSA_SHA256, "ecdsa-sha256": xmldsig.ECDSA_SHA256}[signer.algorithm]
    assert signature.xpath("ds:SignedInfo/ds:SignatureMethod/@Algorithm", namespaces=NS) == [expected]
    assert signature.xpath("ds:SignedInfo/ds:Reference/@URI", namespaces=NS) == [""]
    assert signature.xpath("ds:SignedInfo/ds:Reference/ds:Transforms/ds:Transform/@Algorithm",
                           namespaces=NS) == [xmldsig.ENVELOPED, xmldsig.EXC_C14N]
    assert signature.xpath("ds:SignedInfo/ds:Reference/ds:DigestMethod/@Algorithm",
                           namespaces=NS) == [xmldsig.SHA256]
    certs = signature.xpath("ds:KeyInfo/ds:X509Data/ds:X509Certificate/text()", namespaces=NS)
    assert len(certs) == 2  # signer, then its CA
    raw = base64.b64decode(signature.findtext("ds:SignatureValue", namespaces=NS))
    if signer.algorithm == "ecdsa-sha256":
        assert len(raw) == 64  # r || s, not DER
    else:
        assert len(raw) == 256
    # The comment of the input survives signing (it is outside what C14N signs).
    assert b"a comment is not signed" in signed


def test_digest_is_exclusive_c14n_of_the_document_without_signature(signer):
    signed = sign_enveloped(ORDER, signer)
    tree = tree_of(signed)
    signature = tree.find(".//ds:Signature", NS)
    signature.getparent().remove(signature)
    c14n = etree.tostring(tree, method="c14n", exclusive=True, with_comments=False)
    assert b"urn:unused" not in c14n  # exclusive: unused namespace declarations dropped
    digest = base64.b64encode(hashlib.sha256(c14n).digest()).decode()
    assert etree.fromstring(signed).findtext(".//ds:DigestValue", namespaces=NS) == digest


def test_processing_instructions_outside_the_root_are_dropped(ec_signer, trust):
    doc = b'<?xml version="1.0"?><?xml-stylesheet href="a.xsl"?><!-- top --><a>x</a><?tail y?>'
    signed = sign_enveloped(doc, ec_signer)
    assert b"xml-stylesheet" not in signed and b"tail" not in signed
    assert verify_xml(signed, trust)[0].valid


def test_signing_refusals(ec_signer, rsa_signer):
    signed = sign_enveloped(ORDER, ec_signer)
    with pytest.raises(SigningError) as caught:
        sign_enveloped(signed, ec_signer)
    assert caught.value.code == "already_signed"
    with pytest.raises(SigningError) as caught:
        sign_enveloped(ORDER, dataclasses.replace(ec_signer, certificate=None))
    assert caught.value.code == "certificate_missing"
    with pytest.raises(SigningError) as caught:
        sign_enveloped(ORDER, dataclasses.replace(ec_signer, certificate=rsa_signer.certificate))
    assert caught.value.code == "certificate_key_mismatch"
    with pytest.raises(xmldsig.XmlError) as caught:
        sign_enveloped(b"<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>", ec_signer)
    assert caught.value.code == "xml_dtd_forbidden"


def test_verify_enveloped_without_trust(signer):
    verified = verify_enveloped(sign_enveloped(ORDER, signer))
    assert verified.signer == signer.certificate
    assert verified.algorithm == signer.algorithm
    assert [c.subject for c in verified.other_certificates] == [signer.chain[0].subject]


def test_certificate_order_in_x509data_does_not_matter(ec_signer, trust):
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    x509_data = tree.find(".//ds:X509Data", NS)
    first = x509_data[0]
    x509_data.remove(first)
    x509_data.append(first)  # CA first, signer last
    report, _ = verify_xml(serialize(tree), trust)
    assert report.valid
    assert report.signer.subject == ec_signer.certificate.subject.rfc4514_string()


# --- tampering ---------------------------------------------------------------------------------


def test_tampered_content(signer, trust):
    signed = sign_enveloped(ORDER, signer)
    tampered = signed.replace(b"<Packages>10<", b"<Packages>90<")
    report, tree = verify_xml(tampered, trust)
    assert tree is None
    assert report.code == "signature_invalid"
    assert report.sub_indication.value == "HASH_FAILURE"
    assert report.indication.value == "TOTAL_FAILED"
    assert [c.name for c in report.checks if c.passed is False] == ["reference_digest"]


def test_tampered_attribute_and_whitespace(ec_signer, trust):
    signed = sign_enveloped(ORDER, ec_signer)
    assert code(signed.replace(b'line="1"', b'line="2"'), trust) == "signature_invalid"
    assert code(signed.replace(b"<OrderNumber>", b"<OrderNumber> "), trust) == "signature_invalid"


def test_comment_injection_does_not_change_what_is_read(ec_signer, trust):
    signed = sign_enveloped(ORDER, ec_signer)
    injected = signed.replace(b"<Packages>10<", b"<Packages>1<!-- -->0<")
    report, tree = verify_xml(injected, trust)
    assert report.valid  # comments are not signed...
    assert tree.getroot().findtext(".//{urn:csos-gateway:order:1}Packages") == "10"  # ...nor read


def test_tampered_signed_info(signer, trust):
    signed = sign_enveloped(ORDER, signer)
    tree = tree_of(signed)
    digest = tree.find(".//ds:DigestValue", NS)
    digest.text = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    report, _ = verify_xml(serialize(tree), trust)
    assert report.code == "signature_invalid"


def test_signature_value_of_another_key(ec_signer, hsm, other_ec_label, signing_pki, trust):
    """Signed by one HSM key, presenting the (valid, trusted) certificate of another."""
    other = signing_pki.signer(hsm, other_ec_label, common_name="Other Signer")
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    cert = tree.find(".//ds:X509Certificate", NS)
    cert.text = base64.b64encode(other.certificate.public_bytes(Encoding.DER)).decode()
    report, _ = verify_xml(serialize(tree), trust)
    assert report.code == "signature_invalid"
    assert report.sub_indication.value == "SIG_CRYPTO_FAILURE"
    assert [c.name for c in report.checks if c.passed is False] == ["signature_value"]


def test_rsa_certificate_with_ecdsa_algorithm(rsa_signer, ec_signer, trust):
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    cert = tree.find(".//ds:X509Certificate", NS)
    cert.text = base64.b64encode(rsa_signer.certificate.public_bytes(Encoding.DER)).decode()
    assert code(serialize(tree), trust) == "signature_invalid"


def test_ecdsa_signature_in_der_form_is_refused(ec_signer, trust):
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    value = tree.find(".//ds:SignatureValue", NS)
    value.text = base64.b64encode(xmldsig.raw_to_der_ecdsa(base64.b64decode(value.text))).decode()
    assert code(serialize(tree), trust) == "signature_invalid"


# --- signature wrapping and the profile's refusals ---------------------------------------------


def test_unsigned_document(trust):
    report, tree = verify_xml(ORDER, trust)
    assert report.code == "signature_missing" and tree is None
    assert report.indication.value == "INDETERMINATE"


def test_xsw_signature_moved_into_a_child(ec_signer, trust):
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    signature = tree.find("ds:Signature", NS)
    tree.getroot().find("{urn:csos-gateway:order:1}Item").append(signature)
    assert code(serialize(tree), trust) == "signature_malformed"


def test_xsw_signed_document_wrapped_in_a_new_root(ec_signer, trust):
    signed_root = etree.fromstring(sign_enveloped(ORDER, ec_signer))
    evil = etree.Element("{urn:csos-gateway:order:1}Order")
    etree.SubElement(evil, "{urn:csos-gateway:order:1}OrderNumber").text = "26X999999"
    etree.SubElement(evil, "Wrapper").append(signed_root)
    assert code(etree.tostring(evil), trust) == "signature_malformed"


def test_xsw_duplicated_signed_subtree(ec_signer, trust):
    """The attacker's values first, the original (signed) content hidden in a wrapper."""
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    root = tree.getroot()
    item = root.find("{urn:csos-gateway:order:1}Item")
    forged = copy.deepcopy(item)
    forged.find("{urn:csos-gateway:order:1}Packages").text = "9000"
    item.addprevious(forged)
    wrapper = etree.Element("Wrapper")
    item.addprevious(wrapper)
    wrapper.append(item)
    assert code(serialize(tree), trust) == "signature_invalid"


def test_xsw_original_hidden_in_object_and_resigned(ec_signer, trust):
    """Even with a valid signature value, a ds:Object is refused."""
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    signature = tree.find("ds:Signature", NS)
    obj = etree.SubElement(signature, f"{{{DS_NS}}}Object")
    obj.append(copy.deepcopy(tree.getroot().find("{urn:csos-gateway:order:1}Item")))
    assert code(resign(tree, ec_signer), trust) == "signature_malformed"


def test_second_signature_is_refused(ec_signer, rsa_signer, trust):
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    other = etree.fromstring(sign_enveloped(b"<Other>x</Other>", rsa_signer))
    tree.getroot().find("{urn:csos-gateway:order:1}Item").append(other.find("ds:Signature", NS))
    report, _ = verify_xml(serialize(tree), trust)
    assert report.code == "signature_malformed"
    assert "2 Signature elements" in report.message


def test_id_reference_is_refused_even_when_validly_signed(ec_signer, trust):
    """Reference URI="#id" over the signed part only (the classic XSW set-up), with a valid
    signature value made by the HSM key: refused by the profile."""
    doc = (b'<Order xmlns="urn:csos-gateway:order:1"><Item Id="signed"><Packages>10</Packages></Item>'
           b'<Packages>9000</Packages></Order>')
    tree = tree_of(sign_enveloped(doc, ec_signer))
    item = tree.getroot().find("{urn:csos-gateway:order:1}Item")
    item_c14n = etree.tostring(item, method="c14n", exclusive=True)
    tree.find(".//ds:Reference", NS).set("URI", "#signed")
    tree.find(".//ds:DigestValue", NS).text = base64.b64encode(hashlib.sha256(item_c14n).digest()).decode()
    report, _ = verify_xml(resign(tree, ec_signer), trust)
    assert report.code == "signature_malformed"
    assert "#signed" in report.message


@pytest.mark.parametrize("mutation", [
    "two_references", "c14n_with_comments", "inclusive_c14n", "sha1_digest", "rsa_sha1",
    "extra_transform", "xpath_transform", "missing_transforms", "hmac_output_length",
    "retrieval_method", "no_key_info", "text_in_signed_info", "processing_instruction",
])
def test_profile_refusals_with_valid_signature_values(mutation, ec_signer, trust):
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    signed_info = tree.find(".//ds:SignedInfo", NS)
    reference = signed_info.find("ds:Reference", NS)
    transforms = reference.find("ds:Transforms", NS)
    ds = f"{{{DS_NS}}}"
    expected = "signature_malformed"
    if mutation == "two_references":
        signed_info.append(copy.deepcopy(reference))
    elif mutation == "c14n_with_comments":
        signed_info[0].set("Algorithm", "http://www.w3.org/2001/10/xml-exc-c14n#WithComments")
        expected = "algorithm_not_allowed"
    elif mutation == "inclusive_c14n":
        transforms[1].set("Algorithm", "http://www.w3.org/TR/2001/REC-xml-c14n-20010315")
        expected = "algorithm_not_allowed"
    elif mutation == "sha1_digest":
        reference.find("ds:DigestMethod", NS).set("Algorithm", "http://www.w3.org/2000/09/xmldsig#sha1")
        expected = "algorithm_not_allowed"
    elif mutation == "rsa_sha1":
        signed_info[1].set("Algorithm", "http://www.w3.org/2000/09/xmldsig#rsa-sha1")
        expected = "algorithm_not_allowed"
    elif mutation == "extra_transform":
        etree.SubElement(transforms, ds + "Transform", Algorithm=xmldsig.EXC_C14N)
    elif mutation == "xpath_transform":
        transforms[1].set("Algorithm", "http://www.w3.org/TR/1999/REC-xpath-19991116")
        expected = "algorithm_not_allowed"
    elif mutation == "missing_transforms":
        reference.remove(transforms)
    elif mutation == "hmac_output_length":
        etree.SubElement(signed_info[1], ds + "HMACOutputLength").text = "0"
    elif mutation == "retrieval_method":
        key_info = tree.find(".//ds:KeyInfo", NS)
        etree.SubElement(key_info, ds + "RetrievalMethod", URI="file:///etc/passwd")
    elif mutation == "no_key_info":
        signature = tree.find("ds:Signature", NS)
        signature.remove(signature.find("ds:KeyInfo", NS))
        expected = "certificate_missing"
    elif mutation == "text_in_signed_info":
        signed_info[0].tail = "text"
    elif mutation == "processing_instruction":
        signed_info.insert(0, etree.ProcessingInstruction("pi", "x"))
    # A changed SignedInfo never passes the quick reading of its canonical form: the element
    # walk then runs and names the check.
    quick = xmldsig._profile_from_c14n(etree.tostring(signed_info, method="c14n", exclusive=True))
    assert (quick is None) == (mutation not in ("retrieval_method", "no_key_info"))
    report, tree_out = verify_xml(resign(tree, ec_signer), trust)
    assert report.code == expected, report.message
    assert tree_out is None
    assert not report.valid


SIGNED_INFO_FORMS = {
    # name: (SignedInfo as another signer might write it, whether it is the plain form)
    "ds_prefix": (None, True),
    "default_namespace": ("<SignedInfo xmlns='{ds}'><CanonicalizationMethod Algorithm='{exc}'/>"
                          "<SignatureMethod Algorithm='{ecdsa}'/><Reference URI=''><Transforms>"
                          "<Transform Algorithm='{env}'/><Transform Algorithm='{exc}'/></Transforms>"
                          "<DigestMethod Algorithm='{sha}'/><DigestValue>{digest}</DigestValue>"
                          "</Reference></SignedInfo>", True),
    "indented_other_prefix": ("<dsig:SignedInfo xmlns:dsig='{ds}'>\n  <dsig:CanonicalizationMethod "
                              "Algorithm='{exc}'/>\n  <dsig:SignatureMethod Algorithm='{ecdsa}'/>\n  "
                              "<dsig:Reference URI=''>\n    <dsig:Transforms>\n      <dsig:Transform "
                              "Algorithm='{env}'/>\n      <dsig:Transform Algorithm='{exc}'/>\n    "
                              "</dsig:Transforms>\n    <dsig:DigestMethod Algorithm='{sha}'/>\n    "
                              "<dsig:DigestValue>{digest}</dsig:DigestValue>\n  </dsig:Reference>\n"
                              "</dsig:SignedInfo>", True),
    "reference_with_id": ("<ds:SignedInfo xmlns:ds='{ds}'><ds:CanonicalizationMethod Algorithm='{exc}'/>"
                          "<ds:SignatureMethod Algorithm='{ecdsa}'/><ds:Reference Id='r1' URI=''>"
                          "<ds:Transforms><ds:Transform Algorithm='{env}'/><ds:Transform "
                          "Algorithm='{exc}'/></ds:Transforms><ds:DigestMethod Algorithm='{sha}'/>"
                          "<ds:DigestValue>{digest}</ds:DigestValue></ds:Reference></ds:SignedInfo>",
                          False),
}


@pytest.mark.parametrize("form", sorted(SIGNED_INFO_FORMS))
def test_signed_info_forms_verify_and_both_readings_agree(form, ec_signer, trust):
    """The quick reading of SignedInfo's canonical form gives what the element walk gives, and a
    form outside it (an Id on the Reference) still verifies through the walk."""
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    template, plain = SIGNED_INFO_FORMS[form]
    signed_info = tree.find(".//ds:SignedInfo", NS)
    if template is not None:
        digest = signed_info.find(".//ds:DigestValue", NS).text
        text = template.format(ds=DS_NS, exc=xmldsig.EXC_C14N, ecdsa=xmldsig.ECDSA_SHA256,
                               env=xmldsig.ENVELOPED, sha=xmldsig.SHA256, digest=digest)
        replacement = etree.fromstring(text)
        replacement.tail = signed_info.tail
        signed_info.getparent().replace(signed_info, replacement)
        signed_info = replacement
    quick = xmldsig._profile_from_c14n(etree.tostring(signed_info, method="c14n", exclusive=True))
    walked = xmldsig._profile_from_elements(signed_info)
    assert walked.algorithm == "ecdsa-sha256" and len(walked.digest) == 32
    assert quick == (walked if plain else None)
    report, signed = verify_xml(resign(tree, ec_signer), trust)
    assert report.valid, report.to_dict()
    assert signed.getroot().findtext("{urn:csos-gateway:order:1}OrderNumber") == "26X000123"


def test_quick_reading_requires_the_declaration_of_signed_infos_own_prefix(ec_signer):
    tree = tree_of(sign_enveloped(ORDER, ec_signer))
    c14n = etree.tostring(tree.find(".//ds:SignedInfo", NS), method="c14n", exclusive=True)
    assert xmldsig._profile_from_c14n(c14n).algorithm == "ecdsa-sha256"
    for wrong in (b"xmlns=", b"xmlns:dx="):
        assert xmldsig._profile_from_c14n(c14n.replace(b"xmlns:ds=", wrong, 1)) is None


def test_inclusive_namespaces_prefix_list_is_honoured(ec_signer, trust):
    """Another implementation may sign with an InclusiveNamespaces PrefixList; we follow it."""
    doc = b'<o:Order xmlns:o="urn:o" xmlns:keep="urn:keep"><o:A>1</o:A></o:Order>'
    tree = tree_of(sign_enveloped(doc, ec_signer))
    transform = tree.find(".//ds:Transforms", NS)[1]
    etree.SubElement(transform, f"{{{xmldsig.EC_NS}}}InclusiveNamespaces", PrefixList="keep")
    signature = tree.find("ds:Signature", NS)
    root = tree.getroot()
    root.remove(signature)
    c14n = etree.tostring(tree, method="c14n", exclusive=True, inclusive_ns_prefixes=["keep"])
    assert b"urn:keep" in c14n
    root.append(signature)
    tree.find(".//ds:DigestValue", NS).text = base64.b64encode(hashlib.sha256(c14n).digest()).decode()
    report, _ = verify_xml(resign(tree, ec_signer), trust)
    assert report.valid, report.to_dict()


def test_text_after_signature_stays_signed_content(ec_signer, trust):
    """The enveloped transform removes the Signature element, not the text that follows it."""
    tree = tree_of(sign_enveloped(b"<a><b>x</b></a>", ec_signer))
    signature = tree.find("ds:Signature", NS)
    signature.tail = "trailing"
    assert code(serialize(tree), trust) == "signature_invalid"


def test_hostile_xml_never_reaches_the_verifier(trust):
    report, tree = verify_xml(b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>', trust)
    assert report.code == "xml_dtd_forbidden"
    assert report.sub_indication.value == "FORMAT_FAILURE"
    assert not report.usable_input
    assert tree is None
    assert verify_xml(b"<a>" * 100 + b"</a>" * 100, trust)[0].code == "xml_too_deep"
    assert verify_xml(b"<a>", trust)[0].code == "malformed_xml"


def test_relative_namespace_uri_is_unusable_input_not_a_crash(ec_signer, trust):
    """C14N refuses relative namespace URIs: signing refuses such a document and verification
    reports it as unusable input, whether it sits in the content or in SignedInfo."""
    with pytest.raises(xmldsig.XmlError) as info:
        sign_enveloped(b'<a xmlns="relative"><b>1</b></a>', ec_signer)
    assert info.value.code == "malformed_xml"
    signed = sign_enveloped(b"<a><b>1</b></a>", ec_signer)
    in_content = signed.replace(b"<b>", b'<b xmlns:r="relative" r:x="1">', 1)
    in_signed_info = signed.replace(b"<ds:SignedInfo>", b'<ds:SignedInfo xmlns:r="relative" r:x="1">', 1)
    assert in_signed_info != signed
    for data in (in_content, in_signed_info):
        report, tree = verify_xml(data, trust)
        assert report.code == "malformed_xml" and not report.usable_input and tree is None


def test_verification_never_raises_on_mangled_input(ec_signer, trust):
    """Bytes flipped, cut or inserted anywhere: always a report, never an exception."""
    import random

    signed = sign_enveloped(ORDER, ec_signer)
    rng = random.Random(20261127)
    for _ in range(300):
        data = bytearray(signed)
        for _ in range(rng.randint(1, 3)):
            choice = rng.random()
            at = rng.randrange(len(data))
            if choice < 0.5:
                data[at] = rng.randrange(256)
            elif choice < 0.8:
                del data[at:at + rng.randint(1, 40)]
            else:
                data[at:at] = rng.choice([b"<", b">", b"&", b'"', b"<!--", b"\x00", b"<ds:Object/>"])
        report, tree = verify_xml(bytes(data), trust)
        assert report.code is None or isinstance(report.code, str)
        assert (tree is not None) == report.valid
        report.to_dict()


# --- reports and dispatch ----------------------------------------------------------------------


def test_report_verdicts_are_derived_from_checks():
    import datetime as dt
    import json

    from gateway.signing.report import Check, VerificationReport

    now = dt.datetime.now(dt.timezone.utc)
    passed = VerificationReport("xmldsig", (Check("format", True), Check("signature_value", True)), now)
    assert passed.valid and passed.code is None and passed.indication.value == "TOTAL_PASSED"
    revoked = VerificationReport("xmldsig", (
        Check("format", True), Check("revocation", False, "certificate_revoked", "on the CRL"),
        Check("key_usage", None)), now)
    assert not revoked.valid and revoked.code == "certificate_revoked"
    assert revoked.sub_indication.value == "REVOKED" and revoked.indication.value == "TOTAL_FAILED"
    assert revoked.message == "on the CRL" and revoked.usable_input
    untrusted = VerificationReport("cms", (Check("certificate_chain", False, "certificate_untrusted"),), now)
    assert untrusted.indication.value == "INDETERMINATE"
    incomplete = VerificationReport("cms", (Check("format", True), Check("revocation", None)), now)
    assert not incomplete.valid and incomplete.code == "verification_incomplete"
    assert json.loads(json.dumps(revoked.to_dict()))["checks"][1]["code"] == "certificate_revoked"
    with pytest.raises(dataclasses.FrozenInstanceError):
        revoked.checks = ()


def test_verify_document_dispatches_by_type(ec_signer, trust):
    from gateway.signing import verify as verify_module
    from gateway.signing.cms import sign_detached

    signed = sign_enveloped(ORDER, ec_signer)
    report, tree = verify_module.verify_document(signed, trust)
    assert report.valid and report.format == "xmldsig" and tree is not None
    der = sign_detached(b"content", ec_signer)
    assert verify_module.verify_document(der, trust, content=b"content")[0].valid
    assert verify_module.verify_document(der, trust)[0].code == "content_missing"

    seen = []

    def order_verifier(tree_in, trust_in, at):
        seen.append(tree_in.getroot().tag)
        report_in, signed_tree = verify_module.verify_xml_tree(tree_in, trust_in, at,
                                                               document_format="csos-order")
        return report_in, signed_tree

    verify_module.register_xml_document("{urn:csos-gateway:order:1}Order", order_verifier)
    try:
        report, tree = verify_module.verify_document(signed, trust)
    finally:
        verify_module._XML_DOCUMENT_TYPES.pop("{urn:csos-gateway:order:1}Order")
    assert seen == ["{urn:csos-gateway:order:1}Order"]
    assert report.valid and report.format == "csos-order"


def test_signing_time_read_from_the_signed_content(hsm, ec_key, signing_pki):
    """A document type can judge the certificate at a date inside the signed document (a CSOS
    order's SignedDate); the date is read only from what the signature covers."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    start = now - dt.timedelta(days=60)
    expired = signing_pki.signer(hsm, ec_key, common_name="Dated Signer", not_before=start,
                                 not_after=start + dt.timedelta(days=30))
    trust = signing_pki.trust()

    def signed_date(tree):
        text = tree.getroot().findtext("{urn:csos-gateway:order:1}SignedDate")
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc) if text else None

    def order(day: dt.datetime) -> bytes:
        return (b'<Order xmlns="urn:csos-gateway:order:1"><SignedDate>'
                + day.date().isoformat().encode() + b"</SignedDate></Order>")

    signed = sign_enveloped(order(start + dt.timedelta(days=10)), expired)
    report, tree = verify_xml(signed, trust, at=signed_date)
    assert report.valid, report.to_dict()
    assert report.signing_time_source == "document"
    assert report.signer_certificate == expired.certificate
    assert "signer_certificate" not in report.to_dict()
    # A date in the future is not believed: judged now, the certificate has expired.
    signed = sign_enveloped(order(now + dt.timedelta(days=400)), expired)
    assert verify_xml(signed, trust, at=signed_date)[0].code == "certificate_expired"
    # No date: now.
    signed = sign_enveloped(b'<Order xmlns="urn:csos-gateway:order:1"/>', expired)
    report, _ = verify_xml(signed, trust, at=signed_date)
    assert report.code == "certificate_expired" and report.signing_time_source == "verification-time"


def test_unreadable_certificates_are_a_report_not_a_crash(rsa_signer, trust):
    """cryptography raises DuplicateExtension, UnsupportedGeneralNameType or TypeError (not
    ValueError) for some certificates it loads lazily: each is certificate_malformed."""
    from asn1crypto import x509 as asn1_x509

    cert = asn1_x509.Certificate.load(rsa_signer.certificate.public_bytes(Encoding.DER))
    extensions = list(cert["tbs_certificate"]["extensions"])
    doubled = asn1_x509.TbsCertificate.load(cert["tbs_certificate"].dump())
    doubled["extensions"] = asn1_x509.Extensions([*extensions, asn1_x509.Extension.load(extensions[0].dump())])
    x400 = asn1_x509.TbsCertificate.load(cert["tbs_certificate"].dump())
    others = [e for e in extensions if e["extn_id"].native != "subject_alt_name"]
    x400["extensions"] = asn1_x509.Extensions([*others, asn1_x509.Extension({
        "extn_id": "subject_alt_name",  # SEQUENCE { [3] x400Address { SEQUENCE {} } }
        "extn_value": asn1_x509.GeneralNames.load(bytes.fromhex("3004a3023000"))})])
    for tbs, error in ((doubled, "DuplicateExtension"), (x400, "UnsupportedGeneralNameType")):
        bad = asn1_x509.Certificate({"tbs_certificate": tbs, "signature_algorithm": cert["signature_algorithm"],
                                     "signature_value": cert["signature_value"]})
        tree = tree_of(sign_enveloped(ORDER, rsa_signer))
        tree.find(".//ds:X509Certificate", NS).text = base64.b64encode(bad.dump()).decode()
        report, _ = verify_xml(serialize(tree), trust)
        assert report.code == "certificate_malformed", report.to_dict()
        assert error in report.message


def test_signer_found_among_a_whole_bundle_of_ca_certificates(rsa_signer, signing_pki, trust, tmp_path):
    """X509Data carrying the signer twice, its CA, the root and an unrelated CA (the EPCS CA):
    the signer is the one leaf that is not a CA, as xmlsec1 also finds it."""
    from gateway.signing import pki

    tree = tree_of(sign_enveloped(ORDER, rsa_signer))
    x509_data = tree.find(".//ds:X509Data", NS)
    leaf = x509_data.find("ds:X509Certificate", NS)
    for cert in (signing_pki.cert(pki.ROOT), signing_pki.cert(pki.EPCS_CA)):
        etree.SubElement(x509_data, f"{{{DS_NS}}}X509Certificate").text = base64.b64encode(
            cert.public_bytes(Encoding.DER)).decode()
    etree.SubElement(x509_data, f"{{{DS_NS}}}X509Certificate").text = leaf.text
    data = serialize(tree)
    report, _ = verify_xml(data, trust)
    assert report.valid, report.to_dict()
    assert report.signer_certificate == rsa_signer.certificate
    (tmp_path / "bundle.xml").write_bytes(data)
    assert xmlsec1_verify(tmp_path / "bundle.xml", signing_pki).returncode == 0
