"""``python -m teefl`` -- the same as the ``teefl`` console script (used by the launcher)."""

from teefl.cli import main

main()
