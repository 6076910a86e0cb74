"""Sealed storage: checkpoints and final models encrypted at rest with AES-256-GCM.

Why our own small format instead of relying on the TEE's sealing alone: the owner of a study has
to be able to open the final model *outside* the TEE (``teefl model decrypt``) with a key they hold,
and the same code must work natively, under Gramine and in a TDX VM. GCM gives confidentiality
and integrity; the header is authenticated too (as AAD), so no byte of the file can change
unnoticed.

File layout (all integers big-endian)::

    magic     9  b"TEEFLSEAL"
    version   1  0x01
    key_id    8  first 8 bytes of HMAC-SHA256(key, "teefl sealed key id v1")
    nonce    12  random per file
    length    8  length of ciphertext+tag that follows
    ciphertext || 16-byte GCM tag

``key_id`` and ``length`` are there so a failure can say *why* it failed: a wrong key, a
truncated file and a modified file are reported differently (GCM alone only says "invalid").
``key_id`` is a PRF output; it identifies the key without revealing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import struct
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teefl.errors import TeeflError

MAGIC = b"TEEFLSEAL"
FORMAT_VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct(f">{len(MAGIC)}sB8s{NONCE_SIZE}sQ")
HEADER_SIZE = _HEADER.size  # 38


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


def key_id(key: bytes) -> bytes:
    """8-byte identifier of a key (HMAC, so it reveals nothing usable about the key)."""
    return hmac.new(key, b"teefl sealed key id v1", hashlib.sha256).digest()[:8]


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise SealedError(f"sealing key must be {KEY_SIZE} bytes (AES-256)")
    return bytes(key)


def parse_key(data: bytes, source: str) -> bytes:
    """A key given as 32 raw bytes or 64 hex characters (surrounding whitespace ignored)."""
    if len(data) == KEY_SIZE:
        return bytes(data)
    text = data.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise SealedError(
        f"{source}: a sealing key is 32 raw bytes or 64 hex characters "
        f"(got {len(data)} bytes); create one with `teefl model keygen FILE`"
    )


def load_key(key_file: Path | str | None = None, key_env: str | None = None) -> bytes:
    """Load the sealing key from exactly one of a file or an environment variable (hex)."""
    if (key_file is None) == (key_env is None):
        raise SealedError("give exactly one of --key-file or --key-env")
    if key_file is not None:
        path = Path(key_file)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise SealedError(f"key file {path} not found") from exc
        except OSError as exc:
            raise SealedError(f"cannot read key file {path}: {exc.strerror}") from exc
        return parse_key(data, str(path))
    assert key_env is not None
    value = os.environ.get(key_env)
    if value is None:
        raise SealedError(f"environment variable {key_env} is not set (expected 64 hex characters)")
    text = value.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise SealedError(f"environment variable {key_env} is not hex") from exc
    if len(key) != KEY_SIZE:
        raise SealedError(
            f"environment variable {key_env} holds {len(key)} bytes, a sealing key is {KEY_SIZE} "
            "(64 hex characters)"
        )
    return key


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def write_key_file(path: Path | str, key: bytes | None = None, *, overwrite: bool = False) -> bytes:
    """Write a key as 64 hex characters and a newline, mode 0600; refuse to overwrite by default.

    Hex rather than raw bytes so the same value can be pasted into an environment variable.
    """
    key = _check_key(key if key is not None else generate_key())
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise SealedError(f"{path} exists; refusing to overwrite a key (use --force)") from exc
    except OSError as exc:
        raise SealedError(f"cannot create key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(key.hex() + "\n")
    return key


def seal_bytes(data: bytes, key: bytes) -> bytes:
    """Encrypt and authenticate ``data``; header and ciphertext are both covered by the tag."""
    key = _check_key(key)
    nonce = secrets.token_bytes(NONCE_SIZE)
    length = len(data) + TAG_SIZE
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, key_id(key), nonce, length)
    return header + AESGCM(key).encrypt(nonce, bytes(data), header)


def unseal_bytes(blob: bytes, key: bytes) -> bytes:
    """Decrypt a sealed blob; each failure mode raises its own SealedError subclass."""
    key = _check_key(key)
    if len(blob) < len(MAGIC) or not blob.startswith(MAGIC):
        raise NotSealedError("not a teefl sealed file (missing TEEFLSEAL header)")
    if len(blob) < HEADER_SIZE:
        raise TruncatedError(
            f"sealed file truncated inside its header ({len(blob)} of {HEADER_SIZE} bytes)"
        )
    _magic, version, kid, nonce, length = _HEADER.unpack_from(blob, 0)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"sealed file format version {version} is not supported (this teefl reads "
            f"{FORMAT_VERSION})"
        )
    if not hmac.compare_digest(kid, key_id(key)):
        raise WrongKeyError(
            f"wrong key: file sealed with key id {kid.hex()}, this key has id {key_id(key).hex()}"
        )
    body = blob[HEADER_SIZE:]
    if len(body) < length:
        raise TruncatedError(f"sealed file truncated: {len(body)} of {length} bytes after header")
    if len(body) > length or length < TAG_SIZE:
        raise TamperedError(
            f"sealed file modified: {len(body)} bytes after header, header says {length}"
        )
    try:
        return AESGCM(key).decrypt(nonce, body, blob[:HEADER_SIZE])
    except InvalidTag as exc:
        raise TamperedError(
            "sealed file failed authentication: it was modified after sealing"
        ) from exc


def write_sealed(path: Path | str, data: bytes, key: bytes) -> None:
    """Seal ``data`` into ``path`` atomically: temp file, fsync, rename, fsync directory.

    A crash leaves either the old file or the new one, never a half-written checkpoint that would
    later be reported as "truncated".
    """
    path = Path(path)
    blob = seal_bytes(data, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets us fsync a directory
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_sealed(path: Path | str, key: bytes) -> bytes:
    """Read and unseal ``path``; errors name the file."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError as exc:
        raise SealedError(f"{path} not found") from exc
    except OSError as exc:
        raise SealedError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return unseal_bytes(blob, key)
    except SealedError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def is_sealed(path: Path | str) -> bool:
    """True when the file starts with the sealed magic (cheap check, no key needed)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "NotSealedError",
    "SealedError",
    "TamperedError",
    "TruncatedError",
    "UnsupportedVersionError",
    "WrongKeyError",
    "generate_key",
    "is_sealed",
    "key_id",
    "load_key",
    "parse_key",
    "read_sealed",
    "seal_bytes",
    "unseal_bytes",
    "write_key_file",
    "write_sealed",
]
