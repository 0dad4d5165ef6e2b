"""The one signer interface every signature format takes.

A `KeySigner` is a key held somewhere else (an HSM slot, in production a network HSM) plus its
certificate. Formats (XML-DSig, CMS, NCPDP) only ever call `sign(data)`; swapping the HSM is a
configuration change, not a code change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway.signing.errors import CertificateMismatch, SigningError

KeyType = Literal["rsa2048", "p256"]

ALGORITHM_BY_KEY_TYPE: dict[str, str] = {"rsa2048": "rsa-sha256", "p256": "ecdsa-sha256"}

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def raw_to_der_ecdsa(raw: bytes) -> bytes:
    """ECDSA r||s (what PKCS#11 CKM_ECDSA and XML-DSig carry) -> DER SEQUENCE (X.509, CMS)."""
    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


@dataclass(frozen=True)
class KeyInfo:
    """What `Hsm.list_keys()` reports of one key pair."""

    label: str
    key_type: str
    key_id: str  # hex of CKA_ID
    has_certificate: bool
    subject: str | None = None
    not_after: str | None = None


@dataclass(frozen=True, eq=False)
class KeySigner:
    """A private key that signs SHA-256 digests of data somewhere we cannot read it.

    `sign(data)` hashes `data` with SHA-256 and returns an RSA PKCS#1 v1.5 signature, or for P-256
    a DER-encoded ECDSA signature (the X.509/CMS form; XML-DSig converts it to r||s).
    """

    label: str
    key_type: str
    public_key: PublicKey
    certificate: x509.Certificate | None
    _sign: Callable[[bytes], bytes] = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def algorithm(self) -> str:
        return ALGORITHM_BY_KEY_TYPE[self.key_type]

    def sign(self, data: bytes) -> bytes:
        return self._sign(data)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Check a signature of ours with the public key (raises cryptography's InvalidSignature)."""
        if isinstance(self.public_key, rsa.RSAPublicKey):
            self.public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            self.public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))

    def checked_certificate(self) -> x509.Certificate:
        """The certificate, checked to carry this key: what every signature format embeds.

        Raises SigningError `certificate_missing`, or CertificateMismatch
        (`certificate_key_mismatch`)."""
        if self.certificate is None:
            raise SigningError(f"key {self.label!r} has no certificate", code="certificate_missing")
        if self.certificate.public_key() != self.public_key:
            raise CertificateMismatch(f"the certificate of {self.label!r} is not for its key")
        return self.certificate

    def private_key(self) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        """A cryptography private-key object whose `sign()` goes to the HSM.

        For cryptography's builders (CSR, PKCS#7); only SHA-256 is accepted, other uses raise.
        """
        if self.key_type == "rsa2048":
            return _HsmRsaKey(self)
        return _HsmEcKey(self)


def _refuse(what: str) -> NotImplementedError:
    return NotImplementedError(f"HSM-held key: {what} is not available")


class _HsmRsaKey(rsa.RSAPrivateKey):
    def __init__(self, signer: KeySigner) -> None:
        self._signer = signer

    def sign(self, data: bytes, padding: padding.AsymmetricPadding,  # noqa: A002 - cryptography's names
             algorithm: hashes.HashAlgorithm | utils.Prehashed) -> bytes:
        if not isinstance(padding, _PKCS1v15) or not isinstance(algorithm, hashes.SHA256):
            raise _refuse("signing other than PKCS#1 v1.5 with SHA-256")
        return self._signer.sign(data)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._signer.public_key  # type: ignore[return-value]

    @property
    def key_size(self) -> int:
        return self._signer.public_key.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:  # noqa: A002
        raise _refuse("decryption")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise _refuse("export")

    def private_bytes(self, *args: object, **kwargs: object) -> bytes:
        raise _refuse("export")

    def __copy__(self) -> _HsmRsaKey:
        return self

    def __deepcopy__(self, memo: dict) -> _HsmRsaKey:
        return self


_PKCS1v15 = padding.PKCS1v15


class _HsmEcKey(ec.EllipticCurvePrivateKey):
    def __init__(self, signer: KeySigner) -> None:
        self._signer = signer

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        algorithm = getattr(signature_algorithm, "algorithm", None)
        if not isinstance(signature_algorithm, ec.ECDSA) or not isinstance(algorithm, hashes.SHA256):
            raise _refuse("signing other than ECDSA with SHA-256")
        return self._signer.sign(data)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._signer.public_key  # type: ignore[return-value]

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._signer.public_key.curve  # type: ignore[union-attr]

    @property
    def key_size(self) -> int:
        return self._signer.public_key.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise _refuse("key agreement")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise _refuse("export")

    def private_bytes(self, *args: object, **kwargs: object) -> bytes:
        raise _refuse("export")

    def __copy__(self) -> _HsmEcKey:
        return self

    def __deepcopy__(self, memo: dict) -> _HsmEcKey:
        return self
