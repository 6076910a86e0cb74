"""Sealed storage: checkpoints, final models and updates encrypted at rest with AES-256-GCM.

Why our own small format instead of relying on the TEE's sealing alone: the owner of a study has
to be able to open the final model *outside* the TEE (``teefl model decrypt``) with a key they hold,
and the same code must work natively, under Gramine and in a TDX VM. GCM gives confidentiality
and integrity; the header is authenticated too (as AAD), so no byte of the file can change
unnoticed.

File layout (all integers big-endian)::

    magic     9  b"TEEFLSEAL"
    version   1  0x01 (unbound) or 0x02 (bound to a context)
    key_id    8  first 8 bytes of HMAC-SHA256(key, "teefl sealed key id v1")
    nonce    12  random per file
    length    8  length of ciphertext+tag that follows (after the context, in version 2)
    -- version 2 only --
    ctx_len   2  length of the context
    context      canonical JSON: which run, round, party and kind of file this is
    ciphertext || 16-byte GCM tag

``key_id`` and ``length`` are there so a failure can say *why* it failed: a wrong key, a
truncated file and a modified file are reported differently (GCM alone only says "invalid").
``key_id`` is a PRF output; it identifies the key without revealing it.

Why a context (version 2): AES-GCM proves that the owner's key sealed a file, not *which* file
it is. Without it, a host that can write the run directory could put an older checkpoint, or
another round's or another collaborator's update, in place of the one the aggregator expects
(a rollback), and it would decrypt fine. The context is part of the authenticated header, so a
reader that says what it expects (`read_sealed`'s ``expect``) refuses any other file, and a
reader that does not (``teefl model decrypt``) still needs only the key: the format describes
itself. `metadata_key` derives a second key from the sealing key (HKDF) for the run's
plaintext resume metadata (`sign_metadata`, `verify_metadata`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teefl.security.keyfile import check_private_file
from teefl.security.sealformat import (
    _CTX_LEN,
    _HEADER,
    FORMAT_VERSION,
    HEADER_SIZE,
    KEY_SIZE,
    MAGIC,
    MAX_CONTEXT,
    NONCE_SIZE,
    SINGLE_MAX,
    STREAM_VERSION,
    TAG_SIZE,
    UNBOUND_VERSION,
    ContextMismatchError,
    NotSealedError,
    SealedError,
    TamperedError,
    TruncatedError,
    UnsupportedVersionError,
    WrongKeyError,
    key_id,
)


def _context_bytes(context: Mapping[str, Any]) -> bytes:
    """The canonical encoding of a context: the same mapping gives the same bytes."""
    data = json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_CONTEXT:
        raise SealedError(f"sealing context of {len(data)} bytes exceeds {MAX_CONTEXT}")
    return data


def describe(context: Mapping[str, Any] | None) -> str:
    """A context in words, for error messages: "round 3's checkpoint of run 'r1'"."""
    if context is None:
        return "a file sealed without a context (an older teefl's format)"
    kind, party, rnd = str(context.get("kind", "file")), context.get("party"), context.get("round")
    if kind == "update":
        what = f"{party}'s update for round {rnd}"
    elif rnd is not None:
        what = f"round {rnd}'s {kind}"
    else:
        what = f"the {kind}"
    return f"{what} of run {context.get('run')!r}"


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
        key = parse_key(data, str(path))
        check_private_file(path, "sealing key file")
        return key
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


def seal_bytes(data: Any, key: bytes, context: Mapping[str, Any] | None = None) -> bytes:
    """Encrypt and authenticate ``data``; header, context and ciphertext are all covered by the
    tag. ``context``: what the file is (e.g. ``{"run": ..., "round": 3, "party": "aggregator",
    "kind": "checkpoint"}``), written in the clear and authenticated (format version 2); without
    one the file has format version 1."""
    key = _check_key(key)
    nonce = secrets.token_bytes(NONCE_SIZE)
    view = memoryview(data).cast("B")
    if context is not None and len(view) > SINGLE_MAX:
        from teefl.security.sealstream import seal_stream

        return seal_stream(view, key, nonce, _context_bytes(context))
    length = len(data) + TAG_SIZE
    version = UNBOUND_VERSION if context is None else FORMAT_VERSION
    header = _HEADER.pack(MAGIC, version, key_id(key), nonce, length)
    if context is not None:
        ctx = _context_bytes(context)
        header += _CTX_LEN.pack(len(ctx)) + ctx
    return header + AESGCM(key).encrypt(nonce, bytes(data), header)


def open_sealed(blob: bytes, key: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """Decrypt a sealed blob: (plaintext, its authenticated context, None for version 1).
    Each failure mode raises its own SealedError subclass."""
    key = _check_key(key)
    if len(blob) < len(MAGIC) or not blob.startswith(MAGIC):
        raise NotSealedError("not a teefl sealed file (missing TEEFLSEAL header)")
    if len(blob) < HEADER_SIZE:
        raise TruncatedError(
            f"sealed file truncated inside its header ({len(blob)} of {HEADER_SIZE} bytes)"
        )
    _magic, version, kid, nonce, length = _HEADER.unpack_from(blob, 0)
    if version not in (UNBOUND_VERSION, FORMAT_VERSION, STREAM_VERSION):
        raise UnsupportedVersionError(
            f"sealed file format version {version} is not supported (this teefl reads "
            f"{UNBOUND_VERSION} to {STREAM_VERSION})"
        )
    if not hmac.compare_digest(kid, key_id(key)):
        raise WrongKeyError(
            f"wrong key: file sealed with key id {kid.hex()}, this key has id {key_id(key).hex()}"
        )
    end = HEADER_SIZE
    if version != UNBOUND_VERSION:
        if len(blob) < end + _CTX_LEN.size:
            raise TruncatedError("sealed file truncated inside its context")
        (ctx_len,) = _CTX_LEN.unpack_from(blob, end)
        end += _CTX_LEN.size + ctx_len
        if ctx_len > MAX_CONTEXT:
            raise TamperedError(f"sealed file modified: a context of {ctx_len} bytes")
        if len(blob) < end:
            raise TruncatedError("sealed file truncated inside its context")
    if version == STREAM_VERSION:
        from teefl.security.sealstream import open_stream

        plain: Any = open_stream(blob, key, nonce, end, length)
    else:
        body = memoryview(blob)[end:]
        if len(body) < length:
            raise TruncatedError(
                f"sealed file truncated: {len(body)} of {length} bytes after header"
            )
        if len(body) > length or length < TAG_SIZE:
            raise TamperedError(
                f"sealed file modified: {len(body)} bytes after header, header says {length}"
            )
        try:
            plain = AESGCM(key).decrypt(nonce, body, blob[:end])
        except InvalidTag as exc:
            raise TamperedError(
                "sealed file failed authentication: it was modified after sealing"
            ) from exc
    if version == UNBOUND_VERSION:
        return plain, None
    try:  # authentic, hence written by `seal_bytes`: a JSON object
        context = json.loads(bytes(blob[HEADER_SIZE + _CTX_LEN.size : end]))
    except ValueError as exc:  # sealed by someone holding the key, but not by teefl
        raise TamperedError(f"sealed file carries an unreadable context: {exc}") from None
    if not isinstance(context, dict):
        raise TamperedError("sealed file carries a context that is not a JSON object")
    return plain, context


def unseal_bytes(blob: bytes, key: bytes, expect: Mapping[str, Any] | None = None) -> bytes:
    """Decrypt a sealed blob; each failure mode raises its own SealedError subclass.

    ``expect``: the context the file must carry (see `seal_bytes`); another one, or none (a
    version-1 file), raises `ContextMismatchError`. Without it any authentic file is accepted.
    """
    plain, context = open_sealed(blob, key)
    if expect is not None and context != dict(expect):
        raise ContextMismatchError(
            f"holds {describe(context)}, expected {describe(expect)}: an older or another "
            "sealed file was put in its place"
        )
    return plain


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


def read_sealed(path: Path | str, key: bytes, expect: Mapping[str, Any] | None = None) -> bytes:
    """Read and unseal ``path`` (``expect``: see `unseal_bytes`); errors name the file."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError as exc:
        raise SealedError(f"{path} not found") from exc
    except OSError as exc:
        raise SealedError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return unseal_bytes(blob, key, expect)
    except SealedError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


