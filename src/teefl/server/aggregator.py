"""The aggregator: builds its parts, wires them and serves them over gRPC and the data plane.

Parts (one job each): `identity.Identity` (who may act as whom), `rounds.Rounds` (the round
state and its lock), `model.GlobalModel` (the global model and the strategy's accumulator),
`publish.Publisher` (the round's payload), `intake.Intake` (one update), `replay.Replay` (stored
updates after a restart), `checkpointer.Checkpointer` (background writes), `service.Service` (the
transport-neutral handlers); `grpc_adapter` and `socket_adapter` carry them over `teefl.transport`.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from teefl.errors import TeeflError
from teefl.faults import fault
from teefl.measure.events import EventRecorder
from teefl.plan import Plan
from teefl.rundir import RunDir
from teefl.security import session as session_keys
from teefl.server.checkpointer import Checkpointer
from teefl.server.grpc_adapter import GrpcServicer, add_to_server, server_credentials
from teefl.server.identity import Identity
from teefl.server.intake import Intake
from teefl.server.model import GlobalModel, resumed_state
from teefl.server.publish import Publisher
from teefl.server.replay import Replay
from teefl.server.rounds import Rounds
from teefl.server.service import Service
from teefl.server.socket_adapter import DataHandlers
from teefl.store.atomic import write_atomic
from teefl.store.rounds import RoundStore
from teefl.store.staging import StagingArea
from teefl.strategy import Strategy, StrategyState, decode_state
from teefl.strategy.registry import plan_strategy, strategy_digest
from teefl.transport import admission, socket_server
from teefl.transport.channels import bind, payload_check, server_options
from teefl.wire import codec
from teefl.workload.resolve import plan_workload

log = logging.getLogger("teefl.aggregator")


def staging_dir(plan: Plan, sealed: bool) -> Path | None:
    """The shared-memory staging directory where this plan stages updates (whether or not it
    can be opened now: a restart still reads what an earlier process staged there); None where
    it never stages."""
    fed = plan.federation
    if (
        fed.update_staging != "memory"
        or fed.memory == "flat"  # received into the run directory's files
        or plan.network.data_plane != "socket"  # gRPC uploads are stored after decode
        or sealed  # stored as ciphertext: never in plain shared memory
        or plan.runtime.launcher != "native"  # Gramine: no tmpfs of the host's to trust
    ):
        return None
    return fed.staging_dir / f"teefl-{os.getuid()}"


def open_staging(plan: Plan, directory: Path | None) -> StagingArea | None:
    if directory is None:
        return None
    return StagingArea.open(directory, plan.federation.max_inflight_updates)


def _rounds_closed_before(rec: Any) -> set[int]:
    """Rounds an earlier process of this run recorded as closed (``round_closed`` in its
    events): closed again after a restart, they are not recorded twice."""
    from teefl.measure.events import read_events

    path = getattr(rec, "path", None)
    if path is None or not Path(path).exists():
        return set()
    return {
        e["round"]
        for e in read_events(path)
        if e.get("what") == "round_closed" and type(e.get("round")) is int
    }


def restore_strategy(strategy: Strategy, resume: Any, run_dir: Path) -> None:
    """Give the strategy the state saved with the checkpoint resumed from. A checkpoint written
    before strategies were saved names none: a stateless strategy needs nothing, and a stateful
    one refuses to begin the next round with one line."""
    if resume.strategy is None:
        return
    source = RunDir(run_dir).model_dir / f"strategy-round-{resume.round:04d}"
    state = (
        StrategyState(resume.strategy)
        if resume.strategy_state is None
        else decode_state(resume.strategy_state, str(source))
    )
    if state.strategy != resume.strategy:
        raise TeeflError(
            f"cannot resume from {RunDir(run_dir).state}: it names strategy "
            f"{resume.strategy!r}, but the saved state is {state.strategy!r}'s"
        )
    strategy.restore(state)


class Aggregator:
    """Holds the global model and runs rounds 1..R, then one final evaluation pass."""

    def __init__(self, plan: Plan, run_dir: Path, run_id: str, recorder: EventRecorder) -> None:
        self.plan, self.run_dir, self.run_id, self.rec = plan, Path(run_dir), run_id, recorder
        fed = plan.federation
        flat = fed.memory == "flat"  # models of GB: docs/large-models.md
        self.names = list(plan.collaborators)
        #: the plan's workload, resolved: the initial model is its build_model(seed) (the
        #: aggregator has no data); its digest is what joining collaborators are compared to
        self.workload = plan_workload(plan)
        net = self.workload.build_model(plan.seed)
        # the global model is what travels: the whole state dict, or the workload's subset
        # (LoRA adapters) -- every party builds the same frozen rest from the seed
        full = net.state_dict()
        state = {k: full[k].detach() for k in self.workload.travelling(net)}
        parameters = int(sum(p.numel() for p in net.parameters()))
        del full, net  # what travels stays (the frozen rest goes)
        self.identity = Identity(
            plan,
            self.run_dir,
            recorder,
            ended=lambda: self.rounds.wake(),
            workload_digest=self.workload.digest,
            strategy_digest=strategy_digest(fed.strategy.name),
        )
        at_rest = plan.security.at_rest
        self.seal_key: bytes | None = None
        if at_rest.mode == "sealed" and at_rest.key_from is not None:
            # released by the owner's key service to this process after its evidence verified:
            # no file on this host holds it
            from teefl.security.keys.client import fetch_sealing_key
            from teefl.security.sealed import key_id

            self.seal_key = fetch_sealing_key(plan, self.identity.binding, self.identity.provider)
            log.info(
                "sealing key released by the key service at %s (key id %s)",
                at_rest.key_from,
                key_id(self.seal_key).hex(),
            )
            recorder.info(
                "sealing_key_released",
                key_service=at_rest.key_from,
                key_id=key_id(self.seal_key).hex(),
            )
        elif at_rest.mode == "sealed":
            from teefl.security.sealed import load_key

            self.seal_key = load_key(at_rest.key_file, at_rest.key_env)
        self.store = RoundStore(
            self.run_dir,
            self.seal_key,
            keep=fed.keep_updates,
            run_id=run_id,
            staging_dir=staging_dir(plan, self.seal_key is not None),
            mapped=flat,
        )
        self.check = payload_check(plan)  # what received updates are checked against
        #: the last completed round of a resumed run (0: a restart in round 1, which had
        #: acknowledged updates but no durable checkpoint yet); None: a fresh run
        resumed_from: int | None = None
        #: the aggregation rule, for the whole run (docs/strategies.md); what it must carry
        #: over a restart is saved with every checkpoint and restored from the one resumed from
        self.strategy = plan_strategy(fed.strategy)
        resume = self.store.load_resume()
        completed = 0
        if resume is not None:
            resumed_from = completed = resume.round
            state = resumed_state(state, resume.payload, self.run_dir)
            restore_strategy(self.strategy, resume, self.run_dir)
        # what a dead aggregator left: temp files, updates of rounds whose checkpoint is
        # durable, metrics lines of the rounds it is about to close again
        self.store.clean_up(completed, final=completed == fed.rounds)
        self.publisher = Publisher(self.check, plan.network, flat=flat)
        self.publisher.publish(state)
        self.model_info = {
            "parameters": parameters,
            "size_bytes": len(self.publisher.payload),  # the model as it travels
            "tensors": len(state),
        }
        layout = codec.Layout.of_state(state)
        if layout is not None and layout.matches(self.publisher.payload):
            # the global model lives in its payload only, as after every round's close: no
            # second copy beside the one that travels
            state = layout.tensor_views(self.publisher.payload)
        self.strategy.paged = flat  # FedAvg then sums at the close
        self.model = GlobalModel(self.strategy, state, completed + 1, completed >= fed.rounds)
        del state
        self.rounds = Rounds(
            plan,
            recorder,
            self.run_dir,
            self.model,
            self.publisher,
            completed,
            _rounds_closed_before(recorder),
        )
        self.checkpointer = Checkpointer(
            self.store,
            recorder,
            self.run_dir,
            fed.rounds,
            len(self.names),
            self.strategy.name,
            failed=self.rounds.fail,
            durable=self.rounds.made_durable,
            written=self.rounds.wake,
        )
        self.rounds.checkpointer = self.checkpointer
        #: shared-memory receive slots (see staging.py); None: updates go to disk as they arrive
        self.staging = open_staging(plan, self.store.staging_dir)
        self.intake = Intake(
            plan, self.rounds, self.store, recorder, self.check, self.staging, self.identity.current
        )
        self.replay = Replay(plan, self.rounds, self.store, recorder)
        self.replay.resumed_from = resumed_from
        self.rounds.replay = self.replay.open_round
        # whatever the run directory holds for the open round, with or without a checkpoint:
        # in round 1 a restart has none, and its acknowledged updates must count all the same
        if self.replay.open_round(startup=True) and resumed_from is None:
            resumed_from = 0
        self.resumed_from = resumed_from
        self.service = Service(
            plan,
            run_id,
            recorder,
            self.identity,
            self.rounds,
            self.intake,
            self.publisher,
            self.checkpointer,
        )
        self.grpc = GrpcServicer(self.service)
        fault("startup", self.rounds.round)  # crash tests: killed during a (re)start

    # -- what the launcher and tests read ------------------------------------------------------
    @property
    def round(self) -> int:
        return self.rounds.round

    @property
    def received(self) -> dict[str, dict[str, Any]]:
        return self.rounds.received

    @property
    def done(self) -> bool:
        return self.rounds.done

    @property
    def payload(self) -> codec.Buffer:
        return self.publisher.payload

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return self.model.global_state

    @property
    def data_port(self) -> int:
        return self.service.data_port

    # -- serving -------------------------------------------------------------------------------
    def serve(
        self, listen: str, port: int, port_file: Path | None = None, t_start: float | None = None
    ) -> None:
        """Serve until the final evaluation is done and every collaborator was told so."""
        self.checkpointer.t_start = t_start if t_start is not None else time.monotonic()
        r = self.rounds
        with r.cond:
            # crashed between the last acknowledgement and the close, or before the checkpoint
            # of a closed round was durable: close again from the stored updates, round by round
            if r.complete():
                r.close_round()
        # what one collaborator may hold at once: one long poll (a newer one ends the older)
        # and one upload (the evaluation report, and updates over gRPC), plus one download when
        # the data travels over gRPC -- each bounded per collaborator (fairshare.py), so one
        # member cannot take the workers the others' calls and a Join need; 8 to spare
        per = 2 if self.plan.network.data_plane == "socket" else 3
        workers = max(8, per * len(self.names) + 8)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agg"),
            options=server_options(self.plan),
            maximum_concurrent_rpcs=None,
        )
        add_to_server(self.grpc, server)
        bound = bind(server, self.plan, listen, port, server_credentials(self.service, self.plan))
        data = self.data_server(listen)
        server.start()
        log.info(
            "aggregator listening on %s:%d (transport %s%s)",
            listen,
            bound,
            self.plan.security.transport or "none",
            f", data plane on port {self.data_port}" if data else ", data over gRPC",
        )
        if port_file is not None:
            write_atomic(port_file, str(bound).encode())
        ident = self.identity
        RunDir(self.run_dir).update(
            status="running",
            port=bound,
            workload={"name": self.workload.ref, "digest": ident.workload_digest},
            strategy_digest=ident.strategy_digest,
        )
        try:
            r.supervise()
            # every collaborator heard of the end: a restart would have nothing to resume, so
            # the evaluation reports (kept until now for one) go
            self.store.drop_updates(self.plan.federation.rounds + 1, last=True)
        finally:
            self.checkpointer.join()  # every closed round's checkpoint is on disk
            if data is not None:
                data.stop()
            server.stop(grace=2.0).wait(5.0)
            self.identity.refusals.flush()  # the count of refusals not logged one by one
            if self.staging is not None:
                self.staging.close()
            RunDir(self.run_dir).update(peak_inflight_updates=r.peak_active)

    def data_server(self, listen: str) -> socket_server.DataServer | None:
        """Start the data plane (plan ``network.data_plane: socket``) on the gRPC host."""
        net = self.plan.network
        if net.data_plane != "socket":
            return None
        tls = None
        if self.identity.transport != "none":
            assert self.identity.tls_chain is not None  # checked by bind()
            tls = session_keys.server_ssl_context(
                self.identity.tls_chain, self.identity.client_roots()
            )
        limits = admission.Limits(
            handshake_timeout=net.handshake_timeout,
            max_pending=net.max_pending_handshakes,
            max_pending_per_address=net.max_pending_per_address,
        )
        handlers = DataHandlers(self.service)
        data = socket_server.DataServer(
            listen,
            net.data_port,
            tls,
            handlers.hello,
            handlers.get,
            handlers.put,
            limits=limits,
            refused=self.identity.refusals.refused,
        )
        data.start()
        self.service.data_port = data.port
        return data


def final_state(run_dir: Path, key: bytes | None = None) -> dict[str, torch.Tensor]:
    """Load a run's final global model (plain, or sealed when ``key`` is given)."""
    rd = RunDir(run_dir)
    if key is not None:
        from teefl.security.sealed import read_sealed

        return codec.decode_state(read_sealed(rd.final_model(sealed=True), key))
    return codec.decode_state(rd.final_model().read_bytes())
