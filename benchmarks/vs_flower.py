"""teefl and Flower side by side on the same workload (issue 8, item 2).

Flower (latest ``flwr`` from PyPI) is installed by this script into its own venv under
``~/.cache/teefl-bench/flwr-venv`` (not a project dependency), with the same torch/torchvision
versions as the project. Flower runs in its documented *deployment runtime*, default settings:
one ``flower-superlink``, three ``flower-supernode`` processes (``--node-config partition-id=i``)
and ``flwr run APP bench --stream`` against a SuperLink connection in the Flower Configuration
(``$FLWR_HOME/config.toml``) -- not the simulation engine. Its ServerApp uses the stock
``flwr.serverapp.strategy.FedAvg``; its ClientApp does exactly what a teefl collaborator does per
round with teefl's own workload code (same plan, model, data partition, seeds, batch size):
load the global model, validate it, train one epoch, validate, return the model.

Variants, each with 3 collaborators / SuperNodes and 3 rounds:
  - no training: clients return the received model unchanged -> the framework's own per-round
    cost. teefl: the real aggregator and collaborator loop (training replaced); Flower: a
    ClientApp that replies with the received ArrayRecord.
  - training: the whole workload; wall-clock (teefl: the aggregator's ``run`` span, from its
    start to the final model written, collaborators' start-up included; Flower: ``flwr run``
    from submission to the end of the run, SuperLink/SuperNodes already up).
Per transport, teefl's federations run first, then Flower's (one SuperLink and its SuperNodes
for all of them), so neither framework is measured beside the other's processes.
Both without TLS, then with TLS (teefl ``transport tls``; Flower's SuperLink with
``--ssl-certfile/--ssl-keyfile``, SuperNodes and CLI with ``--root-certificates``; the same
teefl-issued certificates).

How each figure is measured (the same way for both frameworks wherever possible):
  - round time: the time from the start of round r to the start of round r+1 (teefl: the
    aggregator's ``round_closed`` events; Flower: a wrapper around the ServerApp's ``Grid`` that
    timestamps each ``send_and_receive`` of the training step), median over rounds 2..3 (round 1
    also connects / spawns in both); for teefl's no-training variant, whose rounds are short
    and vary more, one federation of 7 rounds and the median of rounds 2..7 (a Flower round
    costs ~12 s; its figure stays rounds 2..3 of its 3-round run);
  - communication per round: teefl's own ``download`` + ``upload`` spans (median collaborator);
    and, for both, "overhead" = round time minus the slowest client's compute (validate + train +
    validate, timed inside the client) -- Flower has no transfer spans of its own to read;
  - bytes: model payload bytes moved (2 x clients x rounds x model size, from teefl's spans and
    from the ArrayRecords Flower's ServerApp sent and received).

Targets (PASS/FAIL): no-training round time of teefl <= 1/20 of Flower's on both payloads;
training workload wall-clock of teefl <= 0.8 x Flower's.

    .venv/bin/python benchmarks/vs_flower.py         # ~8-10 min on 2 cores (+ the first install)
    .venv/bin/python benchmarks/vs_flower.py --full    # also the training workload under TLS
    .venv/bin/python benchmarks/vs_flower.py --variants train --models resnet18   # one of them

On a day when Flower is slow here (its rounds vary 10-16 s between runs) the ten-minute budget
does not hold all six comparisons: the last ones are skipped, and say so; run them with
``--variants`` / ``--models``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

CACHE = Path(os.environ.get("TEEFL_BENCH_CACHE", Path.home() / ".cache" / "teefl-bench"))
VENV = CACHE / "flwr-venv"
ROUNDS = 3
#: rounds of teefl's no-training federation (its per-round figure: median of rounds 2..)
TEEFL_NOTRAIN_ROUNDS = 7
CLIENTS = 3
TARGET_NOTRAIN = 1 / 20
TARGET_WALL = 0.8

#: the workload both frameworks run (a teefl plan; Flower's ClientApp reads the same file)
WORKLOAD: dict[str, Any] = {
    "name": "vsflower",
    "seed": 0,
    "collaborators": CLIENTS,
    "federation": {"rounds": ROUNDS, "round_timeout": 600},
    "dataset": {
        "name": "synthetic",
        "synthetic": {"shape": [3, 32, 32], "classes": 10, "train_size": 1536, "test_size": 384},
        "max_samples_per_collaborator": 128,
        "max_test_samples": 64,
    },
    "training": {
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.001,
        "optimizer": "adam",
        "threads": 1,
        "device": "cpu",
    },
    "network": {"host": "127.0.0.1", "port": 0},
}


# -- Flower installation -----------------------------------------------------------------------
def _pip(*args: str) -> None:
    subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", *args],
        check=True,
        timeout=900,
    )


def ensure_flower() -> str:
    """Create the Flower venv once (flwr, and the project's torch/torchvision versions)."""
    from importlib.metadata import version

    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"installing Flower into {VENV} (once) ...", flush=True)
        VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
    check = "import flwr, torch, torchvision, pydantic, yaml, numpy; print(flwr.__version__)"
    probe = subprocess.run([str(py), "-c", check], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        t0 = time.monotonic()
        _pip("flwr")
        torch_v = version("torch").split("+")[0]
        tv_v = version("torchvision").split("+")[0]
        _pip(f"torch=={torch_v}", f"torchvision=={tv_v}", "pydantic", "pyyaml", "numpy")
        print(f"  installed in {time.monotonic() - t0:.0f} s", flush=True)
        probe = subprocess.run([str(py), "-c", check], capture_output=True, text=True, timeout=120)
        probe.check_returncode()
    return probe.stdout.strip()


# -- the Flower app ----------------------------------------------------------------------------
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "teeflbench"
version = "1.0.0"
description = "teefl's benchmark workload as a Flower App"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "teefl"

[tool.flwr.app.components]
serverapp = "teeflbench.server_app:app"
clientapp = "teeflbench.client_app:app"

[tool.flwr.app.config]
model = "mobilenet_v3_small"
plan = ""
train = 0
out = ""
"""

APP_CLIENT = '''\
"""ClientApp: what a teefl collaborator does in a round, with teefl's workload code."""

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    arrays = msg.content["arrays"]
    if not int(cfg["train"]):  # no training: reply with the received model unchanged
        metrics = MetricRecord({"num-examples": 1, "compute-s": 0.0})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
    import torch

    from teefl.plan import load_plan
    from teefl.workload.datasets import load_dataset
    from teefl.workload.models import build_model
    from teefl.workload.partition import collaborator_data
    from teefl.workload.train import configure_threads, evaluate, train_local

    plan = load_plan(cfg["plan"])
    configure_threads(plan.training.threads)
    index = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    data = load_dataset(plan.dataset, None, seed=plan.seed)
    x, y, xt, yt = collaborator_data(data, index, n, plan.partition, plan.dataset, plan.seed)
    model = build_model(cfg["model"], data.channels, data.classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    r = int(msg.content["config"]["server-round"])
    cpu, bs = torch.device("cpu"), plan.training.batch_size
    t0 = time.monotonic()
    evaluate(model, xt, yt, bs, cpu)
    train_local(model, x, y, plan.training, cpu, plan.seed * 1_000_003 + index * 1009 + r)
    local = evaluate(model, xt, yt, bs, cpu)
    compute = time.monotonic() - t0
    metrics = MetricRecord(
        {"num-examples": len(y), "compute-s": compute, "accuracy": local["accuracy"]}
    )
    out = ArrayRecord(model.state_dict())
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)
'''

APP_SERVER = '''\
"""ServerApp: the stock FedAvg strategy; a Grid wrapper timestamps each round's exchange."""

import json
import time

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def _payload(msg):
    try:
        return sum(len(a.data) for a in msg.content["arrays"].values())
    except Exception:
        return 0


class TimedGrid:
    def __init__(self, grid):
        self._grid = grid
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        sent = sum(_payload(m) for m in messages)
        t0 = time.monotonic()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        t1 = time.monotonic()
        compute, got = [], 0
        for m in replies:
            if m.has_content():
                got += _payload(m)
                compute.append(float(m.content["metrics"].get("compute-s", 0.0)))
        self.calls.append({"t0": t0, "t1": t1, "n": len(messages), "bytes": sent + got,
                           "compute": compute})
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    from teefl.workload.models import build_model

    model = build_model(cfg["model"], 3, 10, seed=0)
    timed = TimedGrid(grid)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=3,
                      min_available_nodes=3)
    t0 = time.monotonic()
    strategy.start(grid=timed, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=3)
    t1 = time.monotonic()
    with open(cfg["out"], "w") as fh:
        json.dump({"start": t0, "end": t1, "calls": [c for c in timed.calls if c["n"]]}, fh)
