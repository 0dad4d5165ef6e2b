"""Enveloped XML-DSig and the hardened parser, second review: what we sign must pass our own
verifier's limits, libxml2's refusals carry the right code, DOCTYPE words in CDATA or comments
are text, and crafted certificates are not kept in the verifier's caches. Signatures are made
by the session's SoftHSM keys; xmlsec1 is the independent verifier."""

from __future__ import annotations

import base64
import datetime as dt
import gc
import os
import tracemalloc

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier
from lxml import etree
from pkihelp import ec_signer, rsa_signer, signing_pki, trust, xmlsec1_verify  # noqa: F401 - fixtures

from gateway.signing.verify import verify_xml
from gateway.signing.xmldsig import DS_NS, sign_enveloped, verify_enveloped
from gateway.xmlsafe import DEFAULT_MAX_BYTES, XmlError, parse_xml

NS = {"ds": DS_NS}


def xml_code(data: bytes, **limits) -> str:
    with pytest.raises(XmlError) as caught:
        parse_xml(data, **limits)
    return caught.value.code


# --- what we sign passes our verifier's limits ------------------------------------------------

NEAR_THE_LIMITS = {
    # Each input is within the default limits; signed, it would not be.
    "bytes": b"<r>" + b"x" * (DEFAULT_MAX_BYTES - 2_000) + b"</r>",
    "elements": b"<r>" + b"<a/>" * 49_999 + b"</r>",
    # UTF-8 output of a Latin-1 input: two bytes for each of these characters.
    "latin1": b'<?xml version="1.0" encoding="ISO-8859-1"?><r>' + b"\xe9" * 600_000 + b"</r>",
    # The Signature's xmlns:ds is one declaration more.
    "namespaces": b"<r " + b" ".join(b'xmlns:p%d="urn:%d"' % (i, i) for i in range(256)) + b">"
                  + b"x" * 40_000 + b"</r>",
}


@pytest.mark.parametrize("case", sorted(NEAR_THE_LIMITS))
def test_a_document_that_signed_would_break_the_limits_is_refused_at_signing(case, ec_signer):
    data = NEAR_THE_LIMITS[case]
    parse_xml(data)  # the input itself is accepted
    with pytest.raises(XmlError) as caught:
        signed = sign_enveloped(data, ec_signer)
        verify_enveloped(signed)  # reached only without the check: our own output refused here
        pytest.fail("signed a document its verifier accepts: the case no longer tests the limit")
    assert caught.value.code == "xml_too_large"
    assert "signed" in caught.value.message


def test_a_large_document_within_the_limits_signs_and_verifies_everywhere(rsa_signer, signing_pki,
                                                                          trust, tmp_path):
    overhead = len(sign_enveloped(b"<r></r>", rsa_signer)) - len(b"<r></r>")
    items = b"<i>\xc3\xa9</i>" * 20_000
    data = b"<r>" + items + b"x" * (DEFAULT_MAX_BYTES - 100 - overhead - len(items) - 7) + b"</r>"
    signed = sign_enveloped(data, rsa_signer)
    assert DEFAULT_MAX_BYTES - 100 == len(signed)
    report, _ = verify_xml(signed, trust)
    assert report.valid, report.to_dict()
    path = tmp_path / "large.xml"
    path.write_bytes(signed)
    result = xmlsec1_verify(path, signing_pki)
    assert result.returncode == 0, result.stderr


def test_a_small_body_limit_bounds_the_input_not_the_signed_document(rsa_signer, trust):
    """The HTTP layer passes its request-body limit as max_bytes: a 2 KB limit still signs a
    small order, although the signature alone is larger; the output is bounded by the
    verifier's default limits."""
    data = b"<Order><OrderNumber>26X000556</OrderNumber></Order>"
    signed = sign_enveloped(data, rsa_signer, max_bytes=2_048, max_depth=3)
    assert len(signed) > 2_048
    assert verify_xml(signed, trust)[0].valid
    with pytest.raises(XmlError) as caught:
        sign_enveloped(b"<r>" + b"x" * 2_100 + b"</r>", rsa_signer, max_bytes=2_048)
    assert caught.value.code == "xml_too_large"


# --- libxml2's refusals carry the right code --------------------------------------------------


@pytest.mark.parametrize("data", [
    b"<depth></a>",  # libxml2: "Opening and ending tag mismatch: depth line 1 and a"
    b"<a><Depth>",  # "Premature end of data in tag Depth"
    b"<a>&depth;</a>",  # "Entity 'depth' not defined"
    b"<a><!-- open </a>",
    b"<a><![CDATA[ open </a>",
    b"<a><?pi open </a>",
])
def test_malformed_documents_naming_depth_are_malformed_not_too_deep(data):
    assert xml_code(data) == "malformed_xml"


