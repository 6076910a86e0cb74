"""The sealed file format's constants, header layout, key id and errors.

Shared by `teefl.security.sealed` (versions 1 and 2, and everything around them) and
`teefl.security.sealstream` (version 3), which must not import each other both ways.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from teefl.errors import TeeflError

MAGIC = b"TEEFLSEAL"
#: the newest format; 1 (no context) is still read, and written for a blob sealed without one
FORMAT_VERSION = 2
UNBOUND_VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct(f">{len(MAGIC)}sB8s{NONCE_SIZE}sQ")
HEADER_SIZE = _HEADER.size  # 38: the fixed part (version 2 adds the context after it)
_CTX_LEN = struct.Struct(">H")
#: format version 3 (`teefl.security.sealstream`): a payload over `SINGLE_MAX` bytes, the most
#: one AES-GCM message of ``cryptography`` takes
STREAM_VERSION = 3
SINGLE_MAX = 2**31 - 1
#: a context is a few names and numbers; anything longer is not one of ours
MAX_CONTEXT = 4096


class SealedError(TeeflError):
    """Base class: a sealed file could not be opened."""


class NotSealedError(SealedError):
    """The data does not start with the teefl sealed header."""


class UnsupportedVersionError(SealedError):
    """A sealed file from a newer (or corrupted) format version."""


class TruncatedError(SealedError):
    """Fewer bytes than the header announces."""


class WrongKeyError(SealedError):
    """The file was sealed with a different key."""


class TamperedError(SealedError):
    """Authentication failed although key and length match: the file was modified."""


class ContextMismatchError(SealedError):
    """An authentic file, but not the one expected: another run's, round's, party's or kind's
    (an older checkpoint or another update put in its place), or one sealed without a context."""


def key_id(key: bytes) -> bytes:
    """8-byte identifier of a key (HMAC, so it reveals nothing usable about the key)."""
    return hmac.new(key, b"teefl sealed key id v1", hashlib.sha256).digest()[:8]
