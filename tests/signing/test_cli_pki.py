"""`gateway pki ...` and `gateway keys ...` on the session home and its SoftHSM token."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gateway.cli import cli
from gateway.signing import pki
from gateway.signing.dea import dea_number_matches, read_dea_info


@pytest.fixture(scope="module")
def home(softhsm_settings):
    pki.ensure_test_pki(softhsm_settings.pki_dir)
    return softhsm_settings.home


@pytest.fixture()
def run(home):
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        return result

    return invoke


def _label(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _openssl_verify(home, cert_path) -> subprocess.CompletedProcess:
    layout = pki.PkiLayout(home / "pki")
    cmd = ["openssl", "verify", "-CAfile", str(layout.bundle), "-crl_check_all"]
    for ca in pki.CA_NAMES:
        cmd += ["-CRLfile", str(layout.crl_path(ca, pem=True))]
    return subprocess.run([*cmd, str(cert_path)], capture_output=True, text=True)


def test_ca_bundle(run, home, tmp_path):
    out = run("pki", "ca-bundle").stdout
    certs = x509.load_pem_x509_certificates(out.encode())
    assert [c.subject for c in certs] == [c.subject for c in pki.load_ca_certificates(home / "pki").values()]
    target = tmp_path / "bundle.pem"
    run("pki", "ca-bundle", "--out", str(target))
    assert target.read_text() == out


def test_ca_bundle_through_the_real_entry_point(home):
    result = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "pki", "ca-bundle"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("BEGIN CERTIFICATE") == 3


def test_ca_bundle_without_a_pki(tmp_path):
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "empty"), "pki", "ca-bundle"])
    assert result.exit_code == 1
    assert "[pki_missing]" in result.stderr


def test_concurrent_generates_of_one_label_make_one_key(home):
    """Three processes generate the same label at once: one key, two key_exists refusals (each
    looks before it creates; RSA generation leaves a wide window between the two)."""
    label = _label("cli-race")
    cmd = [sys.executable, "-m", "gateway", "--home", str(home), "keys", "generate", "--label", label,
           "--type", "rsa2048"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in results) == [0, 1, 1], results
    assert all("[key_exists]" in err for code, err in results if code == 1)
    listed = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "keys", "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()].count(label) == 1


def test_enrolment_generate_csr_issue_import_list(run, home, tmp_path):
    label = _label("cli-enrol")
    generated = json.loads(run("keys", "generate", "--label", label, "--type", "p256").stdout)
    assert generated["label"] == label and generated["key_type"] == "p256"
    again = run("keys", "generate", "--label", label, "--type", "p256", code=1)
    assert "[key_exists]" in again.stderr

    csr_pem = run("keys", "csr", "--label", label, "--subject", "CN=CLI Enrolment,O=Demo Org,C=US").stdout
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "CLI Enrolment"
    public = serialization.load_pem_public_key(generated["public_key"].encode())
    assert csr.public_key() == public
    out = tmp_path / "req.pem"
    run("keys", "csr", "--label", label, "--subject", "CN=CLI Enrolment", "--out", str(out))
    assert x509.load_pem_x509_csr(out.read_bytes()).is_signature_valid
    assert "[subject_invalid]" in run("keys", "csr", "--label", label, "--subject", "O=x", code=1).stderr
    assert "[key_not_found]" in run("keys", "csr", "--label", "nope-" + label, "--subject", "CN=x",
                                    code=1).stderr

    # The CA issues from the request (DER file this time), the holder imports the certificate.
    issued = pki.issue_certificate(home / "pki", csr, "csos-purchaser", dea_number="FD1234563")
    der = tmp_path / "cert.der"
    der.write_bytes(issued.certificate.public_bytes(serialization.Encoding.DER))
    imported = json.loads(run("keys", "import-cert", "--label", label, str(der)).stdout)
    assert imported["serial"] == str(issued.serial)
    stored = home / "keys" / f"{label}.pem"
    assert imported["certificate"] == str(stored)
    assert x509.load_pem_x509_certificate(stored.read_bytes()) == issued.certificate

    listed = json.loads(run("keys", "list", "--json").stdout)
    mine = next(k for k in listed if k["label"] == label)
    assert mine["has_certificate"] and mine["key_type"] == "p256"
    assert mine["certificate"] == str(stored)
    table = run("keys", "list").stdout
    assert label in table and "CLI Enrolment" in table


def test_import_refuses_foreign_or_broken_certificates(run, home, tmp_path):
    label = _label("cli-import")
    run("keys", "generate", "--label", label, "--type", "rsa2048")
    foreign = next(e for e in pki.load_index(home / "pki") if e.profile != "root-ca")
    result = run("keys", "import-cert", "--label", label, str(home / "pki" / foreign.path), code=1)
    assert "[certificate_key_mismatch]" in result.stderr
    assert not (home / "keys" / f"{label}.pem").exists()
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert "[certificate_unreadable]" in run("keys", "import-cert", "--label", label, str(junk), code=1).stderr


def test_pki_issue_for_an_hsm_key(run, home):
    label = _label("cli-issue")
    run("keys", "generate", "--label", label, "--type", "rsa2048")
    out = json.loads(run("pki", "issue", "--label", label, "--profile", "csos-supplier",
                         "--dea-number", "RD7654329", "--schedules", "II,C-III,4",
                         "--org", "Demo Supply Distributors", "--email", "csos@supplier.example").stdout)
    cert = x509.load_pem_x509_certificate((home / "keys" / f"{label}.pem").read_bytes())
    assert out["serial"] == str(cert.serial_number)
    assert read_dea_info(cert).schedules == frozenset({"II", "III", "IV"})
    assert dea_number_matches(cert, "RD7654329")
    assert _openssl_verify(home, home / "keys" / f"{label}.pem").returncode == 0
    assert pki.find_certificate(home / "pki", cert.serial_number).label == label

    bad_dea = run("pki", "issue", "--label", label, "--profile", "csos-supplier", "--dea-number", "RD7654320",
                  code=1)
    assert "[dea_number_check_digit]" in bad_dea.stderr
    missing = run("pki", "issue", "--label", label, "--profile", "csos-purchaser", code=1)
    assert "[dea_number_required]" in missing.stderr
    run("pki", "issue", "--label", label, "--profile", "csos-supplier", "--dea-number", "RD7654329",
        "--schedules", "II,VI", code=2)
    run("pki", "issue", "--label", label, "--profile", "tls", code=2)


def test_revoke_and_crl(run, home):
    layout = pki.PkiLayout(home / "pki")
    label = _label("cli-revoke")
    run("keys", "generate", "--label", label, "--type", "p256")
    serial = int(json.loads(run("pki", "issue", "--label", label, "--profile", "epcs-prescriber",
                                "--dea-number", "AP5836727").stdout)["serial"])
    cert_path = home / "keys" / f"{label}.pem"
    assert _openssl_verify(home, cert_path).returncode == 0

    before = x509.load_der_x509_crl(layout.crl_path(pki.EPCS_CA).read_bytes())
    # openssl's way of printing serials works too.
    hex_serial = ":".join(f"{serial:x}".zfill(16)[i:i + 2] for i in range(0, 16, 2))
    revoked = json.loads(run("pki", "revoke", "--serial", hex_serial, "--reason", "key_compromise").stdout)
    assert revoked["serial"] == str(serial) and revoked["reason"] == "key_compromise"
    after = x509.load_der_x509_crl(layout.crl_path(pki.EPCS_CA).read_bytes())
    assert after.get_revoked_certificate_by_serial_number(serial) is not None
    number = lambda crl: crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
    assert number(after) == number(before) + 1
    result = _openssl_verify(home, cert_path)
    assert result.returncode != 0 and "revoked" in result.stdout + result.stderr

    assert "[already_revoked]" in run("pki", "revoke", "--serial", str(serial), code=1).stderr
    assert "[unknown_serial]" in run("pki", "revoke", "--serial", "42", code=1).stderr
    run("pki", "revoke", "--serial", "forty-two", code=2)
    run("pki", "revoke", "--serial", str(serial), "--reason", "boredom", code=2)

    report = json.loads(run("pki", "crl").stdout)
    assert set(report) == set(pki.CA_NAMES)
    assert report[pki.EPCS_CA]["crl_number"] == number(after) + 1
    assert report[pki.EPCS_CA]["revoked"] >= 1
    fresh = x509.load_der_x509_crl(layout.crl_path(pki.EPCS_CA).read_bytes())
    assert fresh.get_revoked_certificate_by_serial_number(serial) is not None

    listed = json.loads(run("pki", "list").stdout)
    assert next(e for e in listed if e["serial"] == str(serial))["revoked_at"]


def test_an_output_that_cannot_be_written_is_a_coded_error(home, tmp_path):
    result = CliRunner().invoke(cli, ["--home", str(home), "pki", "ca-bundle", "--out",
                                      str(tmp_path / "no-such-dir" / "bundle.pem")])
    assert result.exit_code == 1
    assert "[output_unwritable]" in result.stderr
