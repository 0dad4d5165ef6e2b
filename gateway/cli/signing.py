"""`gateway sign` and `gateway verify`.

    gateway sign --key LABEL --format xmldsig|cms [--out F] FILE
    gateway verify [--content F] [--at TIME] FILE

`verify` prints the JSON verification report. Exit status: 0 valid, 1 invalid (the report's
`code` says why), 2 unusable input (unreadable file or document, no trust bundle, bad option).
`sign` exits 0 when it wrote the signed document, 1 when the key, the document or the HSM refuses
(printed as `error [code]: message`, e.g. `key_not_found`, `already_signed`, `hsm_unavailable`),
2 for unusable input (unreadable file, malformed or hostile XML, bad option, `--out` that cannot be
written, or standard output closed: `output_unwritable`). `--out` is replaced only by a
complete document. Every signature and
every refusal once the HSM is involved is an audit event (`document.signed` / `sign.refused`,
actor `cli`; 21 CFR 1311.150).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
import sys
import tempfile
from pathlib import Path

import click

from gateway.cli import Context, pass_context

EXIT_VALID, EXIT_INVALID, EXIT_UNUSABLE = 0, 1, 2
MAX_INPUT_BYTES = 64 * 1024 * 1024


def _fail(code: str, message: str, status: int) -> None:
    click.echo(f"error [{code}]: {message}", err=True)
    sys.exit(status)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        _fail("file_unreadable", f"{path}: {exc.strerror or exc}", EXIT_UNUSABLE)
    if len(data) > MAX_INPUT_BYTES:
        _fail("file_too_large", f"{path} is larger than {MAX_INPUT_BYTES} bytes", EXIT_UNUSABLE)
    return data


def parse_time(text: str) -> dt.datetime:
    """ISO 8601 date or date-time; without a zone it is UTC."""
    from gateway.signing.errors import TimeOutOfRange
    from gateway.signing.validation import as_utc

    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO 8601 date or time", param_hint="--at") from None
    try:
        # Converted here: 0001-01-01T00:00+01:00 has no UTC form, and later code works in UTC.
        return as_utc(when)
    except TimeOutOfRange:
        raise click.BadParameter(f"{text!r} is out of range in UTC", param_hint="--at") from None


def reserve_out(out: str) -> tuple[Path, Path | None]:
    """The --out target and the temporary file the output is written to first; raises OSError.

    A regular file (new or existing) is replaced by renaming a complete temporary file of its
    directory over it: a failed write (disk full, size limit) leaves neither half a document nor
    a destroyed previous file, which is the input itself when --out names FILE. Anything else
    (/dev/null, a pipe) is written in place (renaming over it would replace the device).
    """
    target = Path(os.path.realpath(out))  # through a symlink, as a plain open() writes
    mode = None
    if target.exists():
        if not target.is_file():
            return target, None
        mode = stat.S_IMODE(target.stat().st_mode)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    if mode is None:  # a new file gets the permissions a plain open() would give it
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(name, mode)
    return target, Path(name)


def _prepare_out(out: str) -> tuple[Path, Path | None]:
    """reserve_out, before signing: an unwritable --out costs no HSM signature."""
    try:
        return reserve_out(out)
    except OSError as exc:
        _fail("output_unwritable", f"cannot write {out}: {exc.strerror or exc}", EXIT_UNUSABLE)


def _write_out(target: Path, part: Path | None, data: bytes) -> None:
    """Write `data` to `part` and rename it over `target` (or to `target` itself); raises OSError."""
    with open(part or target, "wb") as handle:
        handle.write(data)
        if part is not None:
            handle.flush()
            os.fsync(handle.fileno())
    if part is not None:
        os.replace(part, target)


def write_out_atomically(out: str, data: bytes) -> None:
    """`data` to file `out` as `gateway sign --out` writes it: complete or not at all, a previous
    file kept when the write fails. Raises OSError."""
    target, part = reserve_out(out)
    try:
        _write_out(target, part, data)
    finally:
        if part is not None:
            part.unlink(missing_ok=True)  # left only when the write failed before the rename


@click.command("sign")
@click.option("--key", "label", required=True, help="Label of the HSM key to sign with.")
@click.option("--format", "fmt", type=click.Choice(["xmldsig", "cms"]), required=True,
              help="xmldsig: enveloped XML signature; cms: detached CMS SignedData (DER).")
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the result here (default: standard output).")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_context
def sign_command(ctx: Context, label: str, fmt: str, out: str | None, file: str) -> None:
    """Sign FILE with an HSM key."""
    from gateway.cli.events import record_event  # the audit write the key and PKI commands use
    from gateway.signing.errors import HsmError, SigningError
    from gateway.signing.hsm import Hsm
    from gateway.xmlsafe import XmlError

    data = _read(file)
    target, part = _prepare_out(out) if out else (None, None)
    if out is None and sys.stdout is None:  # started with standard output closed (`>&-`)
        _fail("output_unwritable", "standard output is closed: give --out", EXIT_UNUSABLE)
    details = {"key_label": label, "format": fmt, "content_sha256": hashlib.sha256(data).hexdigest(),
               "file": os.path.abspath(file)}

    def refuse(code: str, message: str, status: int, event: str = "sign.refused",
               outcome: str = "refused") -> None:
        record_event(ctx.settings, event, outcome, label, {**details, "code": code})
        _fail(code, message, status)

    try:
        try:
            hsm = Hsm.open(ctx.settings)
        except HsmError as exc:  # a wrong PIN too: an attempt on the keys (21 CFR 1311.150)
            refuse(exc.code, str(exc), EXIT_INVALID)
        try:
            signer = hsm.signer(label)
            chain = _checked_chain(ctx, signer.certificate)
            if fmt == "xmldsig":
                from gateway.signing.xmldsig import sign_enveloped

                result = sign_enveloped(data, signer, chain=chain)
            else:
                from gateway.signing.cms import sign_detached

                result = sign_detached(data, signer, chain=chain)
        except XmlError as exc:
            refuse(exc.code, exc.message, EXIT_UNUSABLE)
        except SigningError as exc:  # HSM errors included: key not found, token unavailable...
            refuse(exc.code, str(exc), EXIT_INVALID)
        except Exception as exc:  # an attempt that broke on something unforeseen is still one
            record_event(ctx.settings, "sign.refused", "failure", label,
                    {**details, "code": "unexpected_error", "message": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            hsm.close()
        if target is not None:
            try:
                _write_out(target, part, result)
            except OSError as exc:  # signed, but the document never reached --out
                refuse("output_unwritable", f"cannot write {out}: {exc.strerror or exc}",
                       EXIT_UNUSABLE, "document.signed", "failure")
        else:
            try:
                sys.stdout.buffer.write(result)
                sys.stdout.buffer.flush()
            except OSError as exc:  # a reader that went away (a closed pipe): signed, not delivered
                _quiet_stdout()
                refuse("output_unwritable", f"cannot write to standard output: {exc.strerror or exc}",
                       EXIT_UNUSABLE, "document.signed", "failure")
    finally:
        if part is not None:
            part.unlink(missing_ok=True)  # left only when something failed before the rename
    record_event(ctx.settings, "document.signed", "success", label,
            {**details, "signature_sha256": hashlib.sha256(result).hexdigest(),
             "out": str(target) if target is not None else "-"})


def _quiet_stdout() -> None:
    """Point standard output at /dev/null: what is still buffered for a closed pipe would
    otherwise fail again at exit, with a second message after ours."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _checked_chain(ctx: Context, cert) -> tuple:
    """The intermediates above the signer's certificate, from the trust bundle, so that a
    verifier holding only the root (xmlsec1 --trusted-pem, openssl -CAfile) builds the path,
    after the certificate is judged as its recipients will judge it (SignerCertificateRefused
    when they would refuse it). Without a trust bundle there is nothing to judge by or chain to."""
    from gateway.signing.errors import SigningError
    from gateway.signing.validation import check_signer_certificate, load_trust

    settings = ctx.settings
    if cert is None or not settings.trust_bundle_path.is_file():
        return ()
    try:
        trust = load_trust(settings.trust_bundle_path, settings.pki_dir / "crl")
    except (OSError, ValueError) as exc:
        raise SigningError(f"{settings.trust_bundle_path}: {exc}", code="trust_unavailable") from exc
    check_signer_certificate(trust, cert)
    return trust.chain_for(cert)


