"""Enveloped XML-DSig: one profile, signed and verified strictly.

The profile (what we sign and the only thing we accept):
- one `ds:Signature`, a child of the document element, and no other Signature anywhere;
- SignedInfo: exclusive C14N 1.0 without comments; RSA-SHA256 or ECDSA-SHA256 (P-256, the
  signature value as raw r||s, 32 + 32 bytes, as XML-DSig 1.1 requires);
- one Reference with URI="" (the whole document), transforms enveloped-signature then exclusive
  C14N, digest SHA-256;
- KeyInfo/X509Data with the signer's certificate (and optionally its chain); a KeyValue only if
  it is that certificate's key, an X509CRL only if readable; no ds:Object, no Manifest, no
  RetrievalMethod, no ID-based references.

Verification hands back the tree that was digested (the document without its Signature and
without comments, which C14N leaves unsigned), never the raw input: the caller reads only what the
signature covers. This defeats signature wrapping (XSW) by construction; the structural checks make
wrapped documents fail early with a clear code.

Canonicalisation uses `etree.tostring(..., method="c14n", exclusive=True)` (C14N 1.0), not
`etree.canonicalize()`, which implements C14N 2.0.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import hashlib
import hmac
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from lxml import etree

from gateway.signing.base import KeySigner, raw_to_der_ecdsa
from gateway.signing.cms import MAX_CERTIFICATES
from gateway.signing.errors import SignatureRefused, SigningError, clipped
from gateway.signing.validation import load_certificate
from gateway.xmlsafe import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ELEMENTS,
    SMALL_DOCUMENT,
    XmlError,
    parse_xml,
)

DS_NS = "http://www.w3.org/2000/09/xmldsig#"
EC_NS = "http://www.w3.org/2001/10/xml-exc-c14n#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
ECDSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"

SIGNATURE_METHODS = {"rsa-sha256": RSA_SHA256, "ecdsa-sha256": ECDSA_SHA256}
_ALGORITHM_NAMES = {uri: name for name, uri in SIGNATURE_METHODS.items()}
MIN_RSA_BITS = 2048
P256_COORDINATE_BYTES = 32
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())  # immutable; building it costs about 1 us per verify


def _ds(local: str) -> str:
    return f"{{{DS_NS}}}{local}"


SIGNATURE = _ds("Signature")
SIGNED_INFO = _ds("SignedInfo")
C14N_METHOD = _ds("CanonicalizationMethod")
SIGNATURE_METHOD = _ds("SignatureMethod")
REFERENCE = _ds("Reference")
TRANSFORMS = _ds("Transforms")
TRANSFORM = _ds("Transform")
DIGEST_METHOD = _ds("DigestMethod")
DIGEST_VALUE = _ds("DigestValue")
SIGNATURE_VALUE = _ds("SignatureValue")
KEY_INFO = _ds("KeyInfo")
X509_DATA = _ds("X509Data")
X509_CERTIFICATE = _ds("X509Certificate")
INCLUSIVE_NAMESPACES = f"{{{EC_NS}}}InclusiveNamespaces"
KEY_VALUE = _ds("KeyValue")
RSA_KEY_VALUE = _ds("RSAKeyValue")
DSIG11_NS = "http://www.w3.org/2009/xmldsig11#"
EC_KEY_VALUE = f"{{{DSIG11_NS}}}ECKeyValue"
P256_CURVE_URI = "urn:oid:1.2.840.10045.3.1.7"
X509_CRL = _ds("X509CRL")

# KeyInfo children we tolerate and ignore (the key comes from the certificate, nowhere else).
# A KeyValue is accepted only when it is the certificate's key: other verifiers (xmlsec1) take
# the first key KeyInfo offers, and a document must not mean one signer here, another there.
_IGNORED_KEY_INFO = frozenset({_ds("KeyName")})
_IGNORED_X509_DATA = frozenset({
    _ds("X509IssuerSerial"), _ds("X509SubjectName"), _ds("X509SKI"),
})


class XmlSignatureError(SignatureRefused):
    """An XML signature the profile refuses."""


@dataclass(frozen=True)
class VerifiedXml:
    """A signature that is intact and made by the key of `signer` (trust not yet judged)."""

    tree: etree._ElementTree  # what was signed: the document without Signature and comments
    signer: x509.Certificate
    other_certificates: tuple[x509.Certificate, ...]  # the rest of X509Data: chain candidates
    algorithm: str  # "rsa-sha256" | "ecdsa-sha256"


# ---------------------------------------------------------------------------------------------
# Signing


def sign_enveloped(
    xml: bytes,
    signer: KeySigner,
    *,
    chain: Sequence[x509.Certificate] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> bytes:
    """Sign a whole XML document with an enveloped signature appended to its root element.

    KeyInfo carries the signer's certificate, then `chain` (default: the signer's `chain`, the
    intermediates it was issued under, when it has one). The limits bound the input; the signed
    document must pass verify_enveloped with the same limits, or with its defaults where those
    are larger (a small request-body limit bounds what is sent, not what comes back).

    Raises XmlError for unreadable XML or a signed document beyond the limits, SigningError for
    a document or key we will not sign.
    """
    tree = parse_xml(xml, max_bytes=max_bytes, max_depth=max_depth, max_elements=max_elements)
    signed = sign_tree(tree, signer, chain=chain)
    _check_verifiable(signed, verified_max_bytes(max_bytes), max(max_depth, DEFAULT_MAX_DEPTH),
                      max(max_elements, DEFAULT_MAX_ELEMENTS))
    return signed


def verified_max_bytes(max_bytes: int) -> int:
    """The size limit a document signed under `max_bytes` must pass verification with: that
    limit or the default, whichever is larger (a small request-body limit bounds what is sent,
    not what comes back). `sign_enveloped` checks its output against it; /v1/verify uses it."""
    return max(max_bytes, DEFAULT_MAX_BYTES)


def _check_verifiable(signed: bytes, max_bytes: int, max_depth: int, max_elements: int) -> None:
    # The Signature adds some 3 KB, 14 or more elements and a namespace declaration, and the
    # UTF-8 output of a Latin-1 input can be twice its size: an input just within the limits
    # would otherwise come back signed and be refused by verify_enveloped with the same limits.
    # Its own depth, 6, is below DEFAULT_MAX_DEPTH, the least max_depth it is checked against.
    if len(signed) <= min(max_bytes, SMALL_DOCUMENT, 4 * max_elements):
        return  # up to these sizes parse_xml counts neither elements nor namespace declarations
    try:
        parse_xml(signed, max_bytes=max_bytes, max_depth=max_depth, max_elements=max_elements)
    except XmlError as exc:
        raise XmlError(exc.code, f"signed, the document would be refused by its verifier: "
                       f"{exc.message}") from None


def sign_tree(
    tree: etree._ElementTree, signer: KeySigner, *, chain: Sequence[x509.Certificate] | None = None
) -> bytes:
    """Sign a parsed document (it is modified: the Signature is appended to its root).

    Comments and processing instructions outside the document element are dropped: whether
    URI="" covers them is where implementations disagree (xmlsec1 signs them, signxml does not),
    and a signature must verify everywhere.
    """
    root = tree.getroot()
    if root.getprevious() is not None or root.getnext() is not None:
        root = copy.deepcopy(root)  # the copy has no siblings
        tree = etree.ElementTree(root)
    if next(root.iter(SIGNATURE), None) is not None:
        raise SigningError("the document already carries an XML signature", code="already_signed")
    method = SIGNATURE_METHODS.get(signer.algorithm)
    if method is None:
        raise SigningError(f"key algorithm {signer.algorithm!r}", code="algorithm_not_allowed")
    certificates_b64 = _key_info_certificates(signer, chain)

    # The digest covers the document as it is now: appending a Signature with no tail text is
    # exactly what the enveloped-signature transform removes again.
    digest = hashlib.sha256(_c14n(tree)).digest()

    signature = etree.SubElement(root, SIGNATURE, nsmap={"ds": DS_NS})
    signed_info = etree.SubElement(signature, SIGNED_INFO)
    etree.SubElement(signed_info, C14N_METHOD, Algorithm=EXC_C14N)
    etree.SubElement(signed_info, SIGNATURE_METHOD, Algorithm=method)
    reference = etree.SubElement(signed_info, REFERENCE, URI="")
    transforms = etree.SubElement(reference, TRANSFORMS)
    etree.SubElement(transforms, TRANSFORM, Algorithm=ENVELOPED)
    etree.SubElement(transforms, TRANSFORM, Algorithm=EXC_C14N)
    etree.SubElement(reference, DIGEST_METHOD, Algorithm=SHA256)
    etree.SubElement(reference, DIGEST_VALUE).text = base64.b64encode(digest).decode()
    value = etree.SubElement(signature, SIGNATURE_VALUE)
    x509_data = etree.SubElement(etree.SubElement(signature, KEY_INFO), X509_DATA)
    for text in certificates_b64:
        etree.SubElement(x509_data, X509_CERTIFICATE).text = text

    raw = signer.sign(_c14n(signed_info))
    if signer.algorithm == "ecdsa-sha256":
        raw = der_to_raw_ecdsa(raw)
    value.text = base64.b64encode(raw).decode()
    return etree.tostring(tree, xml_declaration=True, encoding="UTF-8")


# signer -> base64 DER of its certificate and chain, once its certificate was checked against its
# key. Signers live as long as their caller keeps them (the HTTP layer: a minute), so the check
# and the encoding are paid once per signer, not once per document.
_KEY_INFO: weakref.WeakKeyDictionary[KeySigner, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _key_info_certificates(signer: KeySigner, chain: Sequence[x509.Certificate] | None) -> tuple[str, ...]:
    if chain is None:
        cached = _KEY_INFO.get(signer)
        if cached is not None:
            return cached
    certificate = signer.checked_certificate()
    certs = (certificate, *(tuple(getattr(signer, "chain", ()) or ()) if chain is None else tuple(chain)))
    texts = tuple(base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in certs)
    if chain is None:
        try:
            _KEY_INFO[signer] = texts
        except TypeError:  # a signer type that cannot be weakly referenced: no caching
            pass
    return texts


def der_to_raw_ecdsa(der: bytes, size: int = P256_COORDINATE_BYTES) -> bytes:
    """X.509/CMS ECDSA signature (DER SEQUENCE of r, s) -> XML-DSig form (r || s, fixed width)."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# ---------------------------------------------------------------------------------------------
