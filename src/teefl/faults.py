"""Fault injection for the crash tests: a process kills itself at an exact point of a round.

``TEEFL_FAULT_INJECT=<point>:<round>`` makes the process that reaches ``point`` in that round
SIGKILL itself. Collaborator points: ``download``, ``train``, ``upload``. Aggregator points:
``acked`` (an update of the data plane acknowledged and stored, before its FedAvg add),
``settle`` (an update acknowledged from shared memory and summed, not yet moved to the run
directory), ``checkpoint`` (the round's checkpoint being written: its temporary file exists, the
round is closed in memory and the next one may be open, nothing of it is durable), ``startup``
(a restarted aggregator with the open round ``round`` replayed, before it serves), ``durable``
(the round's checkpoint, strategy state and resume pointer durable; its stored updates not yet
dropped, run.json not yet updated).
Unset in normal use, where `fault` costs one environment lookup.
"""

from __future__ import annotations

import logging
import os
import signal

FAULT_ENV = "TEEFL_FAULT_INJECT"

log = logging.getLogger("teefl.faults")


def fault(point: str, rnd: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}:{rnd}":
        log.warning("fault injection: killing myself at %s of round %d", point, rnd)
        os.kill(os.getpid(), signal.SIGKILL)
