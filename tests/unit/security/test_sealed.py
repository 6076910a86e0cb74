"""Sealed storage: AES-256-GCM files whose every failure mode has its own clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from teefl.commands import model as model_commands
from teefl.errors import TeeflError
from teefl.security.sealed import (
    HEADER_SIZE,
    MAGIC,
    NotSealedError,
    SealedError,
    TamperedError,
    TruncatedError,
    UnsupportedVersionError,
    WrongKeyError,
    generate_key,
    is_sealed,
    load_key,
    read_sealed,
    seal_bytes,
    unseal_bytes,
    write_key_file,
    write_sealed,
)

KEY = bytes(range(32))
DATA = b"model weights " * 1000


def test_round_trip_bytes() -> None:
    blob = seal_bytes(DATA, KEY)
    assert blob.startswith(MAGIC) and len(blob) == HEADER_SIZE + len(DATA) + 16
    assert unseal_bytes(blob, KEY) == DATA
    assert unseal_bytes(seal_bytes(b"", KEY), KEY) == b""
    assert seal_bytes(DATA, KEY) != blob  # fresh nonce per file


def test_round_trip_file_atomic(tmp_path: Path) -> None:
    path = tmp_path / "model" / "final.sealed"
    write_sealed(path, DATA, KEY)
    write_sealed(path, DATA + b"v2", KEY)  # replace in place
    assert read_sealed(path, KEY) == DATA + b"v2"
    assert is_sealed(path)
    assert [p.name for p in path.parent.iterdir()] == ["final.sealed"]  # no temp files left


def test_every_bit_flip_is_refused() -> None:
    blob = seal_bytes(b"secret model bytes", KEY)
    for i in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(SealedError):
                unseal_bytes(bytes(bad), KEY)


def test_tamper_in_ciphertext_is_named() -> None:
    blob = bytearray(seal_bytes(DATA, KEY))
    blob[HEADER_SIZE + 5] ^= 0x80
    with pytest.raises(TamperedError, match="modified after sealing"):
        unseal_bytes(bytes(blob), KEY)
    nonce_flip = bytearray(seal_bytes(DATA, KEY))
    nonce_flip[HEADER_SIZE - 9] ^= 1  # inside the nonce: authenticated as AAD
    with pytest.raises(TamperedError):
        unseal_bytes(bytes(nonce_flip), KEY)


def test_truncation_is_named(tmp_path: Path) -> None:
    blob = seal_bytes(DATA, KEY)
    for cut in (1, 16, len(DATA)):
        with pytest.raises(TruncatedError, match="truncated"):
            unseal_bytes(blob[:-cut], KEY)
    with pytest.raises(TruncatedError, match="inside its header"):
        unseal_bytes(blob[: HEADER_SIZE - 3], KEY)
    path = tmp_path / "cut.sealed"
    path.write_bytes(blob[:100])
    with pytest.raises(TruncatedError, match=str(path)):
        read_sealed(path, KEY)
    with pytest.raises(TamperedError, match="header says"):
        unseal_bytes(blob + b"x", KEY)  # appended bytes


def test_wrong_key_is_named() -> None:
    blob = seal_bytes(DATA, KEY)
    with pytest.raises(WrongKeyError, match="wrong key"):
        unseal_bytes(blob, generate_key())


def test_bad_header_is_named() -> None:
    with pytest.raises(NotSealedError, match="not a teefl sealed file"):
        unseal_bytes(b"PK\x03\x04 a zip file", KEY)
    with pytest.raises(NotSealedError):
        unseal_bytes(b"", KEY)
    blob = bytearray(seal_bytes(DATA, KEY))
    blob[len(MAGIC)] = 9
    with pytest.raises(UnsupportedVersionError, match="version 9"):
        unseal_bytes(bytes(blob), KEY)


def test_bad_key_size() -> None:
    with pytest.raises(SealedError, match="32 bytes"):
        seal_bytes(DATA, b"short")


def test_load_key_file_raw_hex_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw.key"
    raw.write_bytes(KEY)
    hexed = tmp_path / "hex.key"
    hexed.write_text(KEY.hex() + "\n")
    for f in (raw, hexed):
        f.chmod(0o600)  # as `teefl model keygen` makes it; anything else is refused
    assert load_key(raw) == load_key(hexed) == KEY
    monkeypatch.setenv("TEEFL_TEST_KEY", KEY.hex())
    assert load_key(key_env="TEEFL_TEST_KEY") == KEY
    monkeypatch.setenv("TEEFL_TEST_KEY", "abcd")
    with pytest.raises(SealedError, match="2 bytes"):
        load_key(key_env="TEEFL_TEST_KEY")
    monkeypatch.setenv("TEEFL_TEST_KEY", "not hex")
    with pytest.raises(SealedError, match="not hex"):
        load_key(key_env="TEEFL_TEST_KEY")
    with pytest.raises(SealedError, match="is not set"):
        load_key(key_env="TEEFL_TEST_KEY_UNSET")
    with pytest.raises(SealedError, match="exactly one"):
        load_key(raw, "TEEFL_TEST_KEY")
    with pytest.raises(SealedError, match="not found"):
        load_key(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    bad.write_text("too short")
    with pytest.raises(SealedError, match="32 raw bytes or 64 hex"):
        load_key(bad)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_group_or_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "owner.key"
    write_key_file(path)
    path.chmod(mode)
    with pytest.raises(TeeflError) as err:
        load_key(path)
    assert str(err.value) == (
        f"sealing key file {path} is accessible by group or others (mode {mode:04o}); "
        f"run: chmod 600 {path}"
    )
    path.chmod(0o400)
    assert len(load_key(path)) == 32


def test_key_file_mode_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key = write_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key(path) == key
    with pytest.raises(SealedError, match="refusing to overwrite"):
        write_key_file(path)
    assert write_key_file(path, overwrite=True) != key


# ---------------------------------------------------------------------------------------------
# CLI: teefl model keygen / decrypt
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def app() -> typer.Typer:
    app = typer.Typer()
    model_commands.register(app)
    return app


def test_cli_keygen_and_decrypt(tmp_path: Path, app: typer.Typer) -> None:
    runner = CliRunner()
    key_path = tmp_path / "owner.key"
    result = runner.invoke(app, ["model", "keygen", str(key_path)])
    assert result.exit_code == 0, result.output
    assert key_path.stat().st_mode & 0o777 == 0o600
    key = load_key(key_path)
    sealed = tmp_path / "final.sealed"
    write_sealed(sealed, DATA, key)
    out = tmp_path / "out" / "final.safetensors"
    result = runner.invoke(
        app, ["model", "decrypt", str(sealed), str(out), "--key-file", str(key_path)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == DATA
    assert out.stat().st_mode & 0o777 == 0o600

    out2 = tmp_path / "env.bin"
    result = runner.invoke(
        app,
        ["model", "decrypt", str(sealed), str(out2), "--key-env", "OWNER_KEY"],
        env={"OWNER_KEY": key.hex()},
    )
    assert result.exit_code == 0, result.output
    assert out2.read_bytes() == DATA


def test_cli_decrypt_never_writes_through_a_planted_symlink(
    tmp_path: Path, app: typer.Typer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_path = tmp_path / "owner.key"
    key = write_key_file(key_path)
    sealed = tmp_path / "final.sealed"
    write_sealed(sealed, DATA, key)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out" / "final.safetensors"
    out.parent.mkdir()
    # another user plants the temporary file's former fixed name, and OUT itself, as links
    (out.parent / f".{out.name}.tmp").symlink_to(victim)
    out.symlink_to(victim)
    args = ["model", "decrypt", str(sealed), str(out), "--key-file", str(key_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink() and out.read_bytes() == DATA
    assert out.stat().st_mode & 0o777 == 0o600
    # a link planted under the very name the temporary file gets: refused, nothing written
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n=None: "guessed")
    planted = out.parent / f".{out.name}.guessed.tmp"
    planted.symlink_to(victim)
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, TeeflError), result.output
    assert f"cannot write {out}: File exists" == str(result.exception)
    assert victim.read_bytes() == b"precious" and planted.is_symlink()


def test_cli_decrypt_wrong_key_is_a_teefl_error(tmp_path: Path, app: typer.Typer) -> None:
    sealed = tmp_path / "final.sealed"
    write_sealed(sealed, DATA, KEY)
    other = tmp_path / "other.key"
    write_key_file(other)
    result = CliRunner().invoke(
        app, ["model", "decrypt", str(sealed), str(tmp_path / "o"), "--key-file", str(other)]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, TeeflError)
    assert "wrong key" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_cli_keygen_refuses_overwrite(tmp_path: Path, app: typer.Typer) -> None:
    path = tmp_path / "k"
    path.write_text("existing")
    result = CliRunner().invoke(app, ["model", "keygen", str(path)])
    assert isinstance(result.exception, TeeflError)
    assert path.read_text() == "existing"
    assert os.stat(path).st_size == len("existing")


# ---------------------------------------------------------------------------------------------
# Bound files (format version 2): which run, round, party and kind a file is
# ---------------------------------------------------------------------------------------------
CTX = {"run": "r1", "round": 3, "party": "aggregator", "kind": "checkpoint"}


def test_a_bound_file_says_what_it_is_and_needs_only_the_key() -> None:
    from teefl.security.sealed import open_sealed

    blob = seal_bytes(DATA, KEY, CTX)
    assert blob[len(MAGIC)] == 2
    assert open_sealed(blob, KEY) == (DATA, CTX)  # self-describing: decrypt needs the key alone
    assert unseal_bytes(blob, KEY) == DATA
    assert unseal_bytes(blob, KEY, expect=CTX) == DATA
    assert open_sealed(seal_bytes(DATA, KEY), KEY) == (DATA, None)  # version 1: no context


def test_another_context_is_refused_where_one_is_expected() -> None:
    from teefl.security.sealed import ContextMismatchError

    older = seal_bytes(DATA, KEY, {**CTX, "round": 1})
    with pytest.raises(ContextMismatchError, match="holds round 1's checkpoint of run 'r1', "):
        unseal_bytes(older, KEY, expect=CTX)
    for other in ({**CTX, "run": "r0"}, {**CTX, "kind": "final"}, {**CTX, "party": "col1"}):
        with pytest.raises(ContextMismatchError, match="put in its place"):
            unseal_bytes(seal_bytes(DATA, KEY, other), KEY, expect=CTX)
    with pytest.raises(ContextMismatchError, match="without a context"):
        unseal_bytes(seal_bytes(DATA, KEY), KEY, expect=CTX)  # an unbound file is not bound


def test_every_bit_flip_of_a_bound_file_is_refused() -> None:
    blob = seal_bytes(b"secret", KEY, {"run": "r", "round": 1, "party": "c", "kind": "update"})
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 1
        with pytest.raises(SealedError):
            unseal_bytes(bytes(bad), KEY)


def test_a_bound_files_context_cannot_be_rewritten() -> None:
    blob = seal_bytes(DATA, KEY, CTX)
    # the same length, another round: "round":3 -> "round":5
    forged = blob.replace(b'"round":3', b'"round":5')
    assert forged != blob
    with pytest.raises(TamperedError):
        unseal_bytes(forged, KEY)
    with pytest.raises(TruncatedError):
        unseal_bytes(blob[: HEADER_SIZE + 5], KEY)  # cut inside the context


def test_metadata_mac_binds_content_and_context() -> None:
    from teefl.security.sealed import (
        MetadataError,
        metadata_key,
        sign_metadata,
        verify_metadata,
    )

    mkey = metadata_key(KEY)
    assert mkey != KEY and len(mkey) == 32 and metadata_key(KEY) == mkey
    ctx = {"run": "r1", "round": 2, "party": "col1", "kind": "update"}
    doc = sign_metadata({"samples": 10, "sha256": "ab"}, mkey, ctx)
    assert verify_metadata(doc, mkey, ctx) == {"samples": 10, "sha256": "ab"}
    with pytest.raises(MetadataError, match="fails its authentication"):
        verify_metadata({**doc, "samples": 10**6}, mkey, ctx)
    with pytest.raises(MetadataError, match="not col1's update for round 3"):
        verify_metadata(doc, mkey, {**ctx, "round": 3})
    with pytest.raises(MetadataError, match="no authentication code"):
        verify_metadata({"samples": 10, "sha256": "ab"}, mkey, ctx)
    with pytest.raises(MetadataError):
        verify_metadata(doc, metadata_key(generate_key()), ctx)


def test_cli_decrypts_a_bound_file(tmp_path: Path, app: typer.Typer) -> None:
    key_path = tmp_path / "owner.key"
    key = write_key_file(key_path)
    sealed = tmp_path / "final.safetensors.sealed"
    sealed.write_bytes(seal_bytes(DATA, key, {**CTX, "kind": "final"}))
    out = tmp_path / "final.safetensors"
    result = CliRunner().invoke(
        app, ["model", "decrypt", str(sealed), str(out), "--key-file", str(key_path)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == DATA
