"""Would compressing the model on the wire pay? (issue 8, item 3: optional compression).

For the ResNet-18 and MobileNetV3-Small payloads (the bytes teefl sends), in this process:
compressed size / raw size, compression and decompression time, and the link speed below which
sending fewer bytes saves more time than the compression and decompression cost -- the
break-even: saved bytes x 8 / (compress + decompress seconds).

zlib (standard library), zstd (`zstandard`, a teefl dependency) and teefl's own frame codec
(`compression.compress` / `compression.decompress`: zstd with content size and checksum, what
``network.compression: zstd`` sends), and lz4 when the `lz4` package is importable (not a
dependency: `pip install lz4` to include it).

    .venv/bin/python benchmarks/compression.py      # ~10 s
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def _codecs() -> list[tuple[str, Callable[[bytes], bytes], Callable[[bytes, int], bytes]]]:
    out = [("zlib-1", lambda b: zlib.compress(b, 1), lambda z, n: zlib.decompress(z))]
    try:
        import zstandard

        for level in (1, 3):
            comp = zstandard.ZstdCompressor(level=level)
            dec = zstandard.ZstdDecompressor()
            out.append(
                (
                    f"zstd-{level}",
                    comp.compress,
                    lambda z, n, d=dec: d.decompress(z, max_output_size=n),
                )
            )
    except ImportError:
        print("(zstandard not installed: zstd skipped)")
    else:
        from teefl.wire import compression as wire_zstd

        out.append(("teefl zstd-1", wire_zstd.compress, lambda z, n: wire_zstd.decompress(z, n, n)))
    try:
        import lz4.frame

        out.append(("lz4", lz4.frame.compress, lambda z, n: lz4.frame.decompress(z)))
    except ImportError:
        print("(lz4 not installed: lz4 skipped)")
    return out


def _best(fn: Callable[[], bytes], reps: int = 3) -> tuple[float, bytes]:
    best, out = float("inf"), b""
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    print(f"machine: {C.machine()}")
    print(f"at start: {C.load()}\n")
    rows = []
    codecs = _codecs()
    for spec in ("resnet18", "mobilenet_v3_small"):
        raw = bytes(C.payload_of(spec))
        for name, comp, dec in codecs:
            tc, z = _best(lambda c=comp, r=raw: c(r))
            td, back = _best(lambda d=dec, z=z, n=len(raw): d(z, n))
            if back != raw:
                raise SystemExit(f"{name} did not round-trip {spec}")
            saved = len(raw) - len(z)
            even = saved * 8 / (tc + td) / 1e6 if saved > 0 else 0.0
            rows.append(
                [
                    C.MODELS[spec],
                    name,
                    f"{len(z) / len(raw):.3f}",
                    f"{tc * 1e3:.0f}",
                    f"{td * 1e3:.0f}",
                    f"{even:.0f}",
                ]
            )
    print(
        C.table(
            rows,
            ["payload", "codec", "size ratio", "compress ms", "decompress ms", "pays below Mb/s"],
        )
    )
    print(f"\nat end: {C.load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
