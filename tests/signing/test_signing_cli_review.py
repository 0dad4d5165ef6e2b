"""Review of the signing API and its command line: `keys csr` audited, `--out` of the key and PKI
commands written whole or not at all, malformed DEA extensions refused by code, times with no
UTC form a ValueError with our code. Run against the session's SoftHSM token and test PKI."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pkihelp import ec_signer, signing_pki  # noqa: F401 - fixtures
from test_cli_signing import ORDER, _file_size_limit, audit_events, cli_keys, gateway  # noqa: F401 - fixtures too
from test_enrol import own_identity  # noqa: F401 - fixture

from gateway.signing import pki
from gateway.signing.cms import sign_detached
from gateway.signing.dea import OID_SCHEDULES, read_dea_info
from gateway.signing.enrol import certificate_path, issue_demo_identities
from gateway.signing.errors import TimeOutOfRange
from gateway.signing.validation import as_utc

NO_UTC_FORM = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))


@pytest.fixture()
def home(softhsm_settings):
    return softhsm_settings.home


@pytest.fixture()
def audit_env(tmp_path):
    """A database of the test's own, so that its audit records are the only ones."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    return url, {"GATEWAY_DATABASE_URL": url}


@pytest.fixture()
def fresh_key(hsm):
    label = f"review-{uuid.uuid4().hex[:8]}"
    hsm.generate_keypair(label, "p256")
    return label


def _events(url: str, event_type: str) -> list:
    return [e for e in audit_events(url) if e.event_type == event_type]


# --- keys csr: an enrolment step in the audit trail --------------------------------------------