'''


def write_app(directory: Path) -> Path:
    pkg = directory / "teeflbench"
    pkg.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "client_app.py").write_text(APP_CLIENT)
    (pkg / "server_app.py").write_text(APP_SERVER)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlowerFederation:
    """A SuperLink and three SuperNodes, each in its own process group; always stopped."""

    def __init__(self, work: Path, tls: dict[str, str] | None) -> None:
        self.work, self.tls = work, tls
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        bin_dir = VENV / "bin"
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": str(C.ROOT / "src"),  # the ClientApp uses teefl's workload code
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("VIRTUAL_ENV", None)

    def _start(self, name: str, argv: list[str]) -> None:
        home = self.work / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115
        self.logs.append(log)
        self.procs.append(
            subprocess.Popen(
                argv,
                env={**self.env, "FLWR_HOME": str(home)},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def __enter__(self) -> FlowerFederation:
        bin_dir = VENV / "bin"
        self.port = _free_port()
        link = [str(bin_dir / "flower-superlink"), "--port", str(self.port)]
        link += ["--disable-runtime-dependency-installation"]
        if self.tls:
            link += ["--ssl-certfile", self.tls["server_cert"], "--ssl-keyfile"]
            link += [self.tls["server_key"], "--ssl-ca-certfile", self.tls["ca"]]
        else:
            link += ["--insecure"]
        self._start("superlink", link)
        self._wait_port(self.port)
        for i in range(CLIENTS):
            node = [str(bin_dir / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
            node += ["--port", str(_free_port())]
            node += ["--node-config", f"partition-id={i} num-partitions={CLIENTS}"]
            node += ["--root-certificates", self.tls["ca"]] if self.tls else ["--insecure"]
            self._start(f"supernode{i}", node)
        self._wait_nodes()
        cli = self.work / "cli"
        cli.mkdir(exist_ok=True)
        conn = f'address = "127.0.0.1:{self.port}"\n'
        conn += f'root-certificates = "{self.tls["ca"]}"\n' if self.tls else "insecure = true\n"
        (cli / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n{conn}'
        )
        return self

    def _wait_port(self, port: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            self._check()
            time.sleep(0.2)
        raise RuntimeError(f"Flower SuperLink did not listen on {port}: {self._tail()}")

    def _wait_nodes(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        log = self.work / "superlink.log"
        while time.monotonic() < deadline:
            if log.read_text(errors="replace").count("Activated node_id") >= CLIENTS:
                return
            self._check()
            time.sleep(0.2)
        raise RuntimeError(f"Flower SuperNodes did not connect: {self._tail()}")

    def _check(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a Flower process exited ({p.args[0]}): {self._tail()}")

    def _tail(self) -> str:
        return "\n".join(
            f"-- {f.name}:\n{f.read_text(errors='replace')[-1500:]}"
            for f in sorted(self.work.glob("*.log"))
        )

    def run(self, app: Path, model: str, plan: Path, train: bool, tag: str) -> dict[str, Any]:
        out = self.work / f"{tag}.json"
        cfg = f'model="{model}" plan="{plan}" train={int(train)} out="{out}"'
        argv = [str(VENV / "bin" / "flwr"), "run", str(app), "bench", "--stream"]
        argv += ["--run-config", cfg]
        t0 = time.monotonic()
        with open(self.work / f"flwr-run-{tag}.log", "wb") as log:
            proc = subprocess.run(
                argv,
                env={**self.env, "FLWR_HOME": str(self.work / "cli")},
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=400,
                start_new_session=True,
            )
        wall = time.monotonic() - t0
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"flwr run failed ({proc.returncode}): "
                + (self.work / f"flwr-run-{tag}.log").read_text(errors="replace")[-3000:]
            )
        res = json.loads(out.read_text())
        res["wall"] = wall
        return res

    def __exit__(self, *exc: Any) -> None:
        import signal

        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in self.logs:
            log.close()


def flower_figures(res: dict[str, Any]) -> dict[str, float]:
    calls = res["calls"]
    starts = [c["t0"] for c in calls] + [res["end"]]
    rounds = [starts[i + 1] - starts[i] for i in range(len(calls))]
    overhead = [r - max(c["compute"] or [0.0]) for r, c in zip(rounds, calls, strict=True)]
    return {
        "round": C.median(rounds[1:]),
        "overhead": C.median(overhead[1:]),
        "bytes": sum(c["bytes"] for c in calls),
        "wall": res["wall"],
    }


# -- teefl -------------------------------------------------------------------------------------
def teefl_notrain(spec: str, transport: str, work: Path) -> dict[str, float]:
    # TEEFL_NOTRAIN_ROUNDS rounds; rounds 2.. are measured (round 1 opens before the
    # collaborators connect); the final model is written during the evaluation pass. More rounds
    # than Flower's 3: a teefl round is ~0.1-0.5 s and its median of two varied 1.5x between
    # runs (2026-12-02: 438 / 620 ms for ResNet-18), while one more Flower round costs ~12 s
    r = C.fed_transfer(spec, transport, TEEFL_NOTRAIN_ROUNDS, work, collaborators=CLIENTS, warmup=0)
    rounds = r.rounds
    return {
        "round": C.median(rounds),
        "overhead": C.median(rounds),
        "comm": C.median(r.comm[1:]),
        "bytes": r.bytes * 2 * CLIENTS * ROUNDS,
        "wall": r.wall,
    }


def teefl_train(spec: str, transport: str, work: Path) -> dict[str, float]:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    plan = {**WORKLOAD, "model": {"name": spec}}
    (work / "plan.yaml").write_text(yaml.safe_dump(plan))
    argv = [C.PY, "-m", "teefl", "run", "plan.yaml", "--transport", transport]
    argv += ["--runs-dir", "runs", "--no-progress"]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=400)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"teefl run failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (run_dir,) = [d for d in (work / "runs").iterdir() if d.is_dir()]
    events = {f.stem: C._events(f) for f in (run_dir / "events").glob("*.jsonl")}
    agg = events.pop("aggregator")
    T = next(e["t_end"] - e["t_start"] for e in agg if e.get("phase") == "run")
    closed = {e["round"]: e["t"] for e in agg if e.get("what") == "round_closed"}
    rounds = [closed[r] - closed[r - 1] for r in range(2, ROUNDS + 1)]
    comm, compute, nbytes = {}, {}, 0
    for evs in events.values():
        for e in evs:
            if e.get("type") != "span" or not e.get("round"):
                continue
            d = e["t_end"] - e["t_start"]
            if e["phase"] in ("download", "upload"):
                comm.setdefault(e["round"], []).append(d)
                nbytes += e["bytes"]
            if e["phase"] in ("validate_global", "train", "validate_local"):
                compute.setdefault((e["process"], e["round"]), []).append(d)
    per_col_comm = {}
    for evs in events.values():
        for e in evs:
            if e.get("type") == "span" and e.get("round") and e["phase"] in ("download", "upload"):
                key = (e["process"], e["round"])
                per_col_comm[key] = per_col_comm.get(key, 0.0) + e["t_end"] - e["t_start"]
    slowest = {
        r: max(sum(v) for (p, rr), v in compute.items() if rr == r) for r in range(1, ROUNDS + 1)
    }
    overhead = [rounds[i] - slowest[i + 2] for i in range(len(rounds))]
    comm_med = C.median([v for (p, r), v in per_col_comm.items() if r >= 2])
    return {
        "round": C.median(rounds),
        "overhead": C.median(overhead),
        "comm": comm_med,
        "bytes": nbytes,
        "T": T,
        "wall": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also the training workload under TLS")
    ap.add_argument("--models", default="mobilenet_v3_small,resnet18")
    ap.add_argument(
        "--variants",
        default="notrain,train",
        help="which comparisons (e.g. 'train' alone, for one the time budget skipped)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=570,
        help="seconds; a comparison that would not fit in what is left is skipped (and said so)",
    )
    args = ap.parse_args()
    specs = args.models.split(",")
    t_all = time.monotonic()
    print(f"machine: {C.machine()}")
    print(f"at start: {C.load()}")
    flwr_version = ensure_flower()
    print(f"Flower {flwr_version} (deployment runtime: SuperLink + {CLIENTS} SuperNodes, default")
    print(f"settings), venv {VENV}; {CLIENTS} clients, {ROUNDS} rounds, FedAvg\n", flush=True)
    results: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {}
    skipped: list[str] = []
    longest: dict[str, float] = {}  # per variant, the longest comparison so far
    with C.scratch("vsflower") as tmp:
        work = Path(tmp)
        app = write_app(work / "app")
        tls = C.pki_for(work / "pki", [f"col{i + 1}" for i in range(CLIENTS)])
        import yaml

        # the no-training comparisons first, so that a slow machine skips a training one first
        blocks = [("none", ["notrain"]), ("tls", ["notrain"]), ("none", ["train"])]
        if args.full:
            blocks.append(("tls", ["train"]))
        wanted = set(args.variants.split(","))
        blocks = [(t, [v for v in vs if v in wanted]) for t, vs in blocks]
        blocks = [(t, vs) for t, vs in blocks if vs]
        for n, (transport, variants) in enumerate(blocks):
            # teefl's runs first, then Flower's, never side by side: a Flower federation left up
            # while teefl measured (its SuperLink, SuperNodes and lingering ClientApps use ~17 %
            # of a core in the seconds after a run) made teefl's TLS round 1.4x slower here
            todo, teefl_part = [], {}
            for variant in variants:
                for spec in specs:
                    left = args.budget - (time.monotonic() - t_all)
                    guess = longest.get(variant, max(longest.values(), default=0.0))
                    if guess * 1.1 > left:
                        skipped.append(f"{variant} {C.MODELS[spec]} {transport}")
                        continue
                    t_cmp = time.monotonic()
                    tw = work / f"teefl-{transport}-{variant}-{spec}"
                    if variant == "notrain":
                        te = teefl_notrain(spec, transport, tw)
                    else:
                        te = teefl_train(spec, transport, tw)
                    todo.append((variant, spec))
                    teefl_part[(variant, spec)] = (te, time.monotonic() - t_cmp)
            if not todo:
                continue
            fw = work / f"flower-{transport}-{n}"
            with FlowerFederation(fw, tls if transport == "tls" else None) as fed:
                for variant, spec in todo:
                    te, took = teefl_part[(variant, spec)]
                    left = args.budget - (time.monotonic() - t_all)
                    if longest.get(variant, took) - took > left:  # Flower's part would not fit
                        skipped.append(f"{variant} {C.MODELS[spec]} {transport}")
                        continue
                    plan_path = work / f"plan-{spec}.yaml"
                    plan_path.write_text(yaml.safe_dump({**WORKLOAD, "model": {"name": spec}}))
                    t_fl = time.monotonic()
                    fl = flower_figures(
                        fed.run(app, spec, plan_path, variant == "train", f"{variant}-{spec}")
                    )
                    results[(variant, spec, transport)] = {"teefl": te, "flower": fl}
                    took += time.monotonic() - t_fl
                    longest[variant] = max(longest.get(variant, 0.0), took)
                    print(
                        f"  {variant:8s} {C.MODELS[spec]:18s} {transport:4s}: round teefl "
                        f"{te['round'] * 1e3:.0f} ms, Flower {fl['round'] * 1e3:.0f} ms "
                        f"({time.monotonic() - t_all:.0f} s)",
                        flush=True,
                    )
            shutil.rmtree(fw / "cli", ignore_errors=True)
    print()
    rows = []
    for (variant, spec, transport), r in results.items():
        te, fl = r["teefl"], r["flower"]
        wall_te = te.get("T", te["wall"])
        rows.append(
            [
                "no training" if variant == "notrain" else "training",
                C.MODELS[spec],
                transport,
                f"{wall_te:.1f} / {fl['wall']:.1f}",
                f"{te['round']:.3f} / {fl['round']:.3f}",
                f"{te['round'] / fl['round']:.3f}",
                f"{te['comm']:.3f}",
                f"{te['overhead']:.3f} / {fl['overhead']:.3f}",
                f"{te['bytes'] / 1e6:.0f} / {fl['bytes'] / 1e6:.0f}",
            ]
        )
    print(
        C.table(
            rows,
            [
                "variant",
                "model",
                "TLS",
                "wall s teefl/Flower",
                "round s teefl/Flower",
                "ratio",
                "teefl comm s",
                "overhead s teefl/Flower",
                "MB moved",
            ],
        )
    )
    print(
        "\nwall: teefl = aggregator's run span (collaborator start-up included) for training, the "
        f"harness's federation wall for no training ({TEEFL_NOTRAIN_ROUNDS} rounds); Flower = "
        "`flwr run` submission to end (3 rounds).\n"
        "round: start of round r to start of r+1, median of rounds 2..3 (teefl no training: "
        f"2..{TEEFL_NOTRAIN_ROUNDS}). overhead: round time "
        "minus the slowest client's validate+train+validate. teefl comm: download+upload spans.\n"
    )
    ok_all = True
    for (variant, spec, transport), r in results.items():
        te, fl = r["teefl"], r["flower"]
        if variant == "notrain":
            ratio = te["round"] / fl["round"]
            ok = ratio <= TARGET_NOTRAIN
            what = f"no-training round time teefl/Flower = {ratio:.4f} (1/{1 / ratio:.0f})"
            target = f"<= 1/{1 / TARGET_NOTRAIN:.0f}"
        else:
            ratio = te["T"] / fl["wall"]
            ok = ratio <= TARGET_WALL
            what = f"training workload wall-clock teefl/Flower = {ratio:.2f}"
            target = f"<= {TARGET_WALL}"
        ok_all &= ok
        print(f"{C.verdict(ok)}: {C.MODELS[spec]} {transport}: {what} (target {target})")
    for what in skipped:
        print(f"SKIPPED (time budget {args.budget:.0f} s, --budget): {what}")
    print(f"\nat end: {C.load()}")
    print(f"total time {time.monotonic() - t_all:.0f} s")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
