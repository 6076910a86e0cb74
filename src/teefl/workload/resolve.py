"""From a plan's ``workload: {name, options}`` to a ready workload, or one clear line why not.

`resolve_workload` finds the code (`teefl.workload.registry.WORKLOADS`), computes its
digest from the same bytes, validates the options, creates the instance, and returns a
`LoadedWorkload` whose methods run the user's code with teefl's checks around it: metrics
checked, exceptions turned into `WorkloadFailure`, the model's type and travelling tensors
checked. Every failure up to a working instance is one `TeeflError` line naming the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from teefl.errors import TeeflError
from teefl.registry import Target, error_line
from teefl.workload.api import Party, RoundInfo, travelling_names
from teefl.workload.failure import run_metrics, run_user
from teefl.workload.registry import WORKLOADS

if TYPE_CHECKING:
    from torch import nn


def _near(target: Target) -> Path | str:
    """Where the user's code is, so an error names the user's line rather than a library's."""
    top = target.module.split(".")[0]
    if target.package_root is not None:
        return target.package_root / top
    return target.path if target.path is not None else top


def _format_errors(err: ValidationError, source: str, known: list[str]) -> str:
    """The plan's error style: ``invalid plan P: workload.options.a.b: message; ...``."""
    parts = []
    for e in err.errors():
        loc = ".".join(["workload", "options", *(str(p) for p in e["loc"])])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if len(e["loc"]) == 1 and known:
                msg += f" (known: {', '.join(known)})"
        parts.append(f"{loc}: {msg}")
    return f"invalid plan {source}: " + "; ".join(parts)


def validate_options(cls: type, options: Any, ref: str, source: str = "(plan)") -> BaseModel | None:
    """``options`` validated against ``cls.Options`` (None when the class has none)."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TeeflError(
            f"invalid plan {source}: workload.options: must be a mapping of keys, "
            f"not {type(options).__name__}"
        )
    model = getattr(cls, "Options", None)
    if model is None:
        if options:
            raise TeeflError(
                f"invalid plan {source}: workload.options: workload {ref} takes no options "
                f"(its class defines no Options), got: {', '.join(map(str, options))}"
            )
        return None
    known = sorted({f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields))
    # teefl refuses unknown keys whatever the model's own `extra` setting says
    unknown = [k for k in options if k not in known]
    if unknown and model.model_config.get("extra") != "forbid":
        raise TeeflError(
            f"invalid plan {source}: "
            + "; ".join(
                f"workload.options.{k}: unknown key (known: {', '.join(known)})" for k in unknown
            )
        )
    try:
        return model.model_validate(dict(options))
    except ValidationError as err:
        raise TeeflError(_format_errors(err, source, known)) from None
    except Exception as exc:  # a validator of the user's that raised something else
        raise TeeflError(
            f"invalid plan {source}: workload.options: {ref}'s Options failed: {error_line(exc)}"
        ) from None


@dataclass(frozen=True)
class LoadedWorkload:
    """A resolved, instantiated workload and what teefl knows about it.

    ``ref``: the reference as written; ``digest``: its code's digest (`teefl.workload.digest`);
    ``instance``: the user's object. The methods wrap the user's with teefl's checks.
    """

    ref: str
    target: Target
    cls: type
    instance: Any
    options: BaseModel | None
    digest: str

    def build_model(self, seed: int) -> nn.Module:
        """The initial model; any failure (or a non-Module result) is one line naming ``ref``."""
        from torch import nn

        try:
            model = self.instance.build_model(seed)
        except Exception as exc:
            raise TeeflError(
                f"workload {self.ref}: build_model(seed={seed}) failed: "
                f"{error_line(exc, _near(self.target))}"
            ) from None
        if not isinstance(model, nn.Module):
            raise TeeflError(
                f"workload {self.ref}: build_model returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        return model

    def travelling(self, model: nn.Module) -> list[str]:
        """The state-dict names that travel (see `teefl.workload.api.travelling_names`)."""
        try:
            return travelling_names(self.instance, model)
        except TeeflError as exc:
            raise TeeflError(f"workload {self.ref}: {exc}") from None
        except Exception as exc:
            raise TeeflError(
                f"workload {self.ref}: trainable_state failed: "
                f"{error_line(exc, _near(self.target))}"
            ) from None

    def load(self, party: Party) -> Any:
        """``party``'s data; an exception is a `WorkloadFailure` (phase ``load``)."""
        return run_user(self.instance.load, party, ref=self.ref, phase="load", party=party.name)

    def train(
        self, model: nn.Module, data: Any, info: RoundInfo, party: str = ""
    ) -> dict[str, float | int]:
        """One round of training; checked metrics, or a `WorkloadFailure` (phase ``train``)."""
        return run_metrics(
            self.instance.train, model, data, info,
            ref=self.ref, phase="train", party=party, round=info.round,
        )  # fmt: skip

    def evaluate(
        self, model: nn.Module, data: Any, party: str = "", round: int | None = None
    ) -> dict[str, float | int]:
        """Evaluation; checked metrics, or a `WorkloadFailure` (phase ``evaluate``)."""
        return run_metrics(
            self.instance.evaluate, model, data,
            ref=self.ref, phase="evaluate", party=party, round=round,
        )  # fmt: skip

    def describe(self, data: Any) -> dict[str, Any]:
        """The workload's own summary of ``data`` for env records ({} when it has none)."""
        fn = getattr(self.instance, "describe", None)
        if not callable(fn):
            return {}
        out = run_user(fn, data, ref=self.ref, phase="describe")
        return dict(out) if isinstance(out, Mapping) else {"description": str(out)}


