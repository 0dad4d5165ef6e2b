"""`gateway sign` and `gateway verify`, run as the real command against the session home."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
import threading

import pytest
from pkihelp import (  # noqa: F401 - fixtures
    openssl_cms_verify,
    signing_pki,
    xmlsec1_verify,
)

ORDER = (b'<?xml version="1.0" encoding="UTF-8"?>\n<CSOSOrder xmlns="urn:csos-gateway:order:1">'
         b"<OrderNumber>26X000888</OrderNumber></CSOSOrder>\n")
UTC = dt.timezone.utc


def gateway(home, *args: str, env: dict | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), *args],
                          capture_output=True, timeout=120, env={**os.environ, **(env or {})},
                          preexec_fn=preexec_fn)


def audit_events(database_url: str) -> list:
    from gateway.storage import storage_for_url

    async def read() -> list:
        async with storage_for_url(database_url) as storage:
            return await storage.audit_records(after_seq=0, limit=1000)

    return asyncio.run(read())


@pytest.fixture(scope="module")
def cli_keys(hsm, softhsm_settings, signing_pki):
    """Two keys of the session token with certificates stored next to them, as enrolment does."""
    labels = {}
    for key_type in ("rsa2048", "p256"):
        label = f"formats-cli-{key_type}"
        if label not in {k.label for k in hsm.list_keys()}:
            hsm.generate_keypair(label, key_type)
        cert = signing_pki.issue(hsm.public_key(label), common_name=f"CLI {key_type}").certificate
        hsm.store_certificate(label, cert)
        labels[key_type] = label
    return labels


@pytest.fixture()
def home(softhsm_settings):
    return softhsm_settings.home


@pytest.fixture()
def order_file(tmp_path):
    path = tmp_path / "order.xml"
    path.write_bytes(ORDER)
    return path


def report_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout)


@pytest.mark.parametrize("key_type", ["rsa2048", "p256"])
def test_sign_and_verify_xmldsig(key_type, cli_keys, home, order_file, tmp_path, signing_pki):
    out = tmp_path / "signed.xml"
    result = gateway(home, "sign", "--key", cli_keys[key_type], "--format", "xmldsig",
                     "--out", str(out), str(order_file))
    assert result.returncode == 0, result.stderr
    result = gateway(home, "verify", str(out))
    assert result.returncode == 0, result.stdout
    report = report_of(result)
    assert report["valid"] is True and report["indication"] == "TOTAL_PASSED"
    assert report["signature_algorithm"] == {"rsa2048": "rsa-sha256", "p256": "ecdsa-sha256"}[key_type]
    assert report["signer"]["subject"].endswith("C=US")
    # The signature carries the CSOS CA, so a verifier given only the root builds the path.
    assert xmlsec1_verify(out, signing_pki).returncode == 0


def test_sign_to_stdout(cli_keys, home, order_file):
    result = gateway(home, "sign", "--key", cli_keys["p256"], "--format", "xmldsig", str(order_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"<?xml") and b"SignatureValue" in result.stdout


@pytest.mark.parametrize("key_type", ["rsa2048", "p256"])
def test_sign_and_verify_cms(key_type, cli_keys, home, order_file, tmp_path, signing_pki):
    out = tmp_path / "order.p7s"
    result = gateway(home, "sign", "--key", cli_keys[key_type], "--format", "cms", "--out", str(out),
                     str(order_file))
    assert result.returncode == 0, result.stderr
    result = gateway(home, "verify", "--content", str(order_file), str(out))
    assert result.returncode == 0, result.stdout
    report = report_of(result)
    assert report["format"] == "cms" and report["signing_time_source"] == "signed-attribute"
    assert openssl_cms_verify(out, order_file, signing_pki, crl=True).returncode == 0
    # Other content: invalid.
    other = tmp_path / "other.xml"
    other.write_bytes(ORDER.replace(b"888", b"889"))
    result = gateway(home, "verify", "--content", str(other), str(out))
    assert result.returncode == 1
    assert report_of(result)["sub_indication"] == "HASH_FAILURE"
    # No content: the input cannot be verified.
    result = gateway(home, "verify", str(out))
    assert result.returncode == 2
    assert report_of(result)["code"] == "content_missing"


def test_verify_tampered_is_invalid(cli_keys, home, order_file, tmp_path):
    out = tmp_path / "signed.xml"
    assert gateway(home, "sign", "--key", cli_keys["p256"], "--format", "xmldsig", "--out", str(out),
                   str(order_file)).returncode == 0
    out.write_bytes(out.read_bytes().replace(b"26X000888", b"26X000999"))
    result = gateway(home, "verify", str(out))
    assert result.returncode == 1
    report = report_of(result)
    assert report["valid"] is False and report["code"] == "signature_invalid"
    assert [c["name"] for c in report["checks"] if c["passed"] is False] == ["reference_digest"]


def test_verify_at_a_time(cli_keys, home, order_file, tmp_path):
    out = tmp_path / "signed.xml"
    assert gateway(home, "sign", "--key", cli_keys["p256"], "--format", "xmldsig", "--out", str(out),
                   str(order_file)).returncode == 0
    before_issue = (dt.datetime.now(UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = gateway(home, "verify", "--at", before_issue, str(out))
    assert result.returncode == 1
    report = report_of(result)
    assert report["code"] == "certificate_not_yet_valid"
    assert report["signing_time_source"] == "caller"
    result = gateway(home, "verify", "--at", "yesterday-ish", str(out))
    assert result.returncode == 2 and b"--at" in result.stderr


def test_verify_hostile_and_unusable_input(home, tmp_path):
    hostile = tmp_path / "xxe.xml"
    hostile.write_bytes(b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>')
    result = gateway(home, "verify", str(hostile))
    assert result.returncode == 2
    assert report_of(result)["code"] == "xml_dtd_forbidden"
    assert b"root:" not in result.stdout
    unsigned = tmp_path / "unsigned.xml"
    unsigned.write_bytes(ORDER)
    result = gateway(home, "verify", str(unsigned))
    assert result.returncode == 1 and report_of(result)["code"] == "signature_missing"
    result = gateway(home, "verify", str(tmp_path / "missing.xml"))
    assert result.returncode == 2 and b"[file_unreadable]" in result.stderr


def test_verify_without_trust_bundle(tmp_path, order_file):
    result = gateway(tmp_path / "empty-home", "verify", str(order_file))
    assert result.returncode == 2
    assert b"[trust_unavailable]" in result.stderr


def test_sign_refusals(cli_keys, home, order_file, tmp_path):
    result = gateway(home, "sign", "--key", "no-such-key", "--format", "xmldsig", str(order_file))
    assert result.returncode == 1 and b"[key_not_found]" in result.stderr
    bad = tmp_path / "bad.xml"
    bad.write_bytes(b"<a><b></a>")
    out = tmp_path / "never.xml"
    result = gateway(home, "sign", "--key", cli_keys["p256"], "--format", "xmldsig", "--out", str(out), str(bad))
    assert result.returncode == 2 and b"[malformed_xml]" in result.stderr
    assert not out.exists()  # nothing half-written
    result = gateway(home, "sign", "--key", cli_keys["p256"], "--format", "pdf", str(order_file))
    assert result.returncode == 2


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_write_leaves_out_and_the_input_as_they_were(cli_keys, home, order_file, tmp_path):
    """A write that fails half-way (here: a file size limit) used to leave a truncated signed
    document in --out, destroying what was there, the input itself when --out named it."""
    env = {"GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.sqlite3'}"}
    previous = tmp_path / "previous.xml"
    previous.write_bytes(b"<kept/>")
    for out in (previous, order_file):  # an existing file, then --out equal to FILE
        result = gateway(home, "sign", "--key", cli_keys["rsa2048"], "--format", "xmldsig",
                         "--out", str(out), str(order_file), env=env, preexec_fn=_file_size_limit(1024))
        assert result.returncode == 2, result.stderr
        assert b"[output_unwritable]" in result.stderr and b"Traceback" not in result.stderr
    assert previous.read_bytes() == b"<kept/>"
    assert order_file.read_bytes() == ORDER
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    # Without the limit, signing a file onto itself works and keeps its permissions.
    order_file.chmod(0o640)
    result = gateway(home, "sign", "--key", cli_keys["rsa2048"], "--format", "xmldsig",
                     "--out", str(order_file), str(order_file), env=env)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(order_file.stat().st_mode) == 0o640
    assert gateway(home, "verify", str(order_file)).returncode == 0


def test_out_into_a_missing_directory_is_unusable_input(cli_keys, home, order_file, tmp_path):
    result = gateway(home, "sign", "--key", cli_keys["p256"], "--format", "cms",
                     "--out", str(tmp_path / "missing" / "order.p7s"), str(order_file))
    assert result.returncode == 2 and b"[output_unwritable]" in result.stderr
    assert b"Traceback" not in result.stderr


def test_out_to_a_pipe_is_written_not_replaced(cli_keys, home, order_file, tmp_path):
    fifo = tmp_path / "signed.pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = gateway(home, "sign", "--key", cli_keys["p256"], "--format", "xmldsig",
                     "--out", str(fifo), str(order_file))
    reader.join(30)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert received and b"SignatureValue" in received[0]


def test_verify_at_a_time_with_no_utc_form_is_a_bad_option(cli_keys, home, order_file, tmp_path):
    out = tmp_path / "signed.xml"
    assert gateway(home, "sign", "--key", cli_keys["p256"], "--format", "xmldsig", "--out", str(out),
                   str(order_file)).returncode == 0
    for at in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        result = gateway(home, "verify", "--at", at, str(out))
        assert result.returncode == 2, result.stderr
        assert b"--at" in result.stderr and b"Traceback" not in result.stderr


def test_cli_signatures_and_refusals_are_audited(cli_keys, home, order_file, tmp_path):
    """21 CFR 1311.150: a signature made with an HSM key from the command line, and every refused
    attempt (a wrong PIN included), is in the audit trail as it is for the HTTP API."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    env = {"GATEWAY_DATABASE_URL": url}
    out = tmp_path / "order.p7s"
    assert gateway(home, "sign", "--key", cli_keys["p256"], "--format", "cms", "--out", str(out),
                   str(order_file), env=env).returncode == 0
    assert gateway(home, "sign", "--key", "no-such-key", "--format", "cms", str(order_file),
                   env=env).returncode == 1
    assert gateway(home, "sign", "--key", cli_keys["p256"], "--format", "cms", str(order_file),
                   env={**env, "GATEWAY_HSM_PIN": "000000"}).returncode == 1
    events = [(e.event_type, e.actor, e.outcome, e.subject, e.details.get("code"))
              for e in audit_events(url)]
    assert events == [
        ("document.signed", "cli", "success", cli_keys["p256"], None),
        ("sign.refused", "cli", "refused", "no-such-key", "key_not_found"),
        ("sign.refused", "cli", "refused", cli_keys["p256"], "hsm_login_failed"),
    ]
    signed = audit_events(url)[0].details
    assert signed["content_sha256"] == hashlib.sha256(ORDER).hexdigest()
    assert signed["signature_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_a_signature_stdout_could_not_take_is_audited_as_undelivered(cli_keys, home, order_file, tmp_path):
    """`gateway sign ... | head -c 10`: the reader goes away, the write fails with a broken
    pipe. The signature was made with the HSM key and must be in the trail; it was a traceback
    and no audit record."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "sign", "--key",
                                 cli_keys["p256"], "--format", "cms", str(order_file)],
                                stdout=write_end, stderr=subprocess.PIPE, timeout=120,
                                env={**os.environ, "GATEWAY_DATABASE_URL": url})
    finally:
        os.close(write_end)
    assert result.returncode == 2
    assert b"output_unwritable" in result.stderr and b"Traceback" not in result.stderr
    assert result.stderr.count(b"\n") == 1, result.stderr  # no second complaint at exit
    [event] = audit_events(url)
    assert (event.event_type, event.outcome, event.details["code"]) == ("document.signed", "failure",
                                                                          "output_unwritable")


def test_sign_with_standard_output_closed_is_refused_before_the_hsm(cli_keys, home, order_file, tmp_path):
    """`gateway sign ... >&-`: Python starts with sys.stdout None. That was an AttributeError
    traceback after the HSM had signed, with no audit record of the signature; now the command
    is refused before the key is used (like an --out that cannot be written)."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    result = subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), "sign", "--key",
                             cli_keys["p256"], "--format", "cms", str(order_file)],
                            stderr=subprocess.PIPE, timeout=120, preexec_fn=lambda: os.close(1),
                            env={**os.environ, "GATEWAY_DATABASE_URL": url})
    assert result.returncode == 2, result.stderr
    assert b"[output_unwritable]" in result.stderr and b"Traceback" not in result.stderr
    assert audit_events(url) == []  # the key was not used
