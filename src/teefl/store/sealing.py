"""How the aggregator's files of one run are written and read: plain, or (``at_rest: sealed``)
sealed bound to their run, round, party and kind, with metadata under an HMAC.

One place decides both, so a checkpoint, a strategy state and a stored update cannot differ in
how they are protected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from teefl.store.atomic import write_atomic


class FileSealer:
    """Seals (or not) the payload files and metadata of one run.

    ``run_id``: bound into every sealed file and metadata MAC, so that another run's files are
    refused. ``mkey``: the metadata key derived from ``seal_key`` (None: a plain run).
    """

    def __init__(self, seal_key: bytes | None = None, run_id: str = "") -> None:
        self.seal_key, self.run_id = seal_key, run_id
        self.mkey: bytes | None = None
        if seal_key is not None:
            from teefl.security.sealed import metadata_key

            self.mkey = metadata_key(seal_key)

    @property
    def sealed(self) -> bool:
        return self.seal_key is not None

    def suffix(self) -> str:
        return ".safetensors.sealed" if self.seal_key else ".safetensors"

    def context(self, kind: str, rnd: int | None = None, party: str = "aggregator") -> dict:
        """What a sealed file or a metadata MAC is bound to (see `sealed.seal_bytes`)."""
        ctx: dict[str, Any] = {"run": self.run_id, "kind": kind, "party": party}
        if rnd is not None:
            ctx["round"] = rnd
        return ctx

    def write(
        self,
        path: Path,
        payload: bytes | bytearray,
        fsync: bool = True,
        pause: Callable[[], None] | None = None,
        context: dict[str, Any] | None = None,
    ) -> Path:
        """``payload`` to ``path`` atomically (`write_atomic`), sealed to ``context`` in a
        sealed run."""
        if self.seal_key is None:
            write_atomic(path, payload, fsync, pause)
            return path
        from teefl.security.sealed import seal_bytes

        assert context is not None  # every sealed file of a run says what it is
        write_atomic(path, seal_bytes(payload, self.seal_key, context), fsync, pause)
        return path

    def read(self, path: Path, context: dict[str, Any]) -> bytes:
        """The payload at ``path``; in a sealed run, refused unless sealed to ``context``."""
        if self.seal_key is None:
            return path.read_bytes()
        from teefl.security.sealed import read_sealed

        return read_sealed(path, self.seal_key, expect=context)

    def signed(self, doc: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """``doc`` with its HMAC bound to ``context`` (a sealed run), else ``doc`` itself."""
        if self.mkey is None:
            return doc
        from teefl.security.sealed import sign_metadata

        return sign_metadata(doc, self.mkey, context)

    def verified(self, doc: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """``doc`` without its HMAC, checked against ``context`` (a sealed run: raises
        `SealedError` where it fails), else ``doc`` itself."""
        if self.mkey is None:
            return doc
        from teefl.security.sealed import verify_metadata

        return verify_metadata(doc, self.mkey, context)
