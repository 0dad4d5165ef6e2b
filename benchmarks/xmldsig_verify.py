"""XML-DSig verifications per second: the gateway's verifier against signxml's XMLVerifier.

    python -m benchmarks.xmldsig_verify [--docs 40] [--rounds 5] [--seconds 0.6] [--results-dir DIR]

Same documents (CSOS-order-sized XML, 20 items, signed by SoftHSM keys, RSA-2048 and P-256, the
CSOS CA certificate in KeyInfo), same certificates, same trust (the test PKI's bundle), one
thread. Variants are interleaved round by round so that load from other processes hits all of
them alike; the rate shown is the median round, the ratio the median of the per-round ratios:

With chain validation
- ours: `verify_xml(doc, trust)` with a long-lived TrustStore (as the server keeps one):
  hardened parse (no DTD, depth/size limits), strict profile checks (one Signature child of the
  root, URI="", allowed algorithms, no Object), SHA-256 digest, signature value, and the signer's
  path to the root with validity at the signing time, key usage and CRL revocation of every
  certificate (pyhanko-certvalidator; the outcome is reused while the certificate, the CRL state
  and the validity window are unchanged), and a JSON-ready report.
- ours, no result reuse: the same, with the chain-validation cache emptied before each call
  (pyhanko-certvalidator runs every time; parsed certificates and CRLs are still reused).
- signxml: `XMLVerifier().verify(doc, ca_pem_file=bundle)`: parse, XSD validation of the
  Signature, digest, signature value, path to the root with validity now and digitalSignature
  key usage (cryptography's verifier; signxml reads the bundle file on every call); no CRLs.

Without chain validation
- ours: `xmldsig.verify_enveloped(doc)`: parse, profile checks, digest, signature value with the
  key of the certificate in KeyInfo; no trust, no validity dates.
- signxml: `XMLVerifier().verify(doc, x509_cert=cert)` with the signer certificate pinned:
  parse, XSD validation, digest, signature value, validity dates of the pinned certificate.

Target (issue 2): ours at least 3x signxml, with and without chain validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

from cryptography import x509
from signxml import XMLVerifier

from benchmarks.common import BenchmarkError, add_results_option, positive, run_main, scratch, table, write_results
from gateway.config import load_settings, write_default_config
from gateway.signing import pki
from gateway.signing.hsm import Hsm
from gateway.signing.softhsm import ensure_softhsm_token, point_environment_at
from gateway.signing.validation import TrustStore
from gateway.signing.verify import verify_xml
from gateway.signing.xmldsig import sign_enveloped, verify_enveloped

TARGET = 3.0


def order_document(n: int) -> bytes:
    items = "".join(
        f'\n    <Item line="{i}"><NDC>{10000 + n:05d}-{i:04d}-01</NDC><ProductName>Product {i}</ProductName>'
        f"<Strength>{5 * i} mg</Strength><PackageSize>100</PackageSize><Packages>{1 + (n + i) % 7}</Packages></Item>"
        for i in range(1, 21)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<CSOSOrder xmlns="urn:csos-gateway:order:1">\n'
        f"  <OrderNumber>26X{n:06d}</OrderNumber>\n  <SignedDate>2026-11-27</SignedDate>\n"
        "  <Purchaser><DEANumber>AP5836727</DEANumber><Name>Demo Pharmacy</Name><Address><Line1>1 Main St"
        "</Line1><City>Springfield</City><State>IL</State><PostalCode>62701</PostalCode></Address></Purchaser>\n"
        "  <Supplier><DEANumber>RS1234563</DEANumber><Name>Demo Distributor</Name><Address><Line1>9 Dock Rd"
        "</Line1><City>Columbus</City><State>OH</State><PostalCode>43004</PostalCode></Address></Supplier>\n"
        f"  <Items>{items}\n  </Items>\n</CSOSOrder>\n"
    ).encode()


def rate(fn: Callable[[bytes], object], docs: list[bytes], seconds: float) -> float:
    """Verifications per second over `docs`, cycling, for about `seconds`."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for doc in docs:
            fn(doc)
        done += len(docs)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=positive(int), default=40, help="distinct signed documents per key type")
    parser.add_argument("--rounds", type=positive(int), default=5)
    parser.add_argument("--seconds", type=positive(float), default=0.6, help="per variant per round")
    add_results_option(parser)
    args = parser.parse_args(argv)
    with scratch("xmldsig") as home:
        return _run(args, home, argv)