def test_keys_csr_success_and_refusals_are_audited(home, hsm, fresh_key, audit_env, tmp_path):
    url, env = audit_env
    out = tmp_path / "req.csr"
    result = gateway(home, "keys", "csr", "--label", fresh_key, "--subject", "CN=Review,O=Review,C=US",
                     "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    csr = x509.load_pem_x509_csr(out.read_bytes())
    assert csr.is_signature_valid
    assert gateway(home, "keys", "csr", "--label", "no-such-key", "--subject", "CN=X", env=env).returncode == 1
    result = gateway(home, "keys", "csr", "--label", fresh_key, "--subject", "O=no common name", env=env)
    assert result.returncode == 1 and b"[subject_invalid]" in result.stderr
    events = _events(url, "key.csr_created")
    assert [(e.actor, e.outcome, e.subject, e.details.get("code")) for e in events] == [
        ("cli", "success", fresh_key, None),
        ("cli", "failure", "no-such-key", "key_not_found"),
        ("cli", "failure", fresh_key, "subject_invalid"),
    ]
    done = events[0].details
    assert done["csr_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    public = hsm.public_key(fresh_key).public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    assert done["spki_sha256"] == hashlib.sha256(public).hexdigest()
    assert done["out"] == str(out)


# --- --out of keys csr and pki ca-bundle: whole or not at all -----------------------------------

def test_key_and_pki_out_files_are_never_half_written(home, fresh_key, audit_env, tmp_path, initialized_home):
    """A write that fails half-way (here a file size limit) truncated the previous file to a
    piece of PEM; it now fails whole with output_unwritable and the previous file stays."""
    _url, env = audit_env  # the limit is no place to write the session's database
    previous = tmp_path / "previous.pem"
    previous.write_bytes(b"kept\n")
    # 1024 bytes: the SoftHSM token rewrites its token.object (smaller) in place, and a lower
    # limit would cut it. The request is made longer than that by its subject.
    limit = _file_size_limit(1024)
    subject = "CN=Review,O=" + "x" * 1000
    result = gateway(home, "keys", "csr", "--label", fresh_key, "--subject", subject,
                     "--out", str(previous), env=env, preexec_fn=limit)
    assert result.returncode == 1 and b"[output_unwritable]" in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr
    result = gateway(home, "pki", "ca-bundle", "--out", str(previous), env=env, preexec_fn=limit)
    assert result.returncode == 1 and b"[output_unwritable]" in result.stderr, result.stderr
    assert previous.read_bytes() == b"kept\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    # Without the limit both replace the file with the whole document.
    assert gateway(home, "keys", "csr", "--label", fresh_key, "--subject", subject,
                   "--out", str(previous)).returncode == 0
    assert x509.load_pem_x509_csr(previous.read_bytes()).is_signature_valid
    assert gateway(home, "pki", "ca-bundle", "--out", str(previous)).returncode == 0
    assert len(x509.load_pem_x509_certificates(previous.read_bytes())) >= 3


# --- keys import-cert: a file that is no certificate is a refusal in the trail -----------------

def test_import_of_something_that_is_no_certificate_is_audited(home, fresh_key, audit_env, tmp_path):
    url, env = audit_env
    not_a_cert = tmp_path / "order.xml"
    not_a_cert.write_bytes(ORDER)
    result = gateway(home, "keys", "import-cert", "--label", fresh_key, str(not_a_cert), env=env)
    assert result.returncode == 1 and b"[certificate_unreadable]" in result.stderr
    # A file that exists but cannot be read was a traceback.
    result = gateway(home, "keys", "import-cert", "--label", fresh_key, "/proc/self/mem", env=env)
    assert result.returncode == 1 and b"[file_unreadable]" in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr
    events = _events(url, "key.certificate_imported")
    assert [(e.outcome, e.subject, e.details["code"], e.details["file"]) for e in events] == [
        ("failure", fresh_key, "certificate_unreadable", str(not_a_cert)),
        ("failure", fresh_key, "file_unreadable", "/proc/self/mem"),
    ]


# --- malformed DEA extensions ----------------------------------------------------------------------

def _with_malformed_schedules(settings, cert: x509.Certificate) -> x509.Certificate:
    """`cert` again, same serial and CA, its schedules extension no bit string: what a CA
    signing someone else's encoding could hand out."""
    issuer_ca = pki.find_certificate(settings.pki_dir, cert.serial_number).issuer_ca
    ca_key = serialization.load_pem_private_key(
        pki.PkiLayout(settings.pki_dir).key_path(issuer_ca).read_bytes(), None)
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for ext in cert.extensions:
        value = ext.value
        if ext.oid == OID_SCHEDULES:
            value = x509.UnrecognizedExtension(OID_SCHEDULES, b"\x04\x01\xff")  # an OCTET STRING
        builder = builder.add_extension(value, critical=ext.critical)
    return builder.sign(ca_key, hashes.SHA256())


def test_import_of_a_certificate_with_malformed_dea_extensions_is_refused(
        home, hsm, softhsm_settings, fresh_key, audit_env, tmp_path):
    url, env = audit_env
    pki.ensure_test_pki(softhsm_settings.pki_dir)
    good = pki.issue_certificate(softhsm_settings.pki_dir, hsm.public_key(fresh_key), "csos-purchaser",
                                 common_name="Review", dea_number="FD1234563").certificate
    path = tmp_path / "good.pem"
    path.write_bytes(good.public_bytes(serialization.Encoding.PEM))
    assert gateway(home, "keys", "import-cert", "--label", fresh_key, str(path), env=env).returncode == 0
    bad = _with_malformed_schedules(softhsm_settings, good)
    bad.verify_directly_issued_by(pki.load_ca_certificates(softhsm_settings.pki_dir)[pki.CSOS_CA])
    path.write_bytes(bad.public_bytes(serialization.Encoding.PEM))
    result = gateway(home, "keys", "import-cert", "--label", fresh_key, str(path), env=env)
    assert result.returncode == 1 and b"[dea_extension_malformed]" in result.stderr, result.stderr
    assert hsm.certificate(fresh_key) == good  # the key's good certificate stays
    assert certificate_path(softhsm_settings, fresh_key).read_bytes() == good.public_bytes(
        serialization.Encoding.PEM)
    codes = [(e.outcome, e.details.get("code")) for e in _events(url, "key.certificate_imported")]
    assert codes == [("success", None), ("failure", "dea_extension_malformed")]


def test_a_stored_certificate_with_malformed_dea_extensions_is_reissued(own_identity, softhsm_settings, hsm):
    """`_still_fits` read the DEA extensions unguarded: `gateway init` stopped on DeaExtensionError
    when a key's certificate from this PKI carried a malformed one."""
    first = issue_demo_identities(softhsm_settings, hsm, [own_identity])["enrol_test"]
    label = own_identity.label
    good = hsm.certificate(label)
    bad = _with_malformed_schedules(softhsm_settings, good)
    hsm.store_certificate(label, bad)  # as a tool other than install_certificate could leave it
    certificate_path(softhsm_settings, label).write_bytes(bad.public_bytes(serialization.Encoding.PEM))
    again = issue_demo_identities(softhsm_settings, hsm, [own_identity])["enrol_test"]
    assert again["serial"] != first["serial"]
    assert read_dea_info(hsm.certificate(label)).schedules  # well-formed again


# --- times with no UTC form ---------------------------------------------------------------------

def test_a_signing_time_with_no_utc_form_is_a_value_error_with_our_code(ec_signer, signing_pki):
    with pytest.raises(ValueError) as info:
        sign_detached(b"content", ec_signer, signing_time=NO_UTC_FORM)
    assert isinstance(info.value, TimeOutOfRange) and info.value.code == "time_out_of_range"
    with pytest.raises(TimeOutOfRange):
        as_utc(NO_UTC_FORM)
    with pytest.raises(TimeOutOfRange):
        signing_pki.trust().validate_certificate(ec_signer.certificate, at=NO_UTC_FORM)
    # In range, the same call signs.
    assert sign_detached(b"content", ec_signer, signing_time=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))


def test_verify_with_an_empty_time_is_a_bad_option(cli_keys, home, tmp_path):
    """`--at "$WHEN"` with WHEN unset judged the signature now, silently."""
    order = tmp_path / "order.xml"
    order.write_bytes(ORDER)
    out = tmp_path / "signed.xml"
    assert gateway(home, "sign", "--key", cli_keys["p256"], "--format", "xmldsig", "--out", str(out),
                   str(order)).returncode == 0
    result = gateway(home, "verify", "--at", "", str(out))
    assert result.returncode == 2 and b"--at" in result.stderr
    assert result.stdout == b""


# --- pki revoke ------------------------------------------------------------------------------------

def test_revoke_names_its_refusals(home, initialized_home, softhsm_settings, audit_env):
    url, env = audit_env
    [root] = [e for e in pki.load_index(softhsm_settings.pki_dir) if e.profile == "root-ca"]
    result = gateway(home, "pki", "revoke", "--serial", str(root.serial), env=env)
    assert result.returncode == 1 and b"[root_not_revocable]" in result.stderr, result.stderr
    [event] = _events(url, "pki.certificate_revoked")
    assert (event.outcome, event.details["code"]) == ("failure", "root_not_revocable")
    for serial in ("12ab", "-5", f"{root.serial:_}", "\uff11\uff12"):  # "1_000" and "１２" were numbers
        result = gateway(home, "pki", "revoke", "--serial", serial, env=env)
        assert result.returncode == 2, (serial, result.stderr)
        assert b"--serial" in result.stderr and b"Traceback" not in result.stderr
    assert len(_events(url, "pki.certificate_revoked")) == 1  # none of them reached the PKI
    # The documented forms all name the same certificate.
    for serial in (f"0x{root.serial:x}", ":".join(f"{root.serial:x}"[i:i + 2] for i in range(0, 16, 2))):
        result = gateway(home, "pki", "revoke", "--serial", serial.upper(), env=env)
        assert b"[root_not_revocable]" in result.stderr, (serial, result.stderr)
