"""`gateway pki ...` (the test PKI) and `gateway keys ...` (enrolment of HSM keys).

Exit codes: 0 done, 1 refused (the message names a stable code), 2 usage error.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.bootstrap import home_lock
from gateway.cli import CommandError, Context, pass_context
from gateway.cli.events import audited
from gateway.config import Settings
from gateway.identifiers import IdentifierError
from gateway.signing import pki
from gateway.signing.dea import SCHEDULES, DeaExtensionError, normalize_schedule
from gateway.signing.enrol import (
    build_csr,
    certificate_path,
    install_certificate,
    issue_for_label,
    load_certificate_bytes,
)
from gateway.signing.errors import SigningError


@contextmanager
def _refusals() -> Iterator[None]:
    """Turn the errors of the layers below into CommandError with their code."""
    try:
        yield
    except (pki.PkiError, SigningError, IdentifierError, DeaExtensionError) as exc:
        raise CommandError(getattr(exc, "code", "error"), str(exc)) from exc


def _write_out(out: str, data: bytes) -> None:
    """Complete or not at all, as `gateway sign --out`: a failed write used to leave half a PEM
    in place of the previous file."""
    from gateway.cli.signing import write_out_atomically

    try:
        write_out_atomically(out, data)
    except OSError as exc:
        raise CommandError("output_unwritable", f"cannot write {out}: {exc.strerror or exc}") from None


@contextmanager
def _open_hsm(settings: Settings) -> Iterator[object]:
    from gateway.signing.hsm import Hsm  # imported here: `pki` commands work without PKCS#11

    with _refusals():
        hsm = Hsm.open(settings)
    try:
        yield hsm
    finally:
        hsm.close()


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


_SERIAL_FORMS = (  # int() alone also takes "1_000", "-5" and non-ASCII digits
    (re.compile(r"[0-9]+"), lambda v: int(v, 10)),
    (re.compile(r"0x[0-9a-f]+"), lambda v: int(v[2:], 16)),
    (re.compile(r"[0-9a-f]{1,2}(?::[0-9a-f]{1,2})+"), lambda v: int(v.replace(":", ""), 16)),
)


def _parse_serial(text: str) -> int:
    """Decimal, 0x-prefixed hex, or colon-separated hex (as openssl prints serials)."""
    value = text.strip().lower()
    for pattern, convert in _SERIAL_FORMS:
        if pattern.fullmatch(value):
            return convert(value)
    raise click.BadParameter(f"{text!r} is not a serial number (decimal, 0x-hex or aa:bb:..)",
                             param_hint="--serial")


def _parse_schedules(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    if text.strip() == "":
        return ()
    try:
        return tuple(normalize_schedule(part) for part in text.split(",") if part.strip())
    except DeaExtensionError as exc:
        raise click.BadParameter(f"{exc}; use {','.join(SCHEDULES)}") from exc


# --- gateway pki ------------------------------------------------------------------------------

@click.group("pki")
def pki_group() -> None:
    """The test PKI of this home (CAs, CRLs) and the trust bundle."""


@pki_group.command("ca-bundle")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@pass_context
def ca_bundle_cmd(ctx: Context, out: str | None) -> None:
    """Print the CA certificates, roots and intermediates (PEM)."""
    settings = ctx.settings
    with _refusals():
        if settings.trust_bundle:
            path = Path(settings.trust_bundle)
            if not path.exists():
                raise CommandError("trust_bundle_missing", f"configured trust bundle {path} does not exist")
            text = path.read_text()
        else:
            text = pki.ca_bundle(settings.pki_dir)
    if out:
        _write_out(out, text.encode())
    else:
        click.echo(text, nl=False)


@pki_group.command("revoke")
@click.option("--serial", "serial", required=True, help="Certificate serial (decimal, 0x-hex or aa:bb:..).")
@click.option("--reason", type=click.Choice(pki.REVOCATION_REASONS), default="unspecified", show_default=True)
@pass_context
def revoke_cmd(ctx: Context, serial: str, reason: str) -> None:
    """Test PKI only: revoke a certificate and reissue its CA's CRL."""
    number = _parse_serial(serial)
    with audited(ctx.settings, "pki.certificate_revoked", str(number), reason=reason), _refusals():
        entry = pki.revoke(ctx.settings.pki_dir, number, reason)
        layout = pki.PkiLayout(ctx.settings.pki_dir)
    _echo_json({**asdict(entry), "serial": str(entry.serial),
                "crl": str(layout.crl_path(entry.issuer_ca)),
                "crl_pem": str(layout.crl_path(entry.issuer_ca, pem=True))})


