"""How ``teefl run`` stops on a signal: SIGINT, SIGTERM and SIGHUP become one KeyboardInterrupt,
at a moment when the launcher's list of children is complete (see `StopSignals`)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP end ``teefl run`` the way Ctrl-C does: as a KeyboardInterrupt,
    after which the launcher stops every child (TERM, then KILL after a bound) and records the run
    as interrupted.

    Why a handler of our own: the children run in their own sessions (a Ctrl-C in the terminal
    must reach only the launcher, which stops them in order), so nothing but the launcher can
    stop them -- and SIGTERM's and SIGHUP's default action killed the launcher on the spot,
    leaving every child running and run.json saying "running". The first signal interrupts;
    later ones are ignored, so they cannot cut the clean-up short. Inside `deferred` (a child
    being started and recorded) a signal only takes effect at the end of the block, so no child
    escapes the list the clean-up walks.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self.fired = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.fired:
            return
        if self.depth:
            self.pending = signum
            return
        self.fired = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self.pending is not None and not self.fired:
                self.fired = True
                raise KeyboardInterrupt


#: the one handler of this process; the launcher defers it while it starts a child
stop = StopSignals()
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_stop_handlers() -> None:
    """Route SIGINT, SIGTERM and SIGHUP through `StopSignals` (main thread only).

    A signal the process was started with ignored (``nohup``, a background job's SIGINT) stays
    ignored: whoever started it asked for that.
    """
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, stop)