def _run(args: argparse.Namespace, home, argv: list[str] | None) -> int:
    settings = load_settings(home)
    write_default_config(settings)
    settings = load_settings(home)
    ensure_softhsm_token(settings)
    point_environment_at(settings)
    layout = pki.ensure_test_pki(settings.pki_dir)
    bundle = str(layout.bundle)
    csos_ca = x509.load_pem_x509_certificate(layout.cert_path(pki.CSOS_CA).read_bytes())
    trust = TrustStore.from_pem_bundle(layout.bundle, [settings.pki_dir / "crl"])

    rows: list[dict] = []
    hsm = Hsm.open(settings)
    try:
        for key_type in ("rsa2048", "p256"):
            label = f"bench-{key_type}"
            public = hsm.generate_keypair(label, key_type)
            cert = pki.issue_certificate(settings.pki_dir, public, "csos-purchaser",
                                         common_name=f"Bench {key_type}", dea_number="AP5836727").certificate
            signer = dataclasses.replace(hsm.signer(label), certificate=cert)
            docs = [sign_enveloped(order_document(i), signer, chain=[csos_ca]) for i in range(args.docs)]
            # Every side must accept every document before any is timed (not an assert: `python -O`
            # would drop it, and a side that fails fast would look fast).
            verifier = XMLVerifier()
            for i, d in enumerate(docs):
                report = verify_xml(d, trust)[0]
                if not report.valid:
                    raise BenchmarkError(f"{key_type} document {i}: our verifier says {report.code}",
                                         code="results_disagree")
                verifier.verify(d, ca_pem_file=bundle)
                verifier.verify(d, x509_cert=cert)
                verify_enveloped(d)

            def ours_cold(doc: bytes, trust=trust) -> object:
                trust._results.clear()  # noqa: SLF001 - the benchmark switches the reuse off
                return verify_xml(doc, trust)

            variants: dict[str, Callable[[bytes], object]] = {
                "chain/ours": lambda doc: verify_xml(doc, trust),
                "chain/ours-no-reuse": ours_cold,
                "chain/signxml": lambda doc: XMLVerifier().verify(doc, ca_pem_file=bundle),
                "nochain/ours": verify_enveloped,
                "nochain/signxml": lambda doc, cert=cert: XMLVerifier().verify(doc, x509_cert=cert),
            }
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    seconds = args.seconds if "no-reuse" not in name else max(args.seconds, 0.3)
                    rates[name].append(rate(fn, docs, seconds))
            median = {name: statistics.median(values) for name, values in rates.items()}
            for name, value in median.items():
                mode, who = name.split("/")
                # Ratio per round (neighbouring measurements share the machine's load), then median.
                ratios = [a / b for a, b in zip(rates[name], rates[f"{mode}/signxml"])]
                rows.append({
                    "key": key_type,
                    "validation": "chain+CRL" if mode == "chain" and who != "signxml" else
                                  ("chain" if mode == "chain" else "none"),
                    "verifier": who,
                    "verify_per_s": round(value, 1),
                    "us_per_verify": round(1e6 / value, 1),
                    "x_signxml": round(statistics.median(ratios), 2),
                    "rounds": [round(v, 1) for v in rates[name]],
                })
    finally:
        hsm.close()

    print(table(rows, ["key", "validation", "verifier", "verify_per_s", "us_per_verify", "x_signxml"]))
    checks = {
        f"{r['key']}/{r['validation']}": r["x_signxml"] >= TARGET
        for r in rows if r["verifier"] == "ours"
    }
    print(f"target: ours >= {TARGET}x signxml -> " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                                          for k, v in checks.items()))
    path = write_results("xmldsig_verify", {
        "rounds_per_variant": args.rounds, "seconds_per_variant": args.seconds,
        "documents": {"count_per_key": args.docs, "bytes": len(docs[0])},
        "target_ratio": TARGET,
        "target_met": checks,
        "what_each_side_checks": {
            "chain/ours": "hardened parse, strict profile, digest, signature, path to root at signing "
                          "time, key usage, CRL revocation; chain outcome reused per (certificate, CRL "
                          "state) within its validity window",
            "chain/ours-no-reuse": "the same, chain validation (pyhanko-certvalidator) run on every call",
            "chain/signxml": "parse, XSD validation, digest, signature, path to root now with key usage "
                             "(cryptography verifier, bundle read per call); no revocation",
            "nochain/ours": "hardened parse, strict profile, digest, signature with the KeyInfo "
                            "certificate's key; no trust, no validity dates",
            "nochain/signxml": "parse, XSD validation, digest, signature with the pinned certificate, "
                               "its validity dates",
        },
        "rows": rows,
    }, directory=args.results_dir, argv=argv)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
