"""FedOpt: a server optimiser applied to the FedAvg delta (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2).

Per round t, from the global model x and the sample-weighted mean of the updates (FedAvg,
streaming: one float64 sum, whatever the number of collaborators):

    delta = mean - x
    m     = beta_1 * m + (1 - beta_1) * delta
    v     = <the one line each optimiser differs in>       (fedadam / fedyogi / fedadagrad)
    x'    = x + eta * m / (sqrt(v) + tau)

with m = 0 and v = tau^2 before the first round (the paper's v_{-1} >= tau^2); no bias
correction, as in the paper. delta comes from FedAvg's float64 mean; m, v and the step are in
float32 (float64 for a float64 model: the moments' dtype), in place, chunk by chunk -- about ten
passes over the model at the round's close. m and v are saved with every checkpoint (`state`),
with t, so a restarted aggregator continues exactly.

Not stepped: integer tensors (counters, which take FedAvg's largest value) and tensors named in
``mean_only`` (BatchNorm's running statistics by default: statistics, not parameters, and a step
could make a running variance negative); they take the FedAvg mean.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import torch
from pydantic import Field

from teefl.errors import TeeflError
from teefl.strategy.base import LR, RoundConfig, Strategy, StrategyOptions, Update
from teefl.strategy.pieces import Pieces, chunks
from teefl.strategy.running import RunningFedAvg
from teefl.strategy.state import StrategyState
from teefl.wire import codec


class FedOptOptions(StrategyOptions):
    #: server learning rate (the paper's eta)
    eta: float = Field(1e-2, gt=0, allow_inf_nan=False)
    #: client learning rate (eta_l), sent to collaborators as the round config's "lr";
    #: None: nothing is sent and the plan's training.lr applies
    eta_l: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: first-moment decay
    beta_1: float = Field(0.9, ge=0, lt=1)
    #: adaptivity: keeps the step finite where v is small
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False)
    #: tensors whose last name component is one of these take the FedAvg mean, unstepped
    mean_only: tuple[str, ...] = ("running_mean", "running_var")


class FedOptBeta2Options(FedOptOptions):
    #: second-moment decay
    beta_2: float = Field(0.99, ge=0, lt=1)


class FedOpt(Strategy):
    """The shared delta and first-moment math; a subclass gives `second_moment`."""

    Options = FedOptOptions
    options: FedOptOptions

    def __init__(self, options: StrategyOptions | Mapping | None = None) -> None:
        super().__init__(options)
        self.t = 0  # rounds applied: the state belongs to the global model of round t
        self._inner: RunningFedAvg | None = None
        self._key: tuple | None = None  # the piece structure m and v are laid out in
        self._pieces: Pieces | None = None  # the latest round's (its accumulator is current)
        self.m: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self._restored: dict[str, torch.Tensor] | None = None

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """Update ``v`` in place from this round's ``delta`` (stretches of the moments'
        dtype)."""

    def configure(self, rnd: int) -> RoundConfig:
        return {} if self.options.eta_l is None else {LR: self.options.eta_l}

    def begin(
        self,
        rnd: int,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None = None,
    ) -> FedOptAccumulator:
        if rnd != self.t + 1:
            raise TeeflError(
                f"strategy {self.name!r}: its server optimiser state is that after round "
                f"{self.t}, so round {rnd} cannot begin with it (restore the state saved with "
                f"round {rnd - 1}'s checkpoint)"
            )
        self._inner = RunningFedAvg(reference, layout, reuse=self._inner)
        pieces = Pieces(reference, self._inner.layout)
        self._lay_out_moments(pieces)
        return FedOptAccumulator(self, rnd, reference, pieces, self._inner)

    def _lay_out_moments(self, pieces: Pieces) -> None:
        """m and v as flat tensors of ``pieces``' structure: restored, carried over from a
        round of another structure, or fresh (0 and tau^2)."""
        key = tuple((d, tuple(m)) for d, m in zip(pieces.dtypes, pieces.members, strict=True))
        if key == self._key and self._restored is None:
            self._pieces = pieces
            return
        named = self._restored if self._restored is not None else self._named(clone=False)
        if named:
            self._check_fits(named, pieces)
        self.m, self.v = [], []
        for dtype, n, members in zip(pieces.dtypes, pieces.sizes, pieces.members, strict=True):
            if not dtype.is_floating_point:
                self.m.append(None)
                self.v.append(None)
                continue
            mdt = _moment_dtype(dtype)
            if named:
                m = torch.cat([named[f"m/{name}"].reshape(-1) for name, *_ in members])
                v = torch.cat([named[f"v/{name}"].reshape(-1) for name, *_ in members])
            else:
                m = torch.zeros(n, dtype=mdt)
                v = torch.full((n,), self.options.tau**2, dtype=mdt)
            self.m.append(m)
            self.v.append(v)
        self._key, self._pieces, self._restored = key, pieces, None

    def _check_fits(self, named: Mapping[str, torch.Tensor], pieces: Pieces) -> None:
        want = {}
        for dtype, members in zip(pieces.dtypes, pieces.members, strict=True):
            if dtype.is_floating_point:
                for name, _, _, shape in members:
                    for k in ("m", "v"):
                        want[f"{k}/{name}"] = (_moment_dtype(dtype), shape)
        have = {k: (t.dtype, tuple(t.shape)) for k, t in named.items()}
        if have != want:
            diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
            raise TeeflError(
                f"strategy {self.name!r}: the saved server optimiser state does not fit the "
                f"model (first differences: {diff[:3]}); it was saved for another model"
            )

    def _named(self, clone: bool) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self._key is None or self._pieces is None:
            return out
        for i, members in enumerate(self._pieces.members):
            m, v = self.m[i], self.v[i]
            if m is None or v is None:
                continue
            for name, pos, n, shape in members:
                for k, flat in (("m", m), ("v", v)):
                    t = flat[pos : pos + n].view(shape)
                    out[f"{k}/{name}"] = t.clone() if clone else t
        return out

    def state(self) -> StrategyState:
        """A snapshot (copies): it may be written in the background while the next round
        updates m and v."""
        named = self._restored if self._restored is not None else self._named(clone=True)
        return StrategyState(self.name, {"t": self.t}, {k: t.clone() for k, t in named.items()})

    def restore(self, state: StrategyState) -> None:
        self._check_name(state)
        t = state.meta.get("t")
        if type(t) is not int or t < 0 or set(state.meta) != {"t"}:
            raise TeeflError(
                f"strategy {self.name!r}: saved state must have meta {{'t': rounds}}, got "
                f"{state.meta!r}"
            )
        bad = [k for k, v in state.tensors.items() if not v.is_floating_point()]
        if bad or (t == 0) != (not state.tensors):
            raise TeeflError(
                f"strategy {self.name!r}: saved state has t={t} and {len(state.tensors)} "
                f"moment tensors{f', non-float {bad[:3]}' if bad else ''}"
            )
        self.t = t
        self._restored = dict(state.tensors) if state.tensors else None
        if not state.tensors:  # nothing applied yet: fresh moments at the next begin
            self._key = None

    def _step(self, acc: FedOptAccumulator, out: Mapping[str, torch.Tensor] | list) -> None:
        """Write x' into ``out`` and advance m, v and t (see the module docstring)."""
        if acc.rnd != self.t + 1 or acc.pieces is not self._pieces:
            raise TeeflError(
                f"strategy {self.name!r}: round {acc.rnd}'s result was asked after the server "
                f"optimiser moved on to round {self.t} (a result is applied once)"
            )
        inner, pieces, opt = acc.inner, acc.pieces, self.options
        if inner.count == 0:
            raise TeeflError("no update was accepted in this round")
        total = inner.total_samples
        sums = (
            inner.run_sums
            if pieces.layout is not None
            else [inner.sums[mem[0][0]].view(-1) for mem in pieces.members]
        )
        xs = pieces.gather(acc.reference)
        dst = pieces.targets(out)
        plain = set(opt.mean_only)
        for i, target in enumerate(dst):
            acc_sum, m, v = sums[i], self.m[i], self.v[i]
            if m is None or v is None:
                target.copy_(acc_sum)  # integer counters: FedAvg's largest value
                continue
            for lo, hi in chunks(pieces.sizes[i]):
                x, mt, vt = xs[i][lo:hi], m[lo:hi], v[lo:hi]
                # the delta from FedAvg's float64 mean, then rounded to the moments' dtype
                delta = torch.div(acc_sum[lo:hi], total).sub_(x).to(mt.dtype)
                mt.lerp_(delta, 1 - opt.beta_1)  # beta_1 m + (1 - beta_1) delta
                self.second_moment(vt, delta)
                denom = vt.sqrt().add_(opt.tau)
                torch.addcdiv(x, mt, denom, value=opt.eta, out=target[lo:hi])
            for a, b in pieces.ranges_named(i, plain):  # FedAvg's mean, exactly as RunningFedAvg
                torch.div(acc_sum[a:b], total, out=target[a:b])
        pieces.finish(out, dst)
        self.t = acc.rnd


class FedOptAccumulator:
    """FedAvg's running sum for the round; the optimiser step happens in `result_into`."""

    def __init__(
        self,
        strategy: FedOpt,
        rnd: int,
        reference: Mapping[str, torch.Tensor],
        pieces: Pieces,
        inner: RunningFedAvg,
    ) -> None:
        self.strategy, self.rnd, self.reference = strategy, rnd, reference
        self.pieces, self.inner = pieces, inner
        self.layout = inner.layout

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_samples(self) -> int:
        return self.inner.total_samples

    def add(self, update: Update, num_samples: int, *, checked: bool = False) -> None:
        self.inner.add(update, num_samples, checked=checked)

    def result_into(self, out: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> None:
        self.strategy._step(self, out)

    def result(self) -> dict[str, torch.Tensor]:
        out = {n: torch.empty(r.shape, dtype=r.dtype) for n, r in self.reference.items()}
        self.result_into(out)
        return out


def _moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 moments for 16- and 32-bit models (half-precision moments would underflow),
    float64 for float64 ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32