# -- the run's resume metadata ------------------------------------------------------------------
class MetadataError(SealedError):
    """Plaintext metadata whose authentication code is missing or wrong: edited, or another
    run's or round's."""


def metadata_key(key: bytes) -> bytes:
    """The key that authenticates a sealed run's plaintext metadata (``state.json``, stored
    updates' sample counts and digests), derived from the sealing key with HKDF-SHA256.

    Why a derived key: one key, one purpose; the metadata MAC never reuses the AES key."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"teefl run metadata v1")
    return hkdf.derive(_check_key(key))


def _mac(doc: Mapping[str, Any], mkey: bytes, context: Mapping[str, Any]) -> str:
    body = {"context": dict(context), "doc": {k: v for k, v in doc.items() if k != "mac"}}
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hmac.new(mkey, data, hashlib.sha256).hexdigest()


def sign_metadata(
    doc: Mapping[str, Any], mkey: bytes, context: Mapping[str, Any]
) -> dict[str, Any]:
    """``doc`` with a ``mac`` field: HMAC-SHA256 (under `metadata_key`) of its other fields and
    of ``context`` (which run, round, party and kind it belongs to, not stored in it)."""
    return {**doc, "mac": _mac(doc, mkey, context)}


def verify_metadata(
    doc: Mapping[str, Any], mkey: bytes, context: Mapping[str, Any]
) -> dict[str, Any]:
    """``doc`` without its ``mac`` once that proves it unchanged and ``context``'s; else
    `MetadataError` (the caller names the file)."""
    mac = doc.get("mac")
    if not isinstance(mac, str):
        raise MetadataError("carries no authentication code (edited, or not a sealed run's)")
    if not hmac.compare_digest(mac, _mac(doc, mkey, context)):
        raise MetadataError(f"fails its authentication: edited, or not {describe(context)}")
    return {k: v for k, v in doc.items() if k != "mac"}


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
    "ContextMismatchError",
    "MetadataError",
    "NotSealedError",
    "SealedError",
    "TamperedError",
    "TruncatedError",
    "UnsupportedVersionError",
    "WrongKeyError",
    "describe",
    "generate_key",
    "is_sealed",
    "key_id",
    "load_key",
    "metadata_key",
    "open_sealed",
    "parse_key",
    "read_sealed",
    "seal_bytes",
    "sign_metadata",
    "unseal_bytes",
    "verify_metadata",
    "write_key_file",
    "write_sealed",
]
