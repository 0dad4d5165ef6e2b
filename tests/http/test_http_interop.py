"""What the HTTP API signs verifies with tools nobody here wrote, trusting only the test root:
the intermediates travel inside the signature."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.http.conftest import HTTP_EC, HTTP_RSA

ORDER = (b'<?xml version="1.0" encoding="UTF-8"?>\n<CSOSOrder xmlns="urn:csos-gateway:order:1">'
         b"<OrderNumber>26X%06d</OrderNumber><Items><Item line=\"1\"><NDC>00406-0552-01</NDC>"
         b"<PackageSize>100</PackageSize><Packages>2</Packages></Item></Items></CSOSOrder>")


def _root_only(settings, tmp_path: Path) -> Path:
    """The first certificate of the bundle: the root (xmlsec1 reads one certificate per file)."""
    bundle = settings.trust_bundle_path.read_text()
    root = bundle.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    path = tmp_path / "root.pem"
    path.write_text(root)
    return path


@pytest.mark.parametrize("label", [HTTP_RSA, HTTP_EC])
async def test_xmlsec1_verifies_http_signed_xml_with_the_root_alone(gw, label: str, tmp_path: Path) -> None:
    resp = await gw.http.post(f"/v1/sign?key={label}&format=xmldsig", data=ORDER % (31 if label == HTTP_RSA else 32),
                              headers={**gw.auth("purchaser"), "Content-Type": "application/xml"})
    assert resp.status == 200, await resp.text()
    signed = tmp_path / "signed.xml"
    signed.write_bytes(await resp.read())
    proc = subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(_root_only(gw.settings, tmp_path)),
                           "--enabled-reference-uris", "empty", str(signed)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "OK" in proc.stdout + proc.stderr


async def test_openssl_verifies_http_signed_cms_with_the_root_alone(gw, tmp_path: Path) -> None:
    content = b"detached content for openssl cms\n"
    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}&format=cms", data=content,
                              headers={**gw.auth("purchaser"), "Content-Type": "application/octet-stream"})
    assert resp.status == 200, await resp.text()
    sig, data = tmp_path / "sig.p7s", tmp_path / "content.bin"
    sig.write_bytes(await resp.read())
    data.write_bytes(content)
    proc = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(sig), "-binary",
                           "-content", str(data), "-purpose", "any", "-out", "/dev/null",
                           "-CAfile", str(_root_only(gw.settings, tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-1500:]
    data.write_bytes(content + b"tampered")
    proc = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(sig), "-binary",
                           "-content", str(data), "-purpose", "any", "-out", "/dev/null",
                           "-CAfile", str(_root_only(gw.settings, tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
