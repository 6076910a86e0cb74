"""Fabricated run directories for the analysis tests, following docs/architecture.md exactly.

Why fabricate instead of running a federation: the analysis must be testable without torch or a
network, and with known numbers (every span duration below is chosen, so T, communication time and
phase means can be checked exactly). Other analysis tests import `fabricate_run` from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

#: per-phase seconds of one collaborator's round before scaling (test data, not a TEE model)
PHASE_SECONDS = {
    "download": 0.20,
    "validate_global": 0.30,
    "train": 2.00,
    "validate_local": 0.30,
    "serialize": 0.05,
    "upload": 0.25,
}
AGG_WALL0 = 1_700_000_000.0

#: state dict of the fake model: 178 parameters, 8 tensors, 784 bytes
FAKE_STATE = {
    "conv.weight": np.ones((8, 1, 3, 3), dtype=np.float32),
    "bn.weight": np.ones(8, dtype=np.float32),
    "bn.bias": np.zeros(8, dtype=np.float32),
    "bn.running_mean": np.zeros(8, dtype=np.float32),
    "bn.running_var": np.ones(8, dtype=np.float32),
    "bn.num_batches_tracked": np.array(5, dtype=np.int64),
    "fc.weight": np.ones((10, 8), dtype=np.float32),
    "fc.bias": np.zeros(10, dtype=np.float32),
}


def base_plan(rounds: int = 3, collaborators: int = 3) -> dict[str, Any]:
    """A resolved plan as plan.yaml would hold it (teefl.plan.Plan.model_dump shape)."""
    return {
        "name": "study",
        "seed": 0,
        "collaborators": [f"col{i + 1}" for i in range(collaborators)],
        "federation": {"rounds": rounds, "round_timeout": 3600.0},
        "model": {"name": "resnet18"},
        "dataset": {
            "name": "mnist",
            "root": "/data/mnist",
            "max_samples_per_collaborator": None,
            "max_test_samples": None,
            "test_split": "shard",
        },
        "partition": {"kind": "iid", "alpha": 0.5},
        "training": {
            "epochs": 1,
            "batch_size": 64,
            "lr": 0.0001,
            "optimizer": "adam",
            "threads": None,
            "device": "auto",
        },
        "network": {"host": "127.0.0.1", "port": 0, "listen": None, "chunk_size": 1048576},
        "security": {"transport": "none", "tls": {"ca": None}},
    }


def _writer(path: Path, run_id: str, process: str, role: str):
    fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by the caller

    def write(rec: dict[str, Any]) -> None:
        fh.write(json.dumps({"run": run_id, "process": process, "role": role, **rec}) + "\n")

    return fh, write


def fabricate_run(
    root: Path,
    run_id: str,
    *,
    model: str = "resnet18",
    dataset: str = "mnist",
    transport: str = "none",
    launcher: str = "native",
    tee: str = "none",
    attestation: str = "off",
    at_rest: str = "plain",
    rounds: int = 3,
    collaborators: int = 3,
    slow: float = 1.0,
    comm_slow: float = 1.0,
    status: str = "completed",
    run_span: bool = True,
    model_info: bool = True,
    write_model: bool = True,
    torn_line: bool = False,
    plan_overrides: dict[str, Any] | None = None,
    host: str = "hostA",
) -> Path:
    """Write ``root/run_id`` as a real federation would and return its path.

    Timeline (global seconds from the aggregator's start): collaborators connect, then each
    round opens when the previous checkpoint is written; collaborator i is ``1 + 0.1 i`` times
    slower; every duration is scaled by ``slow`` (communication by ``slow * comm_slow``). Each
    process has its own monotonic clock base, tied to the wall clock by its anchor.
    """
    run_dir = root / run_id
    (run_dir / "events").mkdir(parents=True)
    (run_dir / "env").mkdir()
    names = [f"col{i + 1}" for i in range(collaborators)]
    plan = base_plan(rounds, collaborators)
    plan["model"]["name"] = model
    plan["dataset"]["name"] = dataset
    plan["security"]["transport"] = transport
    for key, value in (plan_overrides or {}).items():
        section, _, leaf = key.partition(".")
        if leaf:
            plan[section][leaf] = value
        else:
            plan[section] = value
    (run_dir / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))

    agg_mono0 = 1000.0
    col_mono0 = {n: 50_000.0 + 1000 * i for i, n in enumerate(names)}
    col_wall_offset = {n: 0.5 + 0.1 * i for i, n in enumerate(names)}  # starts after aggregator
    agg_fh, agg = _writer(
        run_dir / "events" / "aggregator.jsonl", run_id, "aggregator", "aggregator"
    )
    agg({"type": "anchor", "t_mono": agg_mono0, "t_wall": AGG_WALL0, "pid": 100, "host": host})
    col_files = {}
    for i, n in enumerate(names):
        fh, w = _writer(
            run_dir / "events" / f"collaborator-{n}.jsonl",
            run_id,
            f"collaborator-{n}",
            "collaborator",
        )
        col_files[n] = (fh, w)
        w(
            {
                "type": "anchor",
                "t_mono": col_mono0[n],
                "t_wall": AGG_WALL0 + col_wall_offset[n],
                "pid": 200 + i,
                "host": f"{host}-c{i + 1}",
            }
        )

    def col_t(n: str, g: float) -> float:  # global time -> collaborator's monotonic clock
        return col_mono0[n] + g - col_wall_offset[n]

    def span(n: str | None, phase: str, g0: float, g1: float, rnd: int | None, **extra: Any):
        if n is None:
            agg(
                {
                    "type": "span",
                    "round": rnd,
                    "phase": phase,
                    "t_start": agg_mono0 + g0,
                    "t_end": agg_mono0 + g1,
                    "bytes": extra.pop("bytes", 0),
                    **extra,
                }
            )
        else:
            col_files[n][1](
                {
                    "type": "span",
                    "round": rnd,
                    "phase": phase,
                    "t_start": col_t(n, g0),
                    "t_end": col_t(n, g1),
                    "bytes": extra.pop("bytes", 0),
                    **extra,
                }
            )

    ready = {}
    for n in names:
        g0 = col_wall_offset[n]
        span(n, "connect", g0, g0 + 0.05 * slow, None)
        ready[n] = g0 + 0.05 * slow
    model_bytes = 44_000_000
    metrics_lines = []
    t_open = max(ready.values()) + 0.1
    for rnd in range(rounds):
        uploads = []
        per_col: dict[str, Any] = {}
        for i, n in enumerate(names):
            f = slow * (1 + 0.1 * i)
            span(n, "wait", ready[n], t_open, rnd)
            g = t_open
            acc_g, acc_l = 0.5 + 0.1 * rnd, 0.55 + 0.1 * rnd
            samples = 1000 * (i + 1)
            for phase, sec in PHASE_SECONDS.items():
                d = sec * f * (comm_slow if phase in ("download", "upload") else 1.0)
                extra: dict[str, Any] = {}
                if phase in ("download", "upload"):
                    extra["bytes"] = model_bytes
                if phase == "validate_global":
                    extra.update(metrics={"accuracy": acc_g, "loss": 1.0 - acc_g}, samples=samples)
                if phase == "validate_local":
                    extra.update(metrics={"accuracy": acc_l, "loss": 1.0 - acc_l}, samples=samples)
                if phase == "train":
                    extra.update(metrics={"loss": 0.9}, samples=samples)
                span(n, phase, g, g + d, rnd, **extra)
                g += d
            uploads.append(g)
            ready[n] = g
            per_col[n] = {"samples": samples, "validate_local": {"accuracy": acc_l}}
        g = 0.0
        for u in sorted(uploads):
            g = max(g, u)
            span(None, "aggregate", g, g + 0.01, rnd, bytes=model_bytes)
            g += 0.01
        span(None, "checkpoint", g, g + 0.02, rnd)
        t_open = g + 0.02
        metrics_lines.append({"round": rnd, "collaborators": per_col})
    t_final = t_open + 0.05
    if run_span:
        span(None, "run", 0.0, t_final, None)
    agg({"type": "info", "what": "final model written", "t": agg_mono0 + t_final})
    if torn_line:
        agg_fh.write('{"run": "' + run_id + '", "type": "span", "pha')
    agg_fh.close()
    for fh, _ in col_files.values():
        fh.close()
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as fh:
        for rec in metrics_lines:
            fh.write(json.dumps(rec) + "\n")

    for proc, h in [("aggregator", host)] + [
        (f"collaborator-{n}", f"{host}-c{i + 1}") for i, n in enumerate(names)
    ]:
        env = {
            "host": h,
            "cpu": {"model": "Intel(R) Xeon(R) Platinum 8592+", "cores": 64},
            "python": "3.11.9",
            "torch": "2.3.1",
            "threads": 8,
            "device": "cpu",
            "tee": {"label": tee, "source": "detected" if tee != "none" else "none"},
        }
        (run_dir / "env" / f"{proc}.json").write_text(json.dumps(env))
    if write_model:
        (run_dir / "model").mkdir()
        save_file(FAKE_STATE, str(run_dir / "model" / "final.safetensors"))
    run = {
        "run_id": run_id,
        "name": "study",
        "status": status,
        "started_wall": AGG_WALL0,
        "finished_wall": AGG_WALL0 + t_final,
        "rounds": rounds,
        "rounds_completed": rounds,
        "model": model,
        "dataset": dataset,
        "collaborators": names,
        "config": {
            "transport": transport,
            "launcher": launcher,
            "attestation": attestation,
            "at_rest": at_rest,
            "tee": tee,
            "tee_source": "detected" if tee != "none" else "none",
        },
        "dataset_info": {
            "train_samples": 60000,
            "test_samples": 10000,
            "shape": [1, 28, 28],
            "classes": 10,
            "size_bytes": 55_000_000,
        },
    }
    if model_info:
        run["model_info"] = {"parameters": 11_172_042, "size_bytes": 44_765_000, "tensors": 122}
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    return run_dir


def expected_round_seconds(i: int, slow: float = 1.0, comm_slow: float = 1.0) -> dict[str, float]:
    """Phase seconds of collaborator index ``i`` in one round, as fabricated."""
    f = slow * (1 + 0.1 * i)
    return {
        p: s * f * (comm_slow if p in ("download", "upload") else 1.0)
        for p, s in PHASE_SECONDS.items()
    }


# -- tests of the fabricator itself (the contract it follows) -----------------------------------


def test_fabricated_run_follows_the_contract(tmp_path: Path) -> None:
    from teefl.measure.events import PHASES, read_events

    run = fabricate_run(tmp_path, "r1")
    for name in ("run.json", "plan.yaml", "metrics.jsonl", "model/final.safetensors"):
        assert (run / name).is_file()
    agg = read_events(run / "events" / "aggregator.jsonl")
    assert agg[0]["type"] == "anchor"
    assert {"run", "process", "role", "type"} <= set(agg[1])
    col = read_events(run / "events" / "collaborator-col1.jsonl")
    phases = {r["phase"] for r in col if r["type"] == "span"}
    assert phases <= set(PHASES)
    assert [r for r in agg if r.get("phase") == "run"]


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    from teefl.measure.events import read_events

    run = fabricate_run(tmp_path, "r1", torn_line=True)
    text = (run / "events" / "aggregator.jsonl").read_text()
    assert not text.endswith("\n")
    assert read_events(run / "events" / "aggregator.jsonl")[-1]["type"] == "info"


@pytest.mark.parametrize("slow", [1.0, 2.0])
def test_expected_round_seconds(slow: float) -> None:
    e = expected_round_seconds(0, slow)
    assert e["train"] == pytest.approx(2.0 * slow)