# Verification


def verify_enveloped(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> VerifiedXml:
    """Check the structure, the reference digest and the signature value of an enveloped
    signature. Certificate trust is a separate step (gateway.signing.verify).

    Raises XmlError (unreadable XML) or XmlSignatureError (with the failed check's name).
    """
    tree = parse_xml(
        data, max_bytes=max_bytes, max_depth=max_depth, max_elements=max_elements,
        remove_comments=True,
    )
    return verify_tree(tree)


def verify_tree(tree: etree._ElementTree) -> VerifiedXml:
    """As verify_enveloped, on a tree parsed by gateway.xmlsafe with remove_comments=True.
    The tree is modified: its Signature element is removed."""
    root = tree.getroot()
    signature = _the_signature(root)
    signed_info, signature_value, key_info = _signature_parts(signature)
    # SignedInfo is canonicalised in place, before the Signature leaves the tree.
    signed_info_c14n = _c14n(signed_info)
    profile = _profile_from_c14n(signed_info_c14n)
    if profile is None:  # not the plain form: walk the elements, naming the failed check
        profile = _profile_from_elements(signed_info)
        if profile.signed_info_prefixes:
            signed_info_c14n = _c14n(signed_info, profile.signed_info_prefixes)
    raw_signature = _b64(_text(signature_value, "SignatureValue"), "SignatureValue")
    certificates, key_values = _certificates(key_info)
    signer, others = _signer_certificate(certificates)
    for key_value in key_values:
        _check_key_value(key_value, certificates)

    # Enveloped-signature transform: take the Signature element out, keeping the text after it
    # (that text is document content, not part of the signature).
    _detach(signature)
    digest = hashlib.sha256(_c14n(tree, profile.reference_prefixes)).digest()
    if not hmac.compare_digest(digest, profile.digest):
        raise XmlSignatureError(
            "signature_invalid", "the document does not match the signed digest", "reference_digest"
        )
    _verify_signature_value(certificates, profile.algorithm, raw_signature, signed_info_c14n)
    return VerifiedXml(tree=tree, signer=signer, other_certificates=others, algorithm=profile.algorithm)


def _the_signature(root: etree._Element) -> etree._Element:
    signatures = list(root.iter(SIGNATURE))
    if not signatures:
        raise XmlSignatureError("signature_missing", "the document carries no XML signature")
    if len(signatures) > 1:
        raise XmlSignatureError(
            "signature_malformed", f"{len(signatures)} Signature elements; exactly one is accepted"
        )
    signature = signatures[0]
    if signature.getparent() is not root:
        raise XmlSignatureError(
            "signature_malformed", "the Signature must be a child of the document element"
        )
    return signature


def _children(element: etree._Element, what: str) -> list[etree._Element]:
    """Element children; anything else but whitespace (text, processing instructions) is refused
    inside the signature, where it would change what SignedInfo means."""
    out: list[etree._Element] = []
    if element.text and element.text.strip():
        raise XmlSignatureError("signature_malformed", f"unexpected text in {what}")
    for child in element:
        if not isinstance(child.tag, str):
            raise XmlSignatureError("signature_malformed", f"unexpected node in {what}")
        if child.tail and child.tail.strip():
            raise XmlSignatureError("signature_malformed", f"unexpected text in {what}")
        out.append(child)
    return out


def _expect(children: list[etree._Element], tags: Sequence[str], what: str) -> None:
    if [c.tag for c in children] != list(tags):
        found = ", ".join(etree.QName(c).localname for c in children)
        wanted = ", ".join(etree.QName(t).localname for t in tags)
        raise XmlSignatureError("signature_malformed", f"{what} holds ({found}); expected ({wanted})")


def _signature_parts(signature: etree._Element):
    children = _children(signature, "Signature")
    tags = [c.tag for c in children]
    if _ds("Object") in tags:
        raise XmlSignatureError("signature_malformed", "ds:Object is not accepted")
    if tags == [SIGNED_INFO, SIGNATURE_VALUE, KEY_INFO]:
        return children[0], children[1], children[2]
    if tags == [SIGNED_INFO, SIGNATURE_VALUE]:
        raise XmlSignatureError(
            "certificate_missing", "the signature carries no certificate (KeyInfo/X509Data)",
            "signer_certificate",
        )
    _expect(children, (SIGNED_INFO, SIGNATURE_VALUE, KEY_INFO), "Signature")
    raise AssertionError("unreachable")


class _SignedInfoProfile(NamedTuple):
    """What an accepted SignedInfo says: the algorithm, the C14N parameters and the digest."""

    algorithm: str  # "rsa-sha256" | "ecdsa-sha256"
    signed_info_prefixes: tuple[str, ...] | None  # InclusiveNamespaces of CanonicalizationMethod
    reference_prefixes: tuple[str, ...] | None  # InclusiveNamespaces of the Reference's C14N
    digest: bytes


def _signed_info_form() -> re.Pattern[bytes]:
    # The exclusive C14N of the plain SignedInfo the profile accepts (no parameters, no Id or
    # Type attributes), with any namespace prefix and whitespace between the elements. C14N is
    # one fixed rendering of the element tree, so a match says everything the element walk
    # checks, at a tenth of its cost; the xmlns declaration is compared to the prefix after.
    ws = rb"[ \t\n]*"

    def tag(name: str, attribute: str = "") -> bytes:
        return b"<(?P=p)" + name.encode() + attribute.encode() + b">"

    def end(name: str) -> bytes:
        return b"</(?P=p)" + name.encode() + b">"

    def empty(name: str, algorithm: str) -> bytes:
        return tag(name, f' Algorithm="{re.escape(algorithm)}"') + end(name)

    methods = b"|".join(re.escape(uri).encode() for uri in SIGNATURE_METHODS.values())
    return re.compile(
        rb'<(?P<p>(?:[A-Za-z_][\w.-]*:)?)SignedInfo xmlns(?P<declared>(?::[A-Za-z_][\w.-]*)?)="'
        + re.escape(DS_NS).encode() + b'">' + ws
        + empty("CanonicalizationMethod", EXC_C14N) + ws
        + b'<(?P=p)SignatureMethod Algorithm="(?P<method>' + methods + b')">'
        + end("SignatureMethod") + ws
        + tag("Reference", ' URI=""') + ws + tag("Transforms") + ws
        + empty("Transform", ENVELOPED) + ws + empty("Transform", EXC_C14N) + ws
        + end("Transforms") + ws + empty("DigestMethod", SHA256) + ws
        + tag("DigestValue") + rb"(?P<digest>[A-Za-z0-9+/=]*)" + end("DigestValue") + ws
        + end("Reference") + ws + end("SignedInfo"),
    )


_SIGNED_INFO_FORM = _signed_info_form()


def _profile_from_c14n(signed_info_c14n: bytes) -> _SignedInfoProfile | None:
    """The profile of a SignedInfo in its plain form, from its canonical bytes; None otherwise."""
    match = _SIGNED_INFO_FORM.fullmatch(signed_info_c14n)
    if match is None:
        return None
    prefix, declared = match["p"], match["declared"]
    if declared != (b":" + prefix[:-1] if prefix else b""):
        return None
    digest = _b64(match["digest"], "DigestValue")
    if len(digest) != 32:
        raise XmlSignatureError("signature_malformed", "DigestValue is not a SHA-256 digest")
    return _SignedInfoProfile(_ALGORITHM_NAMES[match["method"].decode()], None, None, digest)


def _profile_from_elements(signed_info: etree._Element) -> _SignedInfoProfile:
    """The profile of any SignedInfo the profile accepts, or XmlSignatureError naming the check
    it fails."""
    c14n_method, signature_method, reference = _signed_info_parts(signed_info)
    signed_info_prefixes = _exc_c14n_prefixes(c14n_method)
    algorithm = _ALGORITHM_NAMES.get(signature_method.get("Algorithm", ""))
    if algorithm is None:
        raise XmlSignatureError(
            "algorithm_not_allowed",
            f"SignatureMethod {_shown(signature_method.get('Algorithm'))} is not accepted",
        )
    if len(signature_method):
        raise XmlSignatureError("signature_malformed", "SignatureMethod must be empty")
    reference_prefixes, digest = _reference_parts(reference)
    return _SignedInfoProfile(algorithm, signed_info_prefixes, reference_prefixes, digest)


def _signed_info_parts(signed_info: etree._Element):
    children = _children(signed_info, "SignedInfo")
    references = [c for c in children if c.tag == REFERENCE]
    if len(references) != 1:
        raise XmlSignatureError(
            "signature_malformed", f"{len(references)} References; exactly one is accepted"
        )
    _expect(children, (C14N_METHOD, SIGNATURE_METHOD, REFERENCE), "SignedInfo")
    c14n_method = children[0]
    if c14n_method.get("Algorithm") != EXC_C14N:
        raise XmlSignatureError(
            "algorithm_not_allowed",
            f"CanonicalizationMethod {_shown(c14n_method.get('Algorithm'))} is not accepted",
        )
    return children[0], children[1], children[2]


def _exc_c14n_prefixes(element: etree._Element) -> tuple[str, ...] | None:
    """The InclusiveNamespaces PrefixList of an exclusive C14N step, if any."""
    children = _children(element, "exclusive C14N parameters")
    if not children:
        return None
    if len(children) != 1 or children[0].tag != INCLUSIVE_NAMESPACES:
        raise XmlSignatureError("signature_malformed", "unexpected exclusive C14N parameters")
    prefixes = tuple((children[0].get("PrefixList") or "").split())
    if "#default" in prefixes:
        raise XmlSignatureError("signature_malformed", "PrefixList #default is not supported")
    return prefixes or None


def _reference_parts(reference: etree._Element) -> tuple[tuple[str, ...] | None, bytes]:
    # URI="" and nothing else: the whole document. "#id", XPointer or external URIs would let the
    # signed part differ from what the caller reads (signature wrapping).
    if reference.get("URI") != "":
        raise XmlSignatureError(
            "signature_malformed",
            f"Reference URI {_shown(reference.get('URI'))}: only URI=\"\" (the whole document) is accepted",
        )
    children = _children(reference, "Reference")
    _expect(children, (TRANSFORMS, DIGEST_METHOD, DIGEST_VALUE), "Reference")
    transforms, digest_method, digest_value = children
    steps = _children(transforms, "Transforms")
    _expect(steps, (TRANSFORM, TRANSFORM), "Transforms")
    if [s.get("Algorithm") for s in steps] != [ENVELOPED, EXC_C14N]:
        raise XmlSignatureError(
            "algorithm_not_allowed",
            "transforms must be enveloped-signature then exclusive C14N, found "
            + ", ".join(_shown(s.get("Algorithm")) for s in steps),
        )
    if len(steps[0]):
        raise XmlSignatureError("signature_malformed", "the enveloped-signature transform takes no parameters")
    prefixes = _exc_c14n_prefixes(steps[1])
    if digest_method.get("Algorithm") != SHA256 or len(digest_method):
        raise XmlSignatureError(
            "algorithm_not_allowed", f"DigestMethod {_shown(digest_method.get('Algorithm'))} is not accepted"
        )
    digest = _b64(_text(digest_value, "DigestValue"), "DigestValue")
    if len(digest) != 32:
        raise XmlSignatureError("signature_malformed", "DigestValue is not a SHA-256 digest")
    return prefixes, digest


def _shown(value: str | None) -> str:
    """An attribute value quoted for a report (errors.clipped)."""
    return clipped(repr(value), 100)


def _text(element: etree._Element, what: str) -> str | None:
    """The text of a value element, which holds nothing else: lxml's `.text` stops at the first
    child node (a processing instruction, say), where other verifiers read on to the end."""
    if len(element):
        raise XmlSignatureError("signature_malformed", f"{what} holds more than text")
    return element.text


def _b64(text: str | bytes | None, what: str) -> bytes:
    try:
        # Base64 on one line, as most signers write it, decodes without the whitespace pass.
        return binascii.a2b_base64(text or b"", strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    if isinstance(text, str):  # element text may wrap its base64 over lines
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            pass
    raise XmlSignatureError("signature_malformed", f"{what} is not base64")


def _certificates(key_info: etree._Element) -> tuple[tuple[str, ...], list[etree._Element]]:
    """The X509Certificate values of KeyInfo (base64, whitespace removed) and its KeyValues."""
    certificates: list[str] = []
    key_values: list[etree._Element] = []
    for child in _children(key_info, "KeyInfo"):
        if child.tag in _IGNORED_KEY_INFO:
            continue
        if child.tag == KEY_VALUE:
            key_values.append(child)
            continue
        if child.tag != X509_DATA:
            raise XmlSignatureError(
                "signature_malformed", f"KeyInfo/{etree.QName(child).localname} is not accepted"
            )
        for item in _children(child, "X509Data"):
            if item.tag == X509_CERTIFICATE:
                if len(certificates) == MAX_CERTIFICATES:
                    # As for CMS: each is a candidate for the path to an anchor, and hundreds of
                    # look-alike intermediates kept the path checks, which every verification
                    # of the process waits on, busy for seconds.
                    raise XmlSignatureError(
                        "signature_malformed", f"more than {MAX_CERTIFICATES} X509Certificate "
                        f"elements in KeyInfo; at most {MAX_CERTIFICATES} are accepted",
                    )
                certificates.append("".join((_text(item, "X509Certificate") or "").split()))
            elif item.tag == X509_CRL:
                _check_crl(item)
            elif item.tag not in _IGNORED_X509_DATA:
                raise XmlSignatureError(
                    "signature_malformed", f"X509Data/{etree.QName(item).localname} is not accepted"
                )
    if not certificates:
        raise XmlSignatureError(
            "certificate_missing", "the signature carries no X509Certificate", "signer_certificate"
        )
    return tuple(certificates), key_values


def _check_crl(item: etree._Element) -> None:
    # Revocation comes from the trust store's CRLs, not from the document; an unreadable CRL
    # makes xmlsec1 refuse the document, so it is refused here too.
    try:
        x509.load_der_x509_crl(_b64(_text(item, "X509CRL"), "X509CRL"))
    except ValueError:
        raise XmlSignatureError("signature_malformed", "X509Data/X509CRL cannot be read") from None


def _check_key_value(key_value: etree._Element, certificates: tuple[str, ...]) -> None:
    """Refuse a KeyValue that is not the public key of the signer's certificate."""
    children = _children(key_value, "KeyValue")
    try:
        key = _signer_key(certificates)
    except (ValueError, UnsupportedAlgorithm):
        return  # an unusable certificate key: the signature value step names it
    if len(children) != 1:
        matches = False
    elif children[0].tag == RSA_KEY_VALUE and isinstance(key, rsa.RSAPublicKey):
        parts = _children(children[0], "RSAKeyValue")
        numbers = key.public_numbers()
        matches = [p.tag for p in parts] == [_ds("Modulus"), _ds("Exponent")] and [
            int.from_bytes(_b64(_text(p, "RSAKeyValue"), "RSAKeyValue"), "big") for p in parts
        ] == [numbers.n, numbers.e]
    elif children[0].tag == EC_KEY_VALUE and isinstance(key, ec.EllipticCurvePublicKey):
        parts = _children(children[0], "ECKeyValue")
        point = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        matches = (
            [p.tag for p in parts] == [f"{{{DSIG11_NS}}}NamedCurve", f"{{{DSIG11_NS}}}PublicKey"]
            and parts[0].get("URI") == P256_CURVE_URI
            and _b64(_text(parts[1], "ECKeyValue"), "ECKeyValue") == point
        )
    else:
        matches = False
    if not matches:
        raise XmlSignatureError(
            "signature_malformed", "KeyInfo/KeyValue is not the key of the signer's certificate",
            "signer_certificate",
        )


# The caches below keep their keys, the certificates' base64, and what they computed: 512 sets of
# crafted certificates near the 1 MB document limit would hold over a gigabyte for the life of
# the process. A signer's certificate and chain are a few KB; larger sets are worked out anew.
_CACHED_CERTIFICATES_CHARS = 32_768


def _signer_certificate(
    encoded: tuple[str, ...],
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    if sum(map(len, encoded)) > _CACHED_CERTIFICATES_CHARS:
        return _find_signer_certificate(encoded)
    return _cached_signer_certificate(encoded)


def _find_signer_certificate(
    encoded: tuple[str, ...],
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    """The signer is the certificate that issued none of the others (the leaf of the chain); when
    unrelated CA certificates come along (a whole bundle, as xmlsec1 accepts), the one leaf that is
    not a CA. Certificates repeat across documents (one signer, many orders): each set of a usual
    size is worked out once (_cached_signer_certificate)."""
    certificates = list({c: None for c in (_load_certificate(b64) for b64 in encoded)})  # once each
    if len(certificates) == 1:
        return certificates[0], ()
    subjects_issuing = {c.issuer for c in certificates if c.issuer != c.subject}
    leaves = [c for c in certificates if c.subject not in subjects_issuing]
    if len(leaves) > 1:
        leaves = [c for c in leaves if not _is_ca(c)]
    if len(leaves) != 1:
        raise XmlSignatureError(
            "certificate_missing",
            "X509Data holds several certificates and none is clearly the signer's",
            "signer_certificate",
        )
    signer = leaves[0]
    return signer, tuple(c for c in certificates if c is not signer)


_cached_signer_certificate = functools.lru_cache(maxsize=512)(_find_signer_certificate)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _load_certificate(b64: str) -> x509.Certificate:
    try:
        return load_certificate(base64.b64decode(b64, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise XmlSignatureError(
            "certificate_malformed", f"X509Certificate cannot be read: {exc}", "signer_certificate"
        ) from None


def _verify_signature_value(
    certificates: tuple[str, ...], algorithm: str, raw: bytes, signed_info_c14n: bytes
) -> None:
    try:
        key = _signer_key(certificates)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise XmlSignatureError(
            "algorithm_not_allowed", f"the certificate key cannot be used: {exc}", "signature_value"
        ) from None
    try:
        if algorithm == "rsa-sha256":
            if not isinstance(key, rsa.RSAPublicKey):
                raise XmlSignatureError(
                    "signature_invalid", "RSA-SHA256 signature but the certificate key is not RSA",
                    "signature_value",
                )
            if key.key_size < MIN_RSA_BITS:
                raise XmlSignatureError(
                    "algorithm_not_allowed", f"RSA key of {key.key_size} bits", "signature_value"
                )
            key.verify(raw, signed_info_c14n, padding.PKCS1v15(), hashes.SHA256())
        else:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise XmlSignatureError(
                    "signature_invalid", "ECDSA-SHA256 signature but the certificate key is not EC",
                    "signature_value",
                )
            if key.curve.name != "secp256r1":  # a well-formed signature the profile does not take
                raise XmlSignatureError(
                    "algorithm_not_allowed", f"ECDSA key on {key.curve.name}; only P-256 is accepted",
                    "signature_value",
                )
            if len(raw) != 2 * P256_COORDINATE_BYTES:
                raise XmlSignatureError(
                    "signature_invalid", "ECDSA SignatureValue must be r||s, 64 bytes",
                    "signature_value",
                )
            key.verify(raw_to_der_ecdsa(raw), signed_info_c14n, _ECDSA_SHA256)
    except InvalidSignature:
        raise XmlSignatureError(
            "signature_invalid", "the signature value does not verify with the certificate key",
            "signature_value",
        ) from None


def _signer_key(encoded: tuple[str, ...]):
    if sum(map(len, encoded)) > _CACHED_CERTIFICATES_CHARS:
        return _find_signer_certificate(encoded)[0].public_key()
    return _cached_signer_key(encoded)


@functools.lru_cache(maxsize=512)
def _cached_signer_key(encoded: tuple[str, ...]):
    # Keyed like _signer_certificate: hashing a Certificate hashes its DER on every lookup, a
    # tuple of strings reuses the hashes its strings already computed.
    return _cached_signer_certificate(encoded)[0].public_key()


def _detach(element: etree._Element) -> None:
    parent = element.getparent()
    tail = element.tail
    if tail:
        previous = element.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + tail
        else:
            parent.text = (parent.text or "") + tail
    parent.remove(element)


def _c14n(node: etree._Element | etree._ElementTree, prefixes: Sequence[str] | None = None) -> bytes:
    try:
        return etree.tostring(
            node, method="c14n", exclusive=True, with_comments=False, inclusive_ns_prefixes=prefixes
        )
    except etree.C14NError:
        # libxml2 refuses e.g. a relative namespace URI (xmlns="relative"), which C14N forbids:
        # such a document can be neither signed nor verified.
        raise XmlError("malformed_xml", "the document cannot be canonicalised (exclusive C14N): "
                       "a relative namespace URI or another construct C14N refuses") from None

__all__ = [
    "DS_NS", "ECDSA_SHA256", "EXC_C14N", "RSA_SHA256", "SHA256",
    "KeySigner", "SigningError", "VerifiedXml", "XmlError", "XmlSignatureError",
    "der_to_raw_ecdsa", "raw_to_der_ecdsa", "sign_enveloped", "sign_tree", "verify_enveloped",
    "verify_tree",
]