def resolve_workload(
    name: str,
    options: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
    *,
    source: str = "(plan)",
    where: str | None = None,
    check_build: bool = False,
    seed: int = 0,
) -> LoadedWorkload:
    """Resolve the plan's ``workload.name`` with its ``options``.

    ``base_dir``: what a ``./file.py:Attr`` reference is relative to (the plan's directory).
    ``source``: the plan file, for option errors (``invalid plan P: workload.options.lr: ...``);
    ``where``: a prefix for reference errors (``"workload.name"``).
    ``check_build``: also build the model once with ``seed`` (and drop it), so a workload that
    cannot build fails here, before any process starts -- at the cost of one model build.
    """
    from teefl.workload.digest import digest_target

    target = WORKLOADS.target(name, base_dir, where)
    digest = digest_target(target)  # before running it: a lone file's bytes are what runs
    cls = WORKLOADS.load(target, where)
    opts = validate_options(cls, options, target.ref, source)
    try:
        instance = cls(opts) if opts is not None else cls()
    except TeeflError as exc:
        raise TeeflError(f"workload {target.ref}: {exc}") from None
    except Exception as exc:
        what = error_line(exc, _near(target))
        raise TeeflError(f"workload {target.ref}: creating it failed: {what}") from None
    loaded = LoadedWorkload(target.ref, target, cls, instance, opts, digest)
    if check_build:
        loaded.travelling(loaded.build_model(seed))
    return loaded


def plan_workload(
    plan: Any, *, check_build: bool = False, source: str = "(plan)"
) -> LoadedWorkload:
    """The workload ``plan`` names, resolved (see `resolve_workload`).

    ``vision`` takes its options from the plan's model/dataset/partition/training sections
    (where a plan keeps them, `teefl.plan.Plan`); every other workload from
    ``workload.options``. ``./file.py`` references are relative to ``workload.base`` (the plan
    file's directory). Called by the commands before any process starts, so a bad reference or
    bad options stop ``teefl run`` with one line instead of three collaborator tracebacks.
    """
    spec = plan.workload
    if spec.is_vision:
        from teefl.workload.vision import Vision

        options: Mapping[str, Any] = Vision.options_from_plan(plan)
    else:
        options = spec.options
    return resolve_workload(
        spec.name,
        options,
        spec.base,
        source=source,
        where="workload.name",
        check_build=check_build,
        seed=plan.seed,
    )