@click.command("verify")
@click.option("--content", "content_path", type=click.Path(dir_okay=False), default=None,
              help="The signed content, for a detached CMS signature.")
@click.option("--at", "at", default=None,
              help="Judge the certificate at this time (ISO 8601) when the signature carries no "
                   "signing time; default now.")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_context
def verify_command(ctx: Context, content_path: str | None, at: str | None, file: str) -> None:
    """Verify a signed XML document or a detached CMS signature; print the JSON report."""
    from gateway.signing.validation import load_trust
    from gateway.signing.verify import verify_document

    when = parse_time(at) if at is not None else None  # `--at ""` is a bad time, not "now"
    data = _read(file)
    content = _read(content_path) if content_path else None
    settings = ctx.settings
    bundle = settings.trust_bundle_path
    if not bundle.is_file():
        _fail("trust_unavailable", f"no trust bundle at {bundle} (run `gateway init`)", EXIT_UNUSABLE)
    try:
        trust = load_trust(bundle, settings.pki_dir / "crl")
    except (OSError, ValueError) as exc:
        _fail("trust_unavailable", f"{bundle}: {exc}", EXIT_UNUSABLE)
    report, _tree = verify_document(data, trust, content=content, at=when)
    click.echo(json.dumps(report.to_dict(), indent=2))
    if report.valid:
        sys.exit(EXIT_VALID)
    sys.exit(EXIT_INVALID if report.usable_input else EXIT_UNUSABLE)


def register(group: click.Group) -> None:
    group.add_command(sign_command)
    group.add_command(verify_command)
