"""What TLS and mTLS cost teefl's model transfer (issue 3).

For a ResNet-18-sized and a MobileNetV3-Small-sized model (the real state dicts of
``teefl.workload.models.build_model(name, 3, 10)``), on loopback, with transport none, tls and
mtls: download + upload time through the real aggregator (``Aggregator``, its own process) and the
real collaborator loop (``Collaborator``, its own process, training replaced by "return the model
unchanged"). The figure is the collaborator's ``download`` + ``upload`` spans, exactly what a run
reports as communication time; round 1 is a warm-up, the table shows medians of ``--reps`` rounds
and the ratios tls/none and mtls/none.

    .venv/bin/python benchmarks/transport_overhead.py          # ~2-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

TRANSPORTS = ("none", "tls", "mtls")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="measured rounds per configuration (>= 5)")
    ap.add_argument("--passes", type=int, default=2, help="interleaved passes (pooled medians)")
    args = ap.parse_args()
    t0 = time.monotonic()
    print(f"machine: {C.machine()}")
    print(f"at start: {C.load()}")
    print(
        f"repetitions: {args.passes} interleaved passes x {args.reps} rounds (+1 warm-up) per "
        "configuration; pooled medians; loopback\n"
    )
    rows = []
    comm: dict[tuple[str, str], list[float]] = {}
    sizes: dict[str, int] = {}
    specs = ("resnet18", "mobilenet_v3_small")
    with C.scratch("transport") as tmp:
        # passes interleave none/tls/mtls, so a burst of load elsewhere hits all of them
        for n in range(args.passes):
            for spec in specs:
                for t in TRANSPORTS:
                    r = C.fed_transfer(spec, t, args.reps, Path(tmp) / f"{spec}-{t}-{n}")
                    comm.setdefault((spec, t), []).extend(r.comm)
                    sizes[spec] = r.bytes
                print(
                    f"  pass {n + 1}/{args.passes}: {C.MODELS[spec]} "
                    f"({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
    for spec in specs:
        c = {t: C.median(comm[(spec, t)]) for t in TRANSPORTS}
        rows.append(
            [
                C.MODELS[spec],
                f"{sizes[spec] / 1e6:.1f}",
                *(f"{c[t] * 1e3:.1f}" for t in TRANSPORTS),
                f"{c['tls'] / c['none']:.2f}",
                f"{c['mtls'] / c['none']:.2f}",
            ]
        )
    print()
    print(
        C.table(
            rows,
            ["model", "MB", "none ms", "tls ms", "mtls ms", "tls/none", "mtls/none"],
        )
    )
    print("\nms = median download+upload per round as the collaborator's spans record it.")
    print(f"at end: {C.load()}")
    print(f"total time {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
