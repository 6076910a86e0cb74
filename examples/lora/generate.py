"""Write a small generated text corpus for examples/lora: data/<name>/text.txt per collaborator.

Each party's sentences come from the same little grammar but favour different subjects and
places (party i sees mostly its own share of them), so the parties' data differ while the
language is shared -- what federated fine-tuning of a language model is for. Seeded: the same
files every time.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "carries"]
OBJECTS = ["the red ball", "a green box", "the blue door", "an apple", "the long road", "a kite"]
PLACES = ["in the park", "at home", "by the river", "on the hill", "near the shop", "at night"]


def sentence(rng: random.Random, favour: int, parties: int) -> str:
    def pick(words: list[str]) -> str:
        own = [w for i, w in enumerate(words) if i % parties == favour]
        return rng.choice(own if rng.random() < 0.7 else words)

    return f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)} {pick(PLACES)}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data"))
    ap.add_argument("--names", nargs="+", default=["col1", "col2", "col3"])
    ap.add_argument("--sentences", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for i, name in enumerate(args.names):
        rng = random.Random(args.seed * 1000 + i)
        text = " ".join(sentence(rng, i, len(args.names)) for _ in range(args.sentences))
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "text.txt").write_text(text + "\n", encoding="utf-8")
        print(f"{folder / 'text.txt'}: {len(text)} characters")


if __name__ == "__main__":
    main()
