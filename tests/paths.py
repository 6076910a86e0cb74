"""Where the repository is, for tests at any depth under tests/."""

from pathlib import Path

#: the repository root (tests/ is directly below it)
REPO = Path(__file__).resolve().parents[1]