@pki_group.command("crl")
@pass_context
def crl_cmd(ctx: Context) -> None:
    """Test PKI only: reissue every CA's CRL (next CRL number, nextUpdate in 7 days)."""
    with audited(ctx.settings, "pki.crl_issued", "test-pki"), _refusals():
        paths = pki.issue_crl(ctx.settings.pki_dir)
    report = {}
    for ca, path in paths.items():
        crl = x509.load_der_x509_crl(path.read_bytes())
        report[ca] = {
            "crl": str(path),
            "crl_pem": str(path.with_name(path.name + ".pem")),
            "crl_number": crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number,
            "this_update": crl.last_update_utc.isoformat(),
            "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
            "revoked": len(crl),
        }
    _echo_json(report)


@pki_group.command("list")
@pass_context
def list_cmd(ctx: Context) -> None:
    """List the certificates the test PKI issued (JSON)."""
    with _refusals():
        pki.require_pki(ctx.settings.pki_dir)
        entries = pki.load_index(ctx.settings.pki_dir)
    _echo_json([{**asdict(e), "serial": str(e.serial)} for e in entries])


@pki_group.command("issue")
@click.option("--label", required=True, help="HSM key to certify.")
@click.option("--profile", required=True, type=click.Choice(sorted(pki.PROFILES)))
@click.option("--dea-number", default=None, help="DEA registration number (required by CSOS and prescriber profiles).")
@click.option("--schedules", default=None, help="Comma-separated, e.g. II,IIN,III (default: all).")
@click.option("--cn", "common_name", default=None, help="Subject common name (default: the label).")
@click.option("--org", "organization", default=None, help="Subject organization / registrant name.")
@click.option("--email", default=None)
@click.option("--business-activity", default=None)
@click.option("--days", "days", type=click.IntRange(1, 3650), default=pki.DEFAULT_VALIDITY_DAYS, show_default=True)
@pass_context
def issue_cmd(ctx: Context, label: str, profile: str, dea_number: str | None, schedules: str | None,
              common_name: str | None, organization: str | None, email: str | None,
              business_activity: str | None, days: int) -> None:
    """Test PKI only: issue a certificate for an HSM key and store it with the key."""
    parsed = _parse_schedules(schedules)
    settings = ctx.settings
    with audited(settings, "key.certificate_issued", label, profile=profile) as audit, \
            _open_hsm(settings) as hsm, _refusals():
        fields = dict(dea_number=dea_number, schedules=parsed, organization=organization, email=email,
                      business_activity=business_activity, validity_days=days)
        if common_name:
            fields["common_name"] = common_name
        cert, path = issue_for_label(settings, hsm, label, profile, **fields)
        audit["serial"] = str(cert.serial_number)
    _echo_json({"label": label, "profile": profile, "serial": str(cert.serial_number),
                "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
                "not_after": cert.not_valid_after_utc.isoformat(), "certificate": str(path)})


# --- gateway keys ------------------------------------------------------------------------------

@click.group("keys")
def keys_group() -> None:
    """Key pairs inside the HSM and their certificates (enrolment)."""


def _fingerprint(public_key: object) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


