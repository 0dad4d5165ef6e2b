"""Detached CMS SignedData (RFC 5652), DER: signing with a KeySigner and strict verification.

What we produce: SignedData v1, eContentType id-data without eContent (detached), one SignerInfo
(issuerAndSerialNumber, SHA-256, RSA PKCS#1 v1.5 or ECDSA) with the signed attributes content
type, signing time and message digest, and the signer's certificate (plus its chain when the
signer has one). `openssl cms -verify -binary -content F` verifies it.

What we accept: the same shape; exactly one SignerInfo (its digest algorithm listed in the
SignedData's digestAlgorithms), signed attributes present with exactly one content type (= the
eContentType) and one message digest, SHA-256, RSA (2048 bits and up) or ECDSA P-256, the
signer's certificate inside the SignedData (with at most MAX_CERTIFICATES certificates in all;
others that cannot be read are skipped). The signature is checked over the DER of the signed
attributes, whatever lengths they were sent with (RFC 5652 5.4), as openssl does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.signing.base import KeySigner
from gateway.signing.errors import SignatureRefused, SigningError, clipped
from gateway.signing.validation import as_utc, load_certificate

MAX_SIGNATURE_BYTES = 1_048_576
ID_DATA = "1.2.840.113549.1.7.1"  # RFC 5652 §4: the content is plain bytes
_SIGNED_ONLY = {"1.2.840.113549.1.9.3": "content-type", "1.2.840.113549.1.9.4": "message-digest",
                "1.2.840.113549.1.9.5": "signing-time"}
MIN_RSA_BITS = 2048
# The signer's certificate and its chain are a handful; a bag of hundreds is an attack on the
# path building, not a signature.
MAX_CERTIFICATES = 32

# signatureAlgorithm values we accept in a SignerInfo, by key kind.
_RSA_ALGORITHMS = frozenset({"rsassa_pkcs1v15", "sha256_rsa"})
_ECDSA_ALGORITHMS = frozenset({"sha256_ecdsa", "ecdsa"})


class CmsError(SignatureRefused):
    """A CMS signature the profile refuses."""


@dataclass(frozen=True)
class VerifiedCms:
    """A CMS signature that is intact and made by the key of `signer` (trust not yet judged)."""

    signer: x509.Certificate
    other_certificates: tuple[x509.Certificate, ...]
    signing_time: dt.datetime | None  # the signed signing-time attribute, if present
    algorithm: str  # "rsa-sha256" | "ecdsa-sha256"


# ---------------------------------------------------------------------------------------------
# Signing


def sign_detached(
    content: bytes,
    signer: KeySigner,
    *,
    signing_time: dt.datetime | None = None,
    chain: Sequence[x509.Certificate] | None = None,
) -> bytes:
    """A detached CMS SignedData over `content`, DER-encoded. A naive `signing_time` is UTC; one
    with no UTC form raises TimeOutOfRange (a ValueError, code `time_out_of_range`)."""
    certificate = signer.checked_certificate()
    if signer.algorithm == "rsa-sha256":
        signature_algorithm = "rsassa_pkcs1v15"
    elif signer.algorithm == "ecdsa-sha256":
        signature_algorithm = "sha256_ecdsa"
    else:
        raise SigningError(f"key algorithm {signer.algorithm!r}", code="algorithm_not_allowed")
    if chain is None:
        chain = tuple(getattr(signer, "chain", ()) or ())
    # A naive time is UTC, as verification reads it (astimezone would take the host's zone);
    # one with no UTC form is TimeOutOfRange, not an OverflowError.
    when = as_utc(signing_time or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)

    attributes = [
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time", "values": [_signing_time_value(when)]}),
        cms.CMSAttribute(
            {"type": "message_digest", "values": [hashlib.sha256(content).digest()]}
        ),
    ]
    # DER: a SET OF is ordered by the encodings of its elements. Verifiers re-encode the
    # attributes before checking the signature, so any other order would not verify.
    attributes.sort(key=lambda a: a.dump())
    signed_attrs = cms.CMSAttributes(attributes)
    signature = signer.sign(signed_attrs.dump())

    asn1_cert = asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))
    sha256 = algos.DigestAlgorithm({"algorithm": "sha256"})
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({
            "issuer_and_serial_number": cms.IssuerAndSerialNumber({
                "issuer": asn1_cert.issuer,
                "serial_number": asn1_cert.serial_number,
            })
        }),
        "digest_algorithm": sha256,
        "signed_attrs": signed_attrs,
        "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": signature_algorithm}),
        "signature": signature,
    })
    certificates = [asn1_cert] + [
        asn1_x509.Certificate.load(c.public_bytes(Encoding.DER)) for c in chain
    ]
    signed_data = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [sha256],
        "encap_content_info": {"content_type": "data"},
        "certificates": certificates,
        "signer_infos": [signer_info],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()


def _signing_time_value(when: dt.datetime) -> cms.Time:
    # RFC 5652 11.3: UTCTime for the years 1950-2049, GeneralizedTime outside them (UTCTime has
    # two digits for the year and cannot say 2050).
    if 1950 <= when.year <= 2049:
        return cms.Time({"utc_time": when})
    return cms.Time({"generalized_time": when})


# ---------------------------------------------------------------------------------------------
# Verification


def verify_detached(signature_der: bytes, content: bytes | None) -> VerifiedCms:
    """Check the structure, the message digest and the signature of a CMS SignedData over
    `content` (None: the content must be inside the SignedData). Trust is judged elsewhere.

    Raises CmsError with the code and the name of the failed check.
    """
    if len(signature_der) > MAX_SIGNATURE_BYTES:
        raise CmsError("signature_malformed", f"CMS signature larger than {MAX_SIGNATURE_BYTES} bytes")
    try:
        return _verify(signature_der, content)
    except CmsError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        # asn1crypto parses lazily: a malformed structure surfaces wherever it is first read.
        # Its message can quote the offending value whole.
        raise CmsError("signature_malformed", f"not a readable CMS SignedData: {clipped(str(exc), 200)}") from None


def _verify(signature_der: bytes, content: bytes | None) -> VerifiedCms:
    info = cms.ContentInfo.load(signature_der, strict=True)
    if info["content_type"].native != "signed_data":
        raise CmsError("signature_malformed", f"content type {info['content_type'].native!r}, not signed data")
    signed_data = info["content"]
    encap = signed_data["encap_content_info"]
    content_type = encap["content_type"].dotted
    if content_type != ID_DATA:
        # A signature made for another CMS content type (a timestamp token, a receipt) is not a
        # signature over document bytes.
        raise CmsError("signature_malformed", f"content type {content_type}, not id-data")
    embedded = encap["content"]
    if isinstance(embedded, core.Void) or embedded.native is None:
        if content is None:
            raise CmsError("content_missing", "detached signature: the signed content is needed")
    else:
        embedded_bytes = embedded.native if isinstance(embedded.native, bytes) else embedded.contents
        if content is None:
            content = embedded_bytes
        elif embedded_bytes != content:
            raise CmsError("signature_invalid", "the content given differs from the content inside "
                           "the signature", "message_digest")
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise CmsError("signature_malformed", f"{len(signer_infos)} SignerInfos; exactly one is accepted")
    signer_info = signer_infos[0]
    if signer_info["digest_algorithm"]["algorithm"].native != "sha256":
        raise CmsError(
            "algorithm_not_allowed",
            f"digest algorithm {signer_info['digest_algorithm']['algorithm'].native!r}",
        )
    # RFC 5652 5.1: digestAlgorithms lists the signers' digest algorithms; openssl refuses a
    # SignedData that does not name the one its SignerInfo uses.
    if "sha256" not in {a["algorithm"].native for a in signed_data["digest_algorithms"]}:
        raise CmsError("signature_malformed", "SignedData digestAlgorithms does not list the "
                       "signer's digest algorithm (sha256)")
    signed_attrs = signer_info["signed_attrs"]
    if isinstance(signed_attrs, core.Void) or not len(signed_attrs):
        raise CmsError("signature_malformed", "signed attributes are required")
    attrs: dict[str, list] = {}
    for attribute in signed_attrs:
        attrs.setdefault(attribute["type"].dotted, []).append(attribute["values"])
    content_types = attrs.get("1.2.840.113549.1.9.3", [])
    digests = attrs.get("1.2.840.113549.1.9.4", [])
    times = attrs.get("1.2.840.113549.1.9.5", [])
    if len(content_types) != 1 or len(content_types[0]) != 1:
        raise CmsError("signature_malformed", "exactly one content-type attribute is required")
    if content_types[0][0].dotted != content_type:
        raise CmsError("signature_malformed", "the content-type attribute differs from the content type")
    if len(digests) != 1 or len(digests[0]) != 1:
        raise CmsError("signature_malformed", "exactly one message-digest attribute is required")
    if len(times) > 1 or (times and len(times[0]) != 1):
        raise CmsError("signature_malformed", "more than one signing-time attribute")
    signing_time = times[0][0].native if times else None
    unsigned = signer_info["unsigned_attrs"]
    if not isinstance(unsigned, core.Void):
        for attribute in unsigned:
            if attribute["type"].dotted in _SIGNED_ONLY:
                raise CmsError("signature_malformed", f"{_SIGNED_ONLY[attribute['type'].dotted]} "
                               "must be a signed attribute (RFC 5652 §11), it is unsigned")
    if signing_time is not None and signing_time.tzinfo is None:
        signing_time = signing_time.replace(tzinfo=dt.timezone.utc)

    certificates = _certificates(signed_data)
    signer_choice = _find_signer(signer_info["sid"], certificates)
    signer = _load_certificate(signer_choice.dump())
    others = _readable_certificates(c for c in certificates if c is not signer_choice)

    expected = digests[0][0].native
    if not isinstance(expected, bytes) or not hmac.compare_digest(
        hashlib.sha256(content).digest(), expected
    ):
        raise CmsError("signature_invalid", "the content does not match the signed message digest",
                       "message_digest")

    # The signature covers the DER of the attributes with their SET OF tag, not the [0] tag they
    # carry inside SignerInfo (RFC 5652 5.4): the DER, not the bytes received. A signature over
    # long-form or indefinite lengths is not one over the DER (openssl refuses it too), and
    # attributes signed as DER stay good when a BER encoder re-wrote their lengths.
    to_verify = _der_lengths(b"\x31" + signed_attrs.dump()[1:])
    algorithm = _verify_signature(signer, signer_info, to_verify)
    return VerifiedCms(signer=signer, other_certificates=others, signing_time=signing_time,
                       algorithm=algorithm)


def _certificates(signed_data: cms.SignedData) -> list[asn1_x509.Certificate]:
    certificates = signed_data["certificates"]
    if isinstance(certificates, core.Void):
        return []
    if len(certificates) > MAX_CERTIFICATES:
        # Each one is a candidate for the path to an anchor, and path building costs grow faster
        # than their number (hundreds of look-alike intermediates took minutes, with every other
        # verification of the process waiting on the path checks).
        raise CmsError("signature_malformed", f"{len(certificates)} certificates in the signature; "
                       f"at most {MAX_CERTIFICATES} are accepted")
    # Attribute certificates and the like are not ours to use.
    out = [choice.chosen for choice in certificates if choice.name == "certificate"]
    for cert in out:
        # Each must have the outline of a certificate, or the SignedData is malformed (openssl
        # cannot read such a one either); asn1crypto would otherwise parse it only when used.
        tbs = cert["tbs_certificate"]
        for name in _TBS_FIELDS:
            tbs[name]  # noqa: B018 - parsed on access
        cert["signature_algorithm"], cert["signature_value"]  # noqa: B018 - parsed on access
    return out


def _load_certificate(der: bytes) -> x509.Certificate:
    try:
        return load_certificate(der)
    except ValueError as exc:
        raise CmsError("certificate_malformed", f"certificate cannot be read: {exc}",
                       "signer_certificate") from None


def _readable_certificates(
    certificates: Iterable[asn1_x509.Certificate],
) -> tuple[x509.Certificate, ...]:
    """The other certificates of the bag that can be read. The bag is not signed and anyone may
    add to it: one we cannot read is no path to an anchor, not a reason to refuse a signature
    (openssl does not either); only the signer's own certificate must be readable."""
    out = []
    for cert in certificates:
        try:
            out.append(load_certificate(cert.dump()))
        except ValueError:
            continue
    return tuple(out)


