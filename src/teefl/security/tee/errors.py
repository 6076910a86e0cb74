"""The one error every attestation check raises (its own module so that the SNP package and
the DCAP verifier can both raise it without importing each other)."""

from teefl.errors import TeeflError


class AttestationError(TeeflError):
    """A peer's evidence was refused; the message names the check that failed."""


__all__ = ["AttestationError"]
