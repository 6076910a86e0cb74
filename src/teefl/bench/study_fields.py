"""What the study file's models share: strict keys, and the readings of a YAML value as a
list (``models: resnet18``) and of YAML 1.1's bare ``off``/``on`` as attestation values."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def unique(values: list[Any], what: str) -> list[Any]:
    if not values:
        raise ValueError(f"{what} must list at least one value")
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{what} lists {', '.join(dupes)} more than once")
    return values


def as_list(v: Any) -> Any:
    return [v] if isinstance(v, str | int) and not isinstance(v, bool) else v


def attestation_values(v: Any) -> Any:
    # YAML 1.1 reads a bare ``off`` as False (and ``on``/``yes`` as True)
    v = as_list(v)
    if isinstance(v, bool):
        v = [v]
    if isinstance(v, list):
        return [("required" if x else "off") if isinstance(x, bool) else x for x in v]
    return v
