"""A run's checkpoints and its resume pointer: what a restarted aggregator resumes from.

After every round the checkpoint ``model/round-NNNN.safetensors`` (sealed when the plan says
so), the strategy's state after it, and only then ``state.json`` naming both with their
SHA-256, each written atomically (temp file, fsync, rename): the pointer never names a file
that is not durable, and the strategy state it restores always belongs to its checkpoint. In a
sealed run ``state.json`` carries an HMAC, and every file is bound to its run and round, so an
edited pointer or an older checkpoint put in place is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teefl.errors import TeeflError
from teefl.rundir import RunDir
from teefl.store.atomic import write_atomic
from teefl.store.files import matches
from teefl.store.sealing import FileSealer


@dataclass
class Resume:
    """What `Checkpoints.load_resume` found: the last completed round, its checkpoint's
    payload, the strategy that made it (None: a run directory older than strategies) and that
    strategy's encoded state after it (None: it keeps none)."""

    round: int
    payload: bytes
    strategy: str | None = None
    strategy_state: bytes | None = None


class Checkpoints:
    """Checkpoints, strategy states, the final model and ``state.json`` of one run directory."""

    def __init__(self, rd: RunDir, files: FileSealer) -> None:
        self.rd, self.files, self.run_dir = rd, files, rd.path

    def _checkpoint_name(self, rnd: int, final: bool) -> str:
        return RunDir.checkpoint_name(rnd, final, sealed=self.files.sealed)

    def _strategy_name(self, rnd: int) -> str:
        return f"model/strategy-round-{rnd:04d}{self.files.suffix()}"

    def save_checkpoint(
        self,
        rnd: int,
        payload: bytes,
        final: bool,
        sha256: bytes | None = None,
        crc32c: int | None = None,
        pause: Callable[[], None] | None = None,
        strategy: str | None = None,
        strategy_state: bytes | None = None,
    ) -> Path:
        """Checkpoint of a completed round, then the resume pointer; the final model too.

        ``strategy``: the name of the strategy that made the round; ``strategy_state``: its
        encoded state after the round (`teefl.strategy.encode_state`; None: it keeps none),
        written durably before the resume pointer, which names both -- so the state a restart
        restores always belongs to the checkpoint it resumes from.

        The resume pointer records the payload's digest the caller already has -- its SHA-256,
        else its CRC32C (both computed to announce the download) -- and only without either is
        the model hashed here. A CRC catches the accidental corruption this check is for;
        sealed checkpoints are authenticated by AES-GCM as well, bound to their run and round,
        and the pointer by its HMAC. ``pause``: see `write_atomic`.
        """
        files = self.files
        path = files.write(
            self.run_dir / self._checkpoint_name(rnd, False),
            payload,
            True,
            pause,
            files.context("checkpoint", rnd),
        )
        if final:
            path = files.write(self.final_path(), payload, True, pause, files.context("final", rnd))
        state: dict[str, Any] = {
            "completed_round": rnd,
            "checkpoint": str(path.relative_to(self.run_dir)),
            "final": final,
        }
        if strategy is not None:
            state["strategy"] = strategy
        if strategy_state is not None:
            name = self._strategy_name(rnd)
            files.write(
                self.run_dir / name, strategy_state, True, pause, files.context("strategy", rnd)
            )
            state["strategy_state"] = name
            state["strategy_sha256"] = hashlib.sha256(strategy_state).hexdigest()
        if sha256:
            state["sha256"] = sha256.hex()
        elif crc32c is not None:
            state["crc32c"] = int(crc32c)
        else:
            state["sha256"] = hashlib.sha256(payload).hexdigest()
        state = files.signed(state, files.context("state"))
        write_atomic(self.rd.state, json.dumps(state, indent=2).encode())
        return path

    def final_path(self) -> Path:
        return self.rd.final_model(sealed=self.files.sealed)

    def load_state(self) -> tuple[int, bytes] | None:
        """(last completed round, its global model payload), or None for a fresh run (see
        `load_resume`)."""
        resume = self.load_resume()
        return None if resume is None else (resume.round, resume.payload)

    def load_resume(self) -> Resume | None:
        """What a restart resumes from, or None for a fresh run: the last completed round, its
        global model payload, and the strategy state saved with it.

        Refused with one line naming the fault: a ``state.json`` that does not parse, that names
        any other file than its round's checkpoint (never a path outside ``model/``), or, in a
        sealed run, whose HMAC fails (edited, or another run's); a checkpoint that is not that
        round's of this run (a rollback), or that fails its checksum.
        """
        path = self.rd.state
        if not path.exists():
            return None
        from teefl.security.sealed import SealedError

        files = self.files
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            state = files.verified(state, files.context("state"))
            rnd, final = state["completed_round"], state.get("final", False)
            if type(rnd) is not int or rnd < 1 or type(final) is not bool:
                raise ValueError(f"completed_round {rnd!r} / final {final!r} are not valid")
            name = self._checkpoint_name(rnd, final)
            if state["checkpoint"] != name:
                raise ValueError(f"it names checkpoint {state['checkpoint']!r}, expected {name!r}")
            kind = "final" if final else "checkpoint"
            payload = files.read(self.run_dir / name, files.context(kind, rnd))
            strategy, sstate = state.get("strategy"), None
            if strategy is not None and not isinstance(strategy, str):
                raise ValueError(f"strategy {strategy!r} is not a name")
            if "strategy_state" in state:
                sname = self._strategy_name(rnd)
                if state["strategy_state"] != sname:
                    raise ValueError(
                        f"it names strategy state {state['strategy_state']!r}, expected {sname!r}"
                    )
                sstate = files.read(self.run_dir / sname, files.context("strategy", rnd))
                if hashlib.sha256(sstate).hexdigest() != state.get("strategy_sha256"):
                    raise TeeflError(f"cannot resume: strategy state {sname} fails its checksum")
        except SealedError as exc:
            raise TeeflError(f"cannot resume from {path}: {exc}; refusing to resume") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TeeflError(f"cannot resume from {path}: {exc}") from None
        if not matches(payload, state):
            raise TeeflError(f"cannot resume: checkpoint {name} fails its checksum")
        return Resume(rnd, payload, strategy, sstate)
