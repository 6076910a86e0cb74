"""`MockTransport`: a client transport that is a function from request to response, as httpx's.

For unit tests of the collaborator's loop and session without sockets: the handler plays the
aggregator -- it returns the reply a request gets, or raises `Lost`, `Stale` or `Refused` --
and every request is recorded in ``requests`` for the test to look at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from teefl.transport.client import Request


class MockTransport:
    """``handler(request) -> response``; ``requests``: every request handled, in order."""

    def __init__(self, handler: Callable[[Request], Any]) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.closed = False

    def handle(self, request: Request) -> Any:
        self.requests.append(request)
        return self.handler(request)

    def close(self) -> None:
        self.closed = True
