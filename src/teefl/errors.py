"""One exception type for problems a user can fix.

The CLI prints a `TeeflError` as one line (no traceback) and exits non-zero; anything else is a
bug and keeps its traceback. Raise it with a message that says what was wrong *and* what to do.
"""


class TeeflError(Exception):
    """A user-facing error: bad input, missing file, port in use, refused peer..."""
