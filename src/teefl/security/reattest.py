"""When an accepted attestation must be renewed (``security.attestation.reattest_every``).

One rule, used by both sides: the aggregator for each collaborator's evidence (it answers a
WaitRound with ``reattest`` and refuses the model and updates of a later round until a new Join
with fresh evidence), and each collaborator for the aggregator's evidence (it Challenges and
Joins again before taking part in the round). Pure bookkeeping, no I/O: what fresh evidence is
and how it is checked is the Join's (`teefl.security.attest`).

The rule is checked when a party is handed a round, never in the middle of one: a round begun
under a valid attestation is finished under it (its update counts even if ``seconds`` run out
while it trains), so an expiry can never throw away work that was admitted. Why: the evidence
speaks for the key and the code that hold the round's model from its download on; a renewal in
mid-round would prove nothing more about that model and would void an honest update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Attested:
    """One accepted attestation: the round open when it was accepted, the monotonic time it was
    accepted at, and the last round handed to the party under it (``began``)."""

    round: int
    at: float
    began: int = 0


@dataclass(frozen=True)
class Cadence:
    """``rounds``: an attestation accepted while round r is open covers rounds r .. r+rounds-1;
    ``seconds``: it covers every round handed out within that many seconds of its acceptance."""

    rounds: int | None = None
    seconds: float | None = None

    @classmethod
    def of(cls, spec: Any) -> Cadence | None:
        """The cadence of a plan's ``security.attestation`` (None: attest at Join only)."""
        every = spec.reattest_every
        if every is None:
            return None
        return cls(every.rounds, every.seconds)

    def describe(self) -> str:
        if self.rounds is not None:
            return f"every {self.rounds} round{'s' if self.rounds != 1 else ''}"
        return f"every {self.seconds:g} s"

    def due(self, last: Attested, rnd: int, now: float) -> bool:
        """Whether ``last`` no longer covers round ``rnd`` at monotonic time ``now``: the party
        must attest again before it gets that round's model or sends that round's update."""
        if rnd <= last.began:  # begun under this attestation: finished under it
            return False
        if self.rounds is not None and rnd - last.round >= self.rounds:
            return True
        return self.seconds is not None and now - last.at >= self.seconds

    def admit(self, last: Attested, rnd: int, now: float) -> bool:
        """Hand round ``rnd`` to the party if ``last`` covers it (and remember that the round
        was begun under it); False when the party must attest again first."""
        if self.due(last, rnd, now):
            return False
        last.began = max(last.began, rnd)
        return True
