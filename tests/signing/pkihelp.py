"""Shared fixtures of the signature-format tests: certificates from the test PKI for the session's
SoftHSM keys, trust stores, and the external verifiers (xmlsec1, openssl, signxml).

Import the fixtures into a test module (`from pkihelp import *` style imports of the names used);
pytest picks them up from the module namespace.

Keys are the lead's `rsa_key` / `ec_key` (generated inside the session's SoftHSM token); every
signature in these tests is made by the token. Certificates are issued per test where a test
needs its own (to revoke or expire it), so tests never disturb one another.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.signing import pki
from gateway.signing.base import KeySigner
from gateway.signing.validation import TrustStore

UTC = dt.timezone.utc
DEA_NUMBER = "AP5836727"
OTHER_EC_LABEL = "formats-other-ec"


@dataclass(frozen=True)
class SigningPki:
    """A test PKI directory (the session home's `pki`) and what the tests need from it."""

    directory: Path

    @property
    def layout(self) -> pki.PkiLayout:
        return pki.PkiLayout(self.directory)

    @property
    def bundle(self) -> Path:
        return self.layout.bundle

    @property
    def crl_dir(self) -> Path:
        return self.directory / "crl"

    def cert(self, ca: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.layout.cert_path(ca).read_bytes())

    def trust(self, **kwargs) -> TrustStore:
        """A fresh trust store over the bundle and the CRL directory, polling CRLs every use."""
        kwargs.setdefault("poll_seconds", 0)
        return TrustStore.from_pem_bundle(self.bundle, [self.crl_dir], **kwargs)

    def issue(self, public_key, profile: str = "csos-purchaser", **kwargs) -> pki.IssuedCertificate:
        args = dict(common_name="Formats Test Signer", organization="Formats Test Pharmacy",
                    dea_number=DEA_NUMBER)
        if profile == "epcs-pharmacy":
            args.pop("dea_number")
        args.update(kwargs)
        return pki.issue_certificate(self.directory, public_key, profile, **args)

    def signer(self, hsm, label: str, *, with_chain: bool = True, **kwargs) -> KeySigner:
        """The HSM key `label` with a newly issued certificate (and its CA in `chain`)."""
        base = hsm.signer(label)
        issued = self.issue(base.public_key, **kwargs)
        chain = (self.cert(issued.issuer_ca),) if with_chain else ()
        return dataclasses.replace(base, certificate=issued.certificate, chain=chain)

    def revoke(self, cert: x509.Certificate, reason: str = "key_compromise") -> None:
        pki.revoke(self.directory, cert.serial_number, reason)

    def crl_pem(self, ca: str = pki.CSOS_CA) -> Path:
        return self.layout.crl_path(ca, pem=True)


@pytest.fixture(scope="session")
def signing_pki(softhsm_settings) -> SigningPki:
    pki.ensure_test_pki(softhsm_settings.pki_dir)
    return SigningPki(softhsm_settings.pki_dir)


@pytest.fixture(scope="session")
def untrusted_pki(tmp_path_factory) -> SigningPki:
    directory = tmp_path_factory.mktemp("untrusted") / "pki"
    pki.untrusted_test_pki(directory)
    return SigningPki(directory)


@pytest.fixture(scope="session")
def rsa_signer(hsm, rsa_key, signing_pki) -> KeySigner:
    return signing_pki.signer(hsm, rsa_key, common_name="Formats RSA Signer")


@pytest.fixture(scope="session")
def ec_signer(hsm, ec_key, signing_pki) -> KeySigner:
    return signing_pki.signer(hsm, ec_key, common_name="Formats EC Signer")


@pytest.fixture(params=["rsa", "ec"])
def signer(request, rsa_signer, ec_signer) -> KeySigner:
    """Each test using it runs with the RSA-2048 and with the P-256 HSM key."""
    return rsa_signer if request.param == "rsa" else ec_signer


@pytest.fixture(scope="session")
def other_ec_label(hsm) -> str:
    """A second P-256 key in the token: its certificate in someone else's signature."""
    if OTHER_EC_LABEL not in {k.label for k in hsm.list_keys()}:
        hsm.generate_keypair(OTHER_EC_LABEL, "p256")
    return OTHER_EC_LABEL


@pytest.fixture()
def trust(signing_pki) -> TrustStore:
    return signing_pki.trust()


# --- external verifiers ---------------------------------------------------------------------


def xmlsec1_verify(path: Path, pki_: SigningPki, *extra: str) -> subprocess.CompletedProcess:
    """`xmlsec1 --verify` trusting the test root only (intermediates come from the signature),
    references limited to the whole document (URI="")."""
    cmd = ["xmlsec1", "--verify", "--trusted-pem", str(pki_.bundle),
           "--enabled-reference-uris", "empty", *extra, str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def openssl_cms_verify(signature: Path, content: Path, pki_: SigningPki,
                       crl: bool = False) -> subprocess.CompletedProcess:
    """`openssl cms -verify`; with `crl`, the CAs' CRLs go into the -CAfile (openssl cms has no
    -CRLfile option) and -crl_check is on."""
    ca_file = pki_.bundle
    cmd = ["openssl", "cms", "-verify", "-inform", "DER", "-in", str(signature), "-binary",
           "-content", str(content), "-purpose", "any", "-out", "/dev/null"]
    if crl:
        ca_file = signature.with_suffix(".ca-and-crls.pem")
        ca_file.write_bytes(pki_.bundle.read_bytes() + b"".join(
            pki_.layout.crl_path(ca, pem=True).read_bytes() for ca in pki.CA_NAMES))
        cmd += ["-crl_check"]
    cmd += ["-CAfile", str(ca_file)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)