def _find_signer(sid: cms.SignerIdentifier,
                 certificates: list[asn1_x509.Certificate]) -> asn1_x509.Certificate:
    for cert in certificates:
        try:
            if _names(sid, cert):
                return cert
        except (ValueError, TypeError, KeyError, IndexError):
            continue  # one that cannot be read is not the certificate named
    raise CmsError("certificate_missing", "the signer's certificate is not in the signature",
                   "signer_certificate")


def _names(sid: cms.SignerIdentifier, cert: asn1_x509.Certificate) -> bool:
    """Whether `sid` names `cert`. Raises ValueError (and the like) for one that cannot be read."""
    if sid.name == "issuer_and_serial_number":
        tbs = cert["tbs_certificate"]
        return (tbs["serial_number"].native == sid.chosen["serial_number"].native
                and tbs["issuer"].dump() == sid.chosen["issuer"].dump())
    if sid.name == "subject_key_identifier":
        extensions = load_certificate(cert.dump()).extensions
        try:
            ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return False
        return ski.value.digest == sid.chosen.native
    return False


_TBS_FIELDS = ("version", "serial_number", "signature", "issuer", "validity", "subject",
               "subject_public_key_info", "extensions")
# Nesting deeper than this is no signed attribute of any profile (and must not exhaust the stack).
_MAX_DER_DEPTH = 100


