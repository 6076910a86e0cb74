"""Write a small folder of PNGs for each collaborator: DIR/<name>/<class>/<i>.png.

Three classes a CNN trained from scratch tells apart within a few epochs: ``dots``,
``horizontal`` and ``vertical`` stripes, drawn in a colour that leans to red, green or blue
respectively, with random shades, stripe period and phase, plus pixel noise. The layout is
torchvision's ImageFolder (one sub-folder per class), which is what the ``image-folder``
workload reads. Each party gets its own images (another seed) and its
own class balance (not IID).

    python generate.py --out data                 # data/col1/horizontal/0.png, ...
    python generate.py --out data --names a,b --images 120 --size 32 --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["dots", "horizontal", "vertical"]


def make_image(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``cls``."""
    # the pattern's colour leans to one channel per class (red, green, blue); the background
    # is dark and random
    fg = rng.integers(0, 110, size=3)
    fg[CLASSES.index(cls)] = rng.integers(180, 256)
    bg = rng.integers(0, 60, size=3)
    period = int(rng.integers(8, 15))
    phase = int(rng.integers(0, period))
    yy, xx = np.mgrid[0:size, 0:size]
    if cls == "horizontal":
        on = ((yy + phase) % period) < period // 2
    elif cls == "vertical":
        on = ((xx + phase) % period) < period // 2
    else:
        on = (((yy + phase) % period) < period // 2) & (((xx + phase) % period) < period // 2)
    img = np.where(on[..., None], fg, bg).astype(np.float32)
    img += rng.normal(0, 20, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def generate(out: Path, names: list[str], images: int, size: int, seed: int) -> list[Path]:
    """``images`` PNGs per party, split over the classes in a party-specific proportion."""
    dirs = []
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])
        share = np.roll([0.45, 0.33, 0.22], i)
        counts = np.floor(share * images).astype(int)
        counts[0] += images - counts.sum()
        for cls, n in zip(CLASSES, counts, strict=True):
            d = out / name / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                make_image(cls, size, rng).save(d / f"{k}.png")
        dirs.append(out / name)
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data"), help="parent of the party folders")
    ap.add_argument("--names", default="col1,col2,col3", help="comma-separated party names")
    ap.add_argument("--images", type=int, default=150, help="images per party")
    ap.add_argument("--size", type=int, default=32, help="image width and height in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for d in generate(args.out, args.names.split(","), args.images, args.size, args.seed):
        print(d)


if __name__ == "__main__":
    main()
