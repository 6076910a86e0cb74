"""Unit tests of `teefl.server` on the in-memory path: the neutral service, no sockets."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fedutil and friends