def test_libxml2_size_limits_are_too_large_or_too_deep():
    assert xml_code(b"<" + b"a" * 60_000 + b"/>") == "xml_too_large"  # a name over 50,000
    assert xml_code(b'<a ' + b"b" * 60_000 + b'="1"/>') == "xml_too_large"
    assert xml_code(b"<a>" * 300 + b"</a>" * 300, max_depth=1_000) == "xml_too_deep"
    # With max_bytes raised (the server's max_body_bytes is configurable), libxml2's 10 MB limits
    # on a text node, an attribute value, a comment or CDATA are what refuses.
    big = 50_000_000
    x = b"x" * 10_500_000
    assert xml_code(b"<a>" + x + b"</a>", max_bytes=big) == "xml_too_large"
    assert xml_code(b'<a k="' + x + b'"/>', max_bytes=big) == "xml_too_large"
    assert xml_code(b"<a><!--" + x + b"--></a>", max_bytes=big) == "xml_too_large"
    assert xml_code(b"<a><![CDATA[" + x + b"]]></a>", max_bytes=big) == "xml_too_large"


# --- DOCTYPE words as text ---------------------------------------------------------------------

QUOTING_DOCTYPE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<!-- template: <!DOCTYPE order> -->\n"
    b'<Order xmlns="urn:csos-gateway:order:1">'
    b"<Note><![CDATA[<!DOCTYPE html><html><p>call before 5pm</p></html>]]></Note>"
    b"<!-- <!ENTITY x 'y'> -->"
    b"<OrderNumber>26X000555</OrderNumber></Order>"
)


def test_doctype_words_in_cdata_and_comments_sign_and_verify(ec_signer, signing_pki, trust, tmp_path):
    signed = sign_enveloped(QUOTING_DOCTYPE, ec_signer)
    report, tree = verify_xml(signed, trust)
    assert report.valid, report.to_dict()
    note = tree.getroot().findtext("{urn:csos-gateway:order:1}Note")
    assert note == "<!DOCTYPE html><html><p>call before 5pm</p></html>"
    path = tmp_path / "quoting.xml"
    path.write_bytes(signed)
    result = xmlsec1_verify(path, signing_pki)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("data", [
    b'<!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><a>&e;</a>',
    b'\xef\xbb\xbf<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>',
    b'<?xml version="1.0"?><!-- c --><?pi x?>\r\n <!DOCTYPE a SYSTEM "http://127.0.0.1:9/x.dtd"><a/>',
    b'<!-- a -- b --><!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>',  # "--" ends no comment
    b'<!-- never closed <!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>',
    # Outside UTF-8 and single-byte encodings any marker still refuses.
    '<?xml version="1.0" encoding="UTF-16"?><a><![CDATA[<!DOCTYPE html>]]></a>'.encode("utf-16"),
    '<?xml version="1.0" encoding="Shift_JIS"?><a><![CDATA[<!DOCTYPE html>]]></a>'.encode("shift_jis"),
])
def test_a_declaration_in_the_prolog_is_still_refused(data):
    assert xml_code(data) == "xml_dtd_forbidden"


def test_a_declaration_inside_the_document_element_is_malformed_and_never_read():
    for data in (b'<a><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>&e;</a>',
                 b'<a/><!DOCTYPE x [<!ENTITY e "x">]>'):
        assert xml_code(data) == "malformed_xml"


# --- crafted certificates are not kept --------------------------------------------------------


def _large_self_signed_certificate(key, number: int, size: int) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Large {number}")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(number + 1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"),
                                                      os.urandom(size)), critical=False)
            .sign(key, hashes.SHA256()))


def test_large_crafted_certificates_are_not_kept_after_verification(ec_signer, trust):
    """Without the bound, each distinct set of certificates stayed in two caches of 512 entries:
    near the 1 MB document limit, over a gigabyte held for the life of the server."""
    tree = etree.fromstring(sign_enveloped(b"<a>1</a>", ec_signer))
    x509_data = tree.find(".//ds:X509Data", NS)
    for extra in x509_data[1:]:
        x509_data.remove(extra)
    key = ec.generate_private_key(ec.SECP256R1())  # the attacker's own key
    documents = []
    for number in range(8):
        cert = _large_self_signed_certificate(key, number, 200_000)
        x509_data[0].text = base64.b64encode(cert.public_bytes(Encoding.DER)).decode()
        documents.append(etree.tostring(tree))
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for data in documents:
            report, _ = verify_xml(data, trust)
            assert report.code == "signature_invalid"
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 500_000, f"{kept} bytes kept after 8 verifications of 270 KB certificates"
    # The usual signer is still verified (and its certificates cached) as before.
    report, _ = verify_xml(sign_enveloped(b"<a>1</a>", ec_signer), trust)
    assert report.valid, report.to_dict()
