"""Errors of the signing core. Each carries a stable `code` that callers branch on."""

from __future__ import annotations


class SigningError(Exception):
    """Base of every error the signing core raises on purpose."""

    code = "signing_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class HsmError(SigningError):
    """The HSM refused or failed an operation."""

    code = "hsm_error"


class TokenUnavailable(HsmError):
    """The token is missing, removed, or the module is down. Retry later: the pool reconnects."""

    code = "hsm_unavailable"


class HsmLoginError(HsmError):
    """The PIN was refused or the token is locked."""

    code = "hsm_login_failed"


class KeyNotFound(HsmError):
    """No key with that label on the token."""

    code = "key_not_found"


class KeyExists(HsmError):
    """A key with that label already exists (labels are unique on our tokens)."""

    code = "key_exists"


class CertificateMismatch(SigningError):
    """A certificate does not carry the public key of the HSM key it is stored with."""

    code = "certificate_key_mismatch"


class SignerCertificateRefused(SigningError):
    """The key's certificate is one relying parties refuse now (expired, not yet valid, revoked,
    not chaining to the trust anchors, not for signing): a signature made with it would be
    refused on receipt. `code` is the verifier's (certificate_expired, certificate_revoked...)."""

    code = "certificate_untrusted"


class TimeOutOfRange(SigningError, ValueError):
    """A time with no UTC form (year 1 or 9999 with an offset that carries it past the ends of
    the calendar). A ValueError too, as for any other bad argument value."""

    code = "time_out_of_range"


class SignatureRefused(Exception):
    """A signature the verification profile refuses; `check` names the step that failed (the
    report's check name) and `code` the stable error code."""

    def __init__(self, code: str, message: str, check: str = "format") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.check = check


def clipped(text: str, limit: int) -> str:
    """The sender's text as a refusal quotes it: cut at `limit` characters, since a report is
    echoed in HTTP errors and logs and must not grow with what the sender wrote."""
    return text if len(text) <= limit else text[:limit] + "..."
