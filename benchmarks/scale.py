"""Does the aggregator's memory stay flat as collaborators are added? (issue 8, item 4)

One aggregator (the real ``Aggregator``, its own process) with 4, 16 and 32 collaborator processes
(the real ``Collaborator`` loop, training replaced by "return the model unchanged", so every
collaborator uploads at the same moment -- the worst case for the aggregator's memory). Payload:
MobileNetV3-Small's state dict (5.9 MB, 244 tensors) by default. The aggregator's peak RSS is the
kernel's (VmHWM, reset once the model is built); the script prints it above the RSS it had then, the
median round time (round opened -> round closed, aggregator events), and a PASS/FAIL line for
the target: peak RSS grows by less than 2 model sizes from 4 to 32 collaborators.

    .venv/bin/python benchmarks/scale.py                        # ~3-6 min on 2 cores

The aggregator bounds the updates it receives at once (``federation.max_inflight_updates``, 4 by
default): beyond that, an upload sends only its header and waits until the aggregator grants it a
slot, and at most ``federation.max_concurrent_downloads`` downloads stream at once. The child
records its RSS timeline (``rss_timeline`` in ``agg_stats.json``) to see where memory grows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

TARGET_MODELS = 2.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="4,16,32", help="collaborator counts (comma-separated)")
    ap.add_argument("--model", default="mobilenet_v3_small", help="payload: teefl model name")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (+1 warm-up)")
    ap.add_argument(
        "--patch",
        action="append",
        default=[],
        help="candidate aggregator change applied in the child (see benchmarks/_common.py)",
    )
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    t0 = time.monotonic()
    print(f"machine: {C.machine()}")
    print(f"at start: {C.load()}")
    print(
        f"payload: {C.MODELS.get(args.model, args.model)}; {args.rounds} measured rounds "
        f"(+1 warm-up); transport none; patches: {', '.join(args.patch) or 'none'}\n"
    )
    rows, peaks = [], {}
    size = 0
    with C.scratch("scale") as tmp:
        for n in counts:
            r = C.fed_transfer(
                args.model,
                "none",
                args.rounds,
                Path(tmp) / f"n{n}",
                collaborators=n,
                patches=args.patch,
                timeout=400,
                rss_timeline=True,
            )
            size = r.bytes
            growth = r.agg_peak_rss - r.agg_base_rss
            peaks[n] = r.agg_peak_rss
            rows.append(
                [
                    str(n),
                    f"{r.agg_base_rss / 2**20:.0f}",
                    f"{r.agg_peak_rss / 2**20:.0f}",
                    f"{growth / 2**20:.0f} ({growth / size:.1f} models)",
                    f"{C.median(r.rounds) * 1e3:.0f}",
                    f"{C.median(r.comm) * 1e3:.0f}",
                ]
            )
            print(f"  measured {n} collaborators ({time.monotonic() - t0:.0f} s)", flush=True)
    print()
    print(
        C.table(
            rows,
            [
                "collaborators",
                "base RSS MiB",
                "peak RSS MiB",
                "peak - base",
                "round ms",
                "comm ms/collab",
            ],
        )
    )
    lo, hi = counts[0], counts[-1]
    grew = (peaks[hi] - peaks[lo]) / size
    ok = grew < TARGET_MODELS
    print(
        f"\n{C.verdict(ok)}: aggregator peak RSS grows by {grew:.1f} model sizes "
        f"({(peaks[hi] - peaks[lo]) / 2**20:.0f} MiB, model {size / 1e6:.1f} MB) from {lo} to {hi} "
        f"collaborators (target < {TARGET_MODELS:g})"
    )
    print(f"at end: {C.load()}")
    print(f"total time {time.monotonic() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
