"""Can teefl federate GPT-2 Large in flat memory? (issue 23, item 5)

The payload is GPT-2 Large's architecture built from its config with Hugging Face ``transformers``
(``GPT2Config(n_embd=1280, n_layer=36, n_head=20)``: 774,030,080 parameters, a 3.35 GB state dict
in float32 -- the model of NVIDIA FLARE's comparison; random weights, nothing downloaded), moved
by a real federation: the real ``Aggregator`` in its own process under ``federation.memory:
flat`` and 1 to N collaborator processes (the real ``Collaborator`` loop, the ``noop`` workload:
"return the model unchanged", so a round is the transfer and the aggregation alone).

Printed per case (dtype x collaborators, a warm-up round and 2 measured rounds each):

- the aggregator's base RSS (after it built the model and published it: the global model once,
  in its wire layout), what it held before the model, its peak (the kernel's VmHWM, reset at
  base) and the peak above base in model sizes -- target: at most 2;
- each collaborator's peak above its RSS before it built the model, in model sizes;
- the round's transfer: from the first download's start to the last upload's end, against a raw
  TCP socket moving the same bytes (download + upload per collaborator) in the same run, through
  one reused window on both ends (`_common.raw_stream`) -- target: at most 1.5x. Measured over
  the rounds after a warm-up round, as in the other benchmarks: in round 1 each collaborator
  downloads as soon as it has built the model, while the others still build theirs on the same
  cores, so its window measures their start-up (its time is printed beside, not judged).

    .venv/bin/python benchmarks/large_model.py            # GPT-2 Large: fp32 x1, fp32 x2, bf16 x3
    .venv/bin/python benchmarks/large_model.py --quick    # GPT-2 small (124M), the same cases

GPT-2 Large needs ~18 GiB of memory free at its largest case (fp32, 2 collaborators): each
process builds the model (~13 s here), and each collaborator holds it; and ~30 GB of disk in the
temporary directory: every round's checkpoint, the updates and their spare files, and the
collaborators' kept copies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

CONFIGS = {
    "large": {"n_embd": 1280, "n_layer": 36, "n_head": 20},  # 774M parameters
    "medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},  # 355M
    "small": {"n_embd": 768, "n_layer": 12, "n_head": 12},  # 124M
}
TARGET_MODELS = 2.0
TARGET_RAW = 1.5


def _mem_total() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _comm_windows(run_dir: Path, names: list[str], rounds: range) -> dict[int, float]:
    """Per training round: first download start -> last upload end (collaborators' spans)."""
    start: dict[int, float] = {}
    end: dict[int, float] = {}
    for name in names:
        path = run_dir / "events" / f"collaborator-{name}.jsonl"
        for line in path.read_text().splitlines():
            e = json.loads(line)
            r = e.get("round")
            if e.get("type") != "span" or r not in rounds:
                continue
            if e["phase"] == "download":
                start[r] = min(start.get(r, e["t_start"]), e["t_start"])
            elif e["phase"] == "upload":
                end[r] = max(end.get(r, e["t_end"]), e["t_end"])
    return {r: end[r] - start[r] for r in sorted(start) if r in end}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="large", choices=sorted(CONFIGS))
    ap.add_argument("--cases", default="float32:1,float32:2,bfloat16:3", help="dtype:collaborators")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds (after a warm-up)")
    ap.add_argument("--quick", action="store_true", help="GPT-2 small instead of the --config")
    args = ap.parse_args()
    config = "small" if args.quick else args.config
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    t0 = time.monotonic()
    print(f"machine: {C.machine()}, {_mem_total() / 2**30:.1f} GiB memory")
    print(f"at start: {C.load()}")
    print(
        f"payload: GPT-2 {config} ({CONFIGS[config]}) from its config, random weights; "
        f"1 warm-up + {args.rounds} measured rounds per case; federation.memory: flat; "
        "transport none; noop workload\n"
    )
    rows, verdicts, needs = [], [], []
    with C.scratch("large") as tmp:
        for dtype, n in cases:
            workload = {
                "name": "noop",
                "options": {"model": "gpt2", "dtype": dtype, **CONFIGS[config]},
            }
            work = Path(tmp) / f"{dtype}-{n}"
            r = C.fed_transfer(
                f"gpt2-{config}",
                "none",
                args.rounds,
                work,
                collaborators=n,
                timeout=1800,
                warmup=1,
                federation={"memory": "flat", "max_inflight_updates": max(1, n)},
                workload=workload,
            )
            stats = json.loads((work / "run" / "agg_stats.json").read_text())
            size = int(stats["model_bytes"])
            names = [f"col{i + 1}" for i in range(n)]
            windows = _comm_windows(work / "run", names, range(1, args.rounds + 2))
            raw = C.median(C.raw_stream(size, 2))
            warm = windows.pop(1)
            comm = C.median(list(windows.values()))
            ratio = comm / (n * raw)
            above = (r.agg_peak_rss - r.agg_base_rss) / size
            held = (r.agg_base_rss - r.agg_pre_model_rss) / size
            cols = [(peak - pre) / size for pre, peak in r.col_rss.values()]
            col_peak = max(peak for _, peak in r.col_rss.values())
            needs.append((dtype, r.agg_base_rss + 2 * size, col_peak))
            rows.append(
                [
                    f"{dtype} x{n}",
                    f"{size / 1e9:.2f} GB",
                    f"{r.agg_pre_model_rss / 2**20:,.0f}",
                    f"{r.agg_base_rss / 2**20:,.0f} ({held:.2f})",
                    f"{r.agg_peak_rss / 2**20:,.0f}",
                    f"{above:.2f}",
                    " / ".join(f"{c:.2f}" for c in cols),
                    f"{comm:.1f} s ({warm:.1f} s)",
                    f"{n * raw:.1f} s",
                    f"{ratio:.2f}",
                ]
            )
            verdicts.append(
                f"{C.verdict(above <= TARGET_MODELS)}  {dtype} x{n}: aggregator peak {above:.2f} "
                f"model sizes above base (target <= {TARGET_MODELS:g})"
            )
            verdicts.append(
                f"{C.verdict(ratio <= TARGET_RAW)}  {dtype} x{n}: transfer {ratio:.2f}x the raw "
                f"socket's time for the same bytes (target <= {TARGET_RAW:g}x)"
            )
            print(f"  measured {dtype} x{n} ({time.monotonic() - t0:.0f} s)", flush=True)
    print()
    print(
        C.table(
            rows,
            [
                "case",
                "model",
                "agg pre-model MiB",
                "agg base MiB (models)",
                "agg peak MiB",
                "agg peak - base (models)",
                "collaborators peak - pre-model (models)",
                "round transfer (warm-up round)",
                "raw socket",
                "ratio",
            ],
        )
    )
    print()
    for line in verdicts:
        print(line)
    total = _mem_total()
    for dtype, agg, col in needs:
        if dtype == "float32":
            three = agg + 3 * col
            print(
                f"\nfloat32 with 3 collaborators on this host: aggregator <= {agg / 2**30:.1f} GiB "
                f"+ 3 x {col / 2**30:.1f} GiB (a collaborator's peak here) = "
                f"{three / 2**30:.1f} GiB of {total / 2**30:.1f} GiB"
            )
            break
    print(f"\ntotal {time.monotonic() - t0:.0f} s; at end: {C.load()}; pid {os.getpid()}")
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