@keys_group.command("generate")
@click.option("--label", required=True)
@click.option("--type", "key_type", type=click.Choice(["rsa2048", "p256"]), required=True)
@pass_context
def generate_cmd(ctx: Context, label: str, key_type: str) -> None:
    """Generate a key pair inside the HSM (the private key never leaves it)."""
    with audited(ctx.settings, "key.generated", label, key_type=key_type) as audit, \
            _open_hsm(ctx.settings) as hsm, _refusals():
        certificate_path(ctx.settings, label)  # refuse labels that cannot name a file later
        with home_lock(ctx.settings):  # another process may be generating the same label
            public = hsm.generate_keypair(label, key_type)
        audit["spki_sha256"] = _fingerprint(public)
    _echo_json({"label": label, "key_type": key_type, "spki_sha256": _fingerprint(public),
                "public_key": public.public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo).decode()})


@keys_group.command("csr")
@click.option("--label", required=True)
@click.option("--subject", required=True, help='e.g. "CN=Demo Pharmacy,O=Demo,C=US" (RFC 4514).')
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write PEM to a file.")
@pass_context
def csr_cmd(ctx: Context, label: str, subject: str, out: str | None) -> None:
    """A PKCS#10 request signed by the HSM key, for the CA."""
    # An enrolment step that proves possession of the HSM key: audited like generate and
    # import-cert, refused or not (21 CFR 1311.150).
    with audited(ctx.settings, "key.csr_created", label, requested_subject=subject,
                  out=str(Path(out).absolute()) if out else "-") as audit, \
            _open_hsm(ctx.settings) as hsm, _refusals():
        csr = build_csr(hsm, label, subject)
        pem = csr.public_bytes(serialization.Encoding.PEM)
        audit["spki_sha256"] = _fingerprint(csr.public_key())
        audit["csr_sha256"] = hashlib.sha256(pem).hexdigest()
        if out:
            _write_out(out, pem)
    if out:
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(pem.decode(), nl=False)


@keys_group.command("import-cert")
@click.option("--label", required=True)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@pass_context
def import_cert_cmd(ctx: Context, label: str, file: str) -> None:
    """Store the issued certificate with its HSM key (token and <home>/keys/LABEL.pem)."""
    # A file that is no certificate is a refused import too, and audited as one.
    with audited(ctx.settings, "key.certificate_imported", label, file=str(Path(file).absolute())) as audit:
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise CommandError("file_unreadable", f"{file}: {exc.strerror or exc}") from None
        with _refusals():
            cert = load_certificate_bytes(data)
        audit.update(serial=str(cert.serial_number), certificate_subject=cert.subject.rfc4514_string())
        with _open_hsm(ctx.settings) as hsm, _refusals():
            path = install_certificate(ctx.settings, hsm, label, cert)
    _echo_json({"label": label, "subject": cert.subject.rfc4514_string(), "serial": str(cert.serial_number),
                "not_after": cert.not_valid_after_utc.isoformat(), "certificate": str(path)})


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@pass_context
def list_keys_cmd(ctx: Context, as_json: bool) -> None:
    """The key pairs on the token, with their certificates."""
    with _open_hsm(ctx.settings) as hsm, _refusals():
        keys = hsm.list_keys()
    rows = []
    for key in keys:
        path = ctx.settings.keys_dir / f"{key.label}.pem"
        rows.append({**asdict(key), "certificate": str(path) if path.exists() else None})
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no keys on the token")
        return
    now = dt.datetime.now(dt.timezone.utc)
    click.echo(f"{'LABEL':<24} {'TYPE':<8} {'NOT AFTER':<28} SUBJECT")
    for row in rows:
        not_after = "-"
        if row["not_after"]:
            when = dt.datetime.fromisoformat(row["not_after"])
            not_after = when.strftime("%Y-%m-%d %H:%M") + (" (expired)" if when < now else "")
        click.echo(f"{row['label']:<24} {row['key_type']:<8} {not_after:<28} {row['subject'] or '(no certificate)'}")


def register(group: click.Group) -> None:
    group.add_command(pki_group)
    group.add_command(keys_group)