def _der_lengths(data: bytes) -> bytes:
    """One BER element with every length in its DER form (definite, shortest), the order of the
    elements and the primitive contents as they are. Raises ValueError."""
    out, end = _der_element(data, 0, len(data), 0)
    if end != len(data):
        raise ValueError("signed attributes: bytes after the element")
    return out


def _der_element(data: bytes, pos: int, limit: int, depth: int) -> tuple[bytes, int]:
    """The element at `pos`, which must end by `limit`, in DER; and where it ends."""
    if depth > _MAX_DER_DEPTH:
        raise ValueError("signed attributes nested too deeply")
    start = pos
    first = _byte(data, pos, limit)
    pos += 1
    if first & 0x1F == 0x1F:  # a tag number in the following bytes
        while _byte(data, pos, limit) & 0x80:
            pos += 1
        pos += 1
    tag = data[start:pos]
    constructed = bool(first & 0x20)
    length = _byte(data, pos, limit)
    pos += 1
    if length == 0x80:  # indefinite: children up to an end-of-contents
        if not constructed:
            raise ValueError("signed attributes: indefinite length of a primitive")
        parts = []
        while data[pos:min(pos + 2, limit)] != b"\x00\x00":
            part, pos = _der_element(data, pos, limit, depth + 1)
            parts.append(part)
        body, pos = b"".join(parts), pos + 2
    else:
        if length & 0x80:
            size = length & 0x7F
            if pos + size > limit:
                raise ValueError("signed attributes: truncated length")
            length = int.from_bytes(data[pos:pos + size], "big")
            pos += size
        end = pos + length
        if end > limit:
            raise ValueError("signed attributes: truncated")
        if constructed:
            parts = []
            while pos < end:
                part, pos = _der_element(data, pos, end, depth + 1)
                parts.append(part)
            body = b"".join(parts)
        else:
            body = data[pos:end]
        pos = end
    return tag + _der_length(len(body)) + body, pos


def _byte(data: bytes, pos: int, limit: int) -> int:
    if pos >= limit:
        raise ValueError("signed attributes: truncated")
    return data[pos]


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(size)]) + size


def _verify_signature(cert: x509.Certificate, signer_info: cms.SignerInfo, data: bytes) -> str:
    algorithm = signer_info["signature_algorithm"]["algorithm"].native
    signature = signer_info["signature"].native
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CmsError("algorithm_not_allowed", f"the certificate key cannot be used: {exc}",
                       "signature_value") from None
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm in _RSA_ALGORITHMS:
            if key.key_size < MIN_RSA_BITS:
                raise CmsError("algorithm_not_allowed", f"RSA key of {key.key_size} bits",
                               "signature_value")
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            return "rsa-sha256"
        if (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
                and algorithm in _ECDSA_ALGORITHMS):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return "ecdsa-sha256"
    except InvalidSignature:
        raise CmsError("signature_invalid", "the signature does not verify with the signer's key",
                       "signature_value") from None
    raise CmsError("algorithm_not_allowed",
                   f"signature algorithm {algorithm!r} with a {type(key).__name__} key",
                   "signature_value")


__all__ = ["CmsError", "VerifiedCms", "sign_detached", "verify_detached"]
