"""The owner's key service configuration (``teefl keys serve KEYS.yaml``): who may get which
secret, judged by which attestation policy.

Why a file of its own and not a plan section: the plan is shared with every party (and each host
holds its own copy, which the host can edit); the release policy is the model OWNER's alone and
is read only on the owner's key service host. It says:

- ``parties``: by the CN of the client certificate a party presents (issued by the federation's
  CA: ``teefl pki issue DIR --key-client aggregator``), its role -- whose policy judges its
  evidence -- and the items it may receive (``sealing_key``, ``tls_key``);
- ``attestation.policies``: the owner's policy per role, in the plan's format (pinned
  measurements, TCB, debug; ``teefl tee policy`` prints one from a quote), with the collateral
  to verify quotes against;
- where the secrets are (``sealing_key``, each party's ``tls_key``) and the audit log.

Relative paths are resolved against the file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from teefl.errors import TeeflError
from teefl.plan_specs import NAME_RE, AttestationSpec, SnpCollateralSpec, Strict
from teefl.policyspec import AttestationPolicies, hex_list

#: what `teefl keys serve` reads when no file is named
DEFAULT_AUDIT_LOG = Path("keys-audit.jsonl")


class ServiceTls(Strict):
    """The key service's side of the mTLS: the federation's CA (clients must present a
    certificate it issued), the service's own certificate and key, and the CA's CRL."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None


class PartySpec(Strict):
    """One party the key service knows, named by its client certificate's CN."""

    #: whose policy judges its evidence; default: aggregator for the CN "aggregator"
    role: Literal["aggregator", "collaborator"] | None = None
    #: what it may receive
    release: list[Literal["sealing_key", "tls_key"]] = Field(min_length=1)
    #: its TLS private key (PEM), released as ``tls_key``
    tls_key: Path | None = None
    #: configuration bindings (`attest.party_binding`, 32 bytes hex: the aggregator logs its own
    #: at start) it must run with; None = any (the evidence still binds it, and it is audited)
    bindings: list[str] | None = None

    @field_validator("bindings")
    @classmethod
    def _hex32(cls, v: list[str] | None) -> list[str] | None:
        return hex_list(v, 32, "bindings")

    @model_validator(mode="after")
    def _tls_key_file(self) -> PartySpec:
        if "tls_key" in self.release and self.tls_key is None:
            raise ValueError("release names tls_key: give the file as tls_key")
        return self


class OwnerAttestation(Strict):
    """How the owner judges evidence: the plan's ``security.attestation`` keys that concern a
    verifier (policies per role, collateral), none of those that concern a prover."""

    #: accept simulated evidence where a policy allows it (tests and demos only)
    allow_simulated: bool = False
    collateral: Path | None = None
    pccs_url: str | None = None
    snp: SnpCollateralSpec = SnpCollateralSpec()
    policies: AttestationPolicies = AttestationPolicies()

    def spec(self) -> AttestationSpec:
        """As the plan section the verifiers take (`teefl.security.attest.Verifier`)."""
        return AttestationSpec(
            allow_simulated=self.allow_simulated,
            collateral=self.collateral,
            pccs_url=self.pccs_url,
            snp=self.snp,
            policies=self.policies,
        )

    @model_validator(mode="after")
    def _valid_as_spec(self) -> OwnerAttestation:
        self.spec()  # the plan's own checks (allow_simulated beside a simulated policy)
        return self


class KeyServiceConfig(Strict):
    #: HOST:PORT to listen on (port 0: any free one; --port-file says which)
    listen: str = "127.0.0.1:0"
    tls: ServiceTls
    #: the owner's sealing key (`teefl model keygen`), released as ``sealing_key``
    sealing_key: Path | None = None
    parties: dict[str, PartySpec] = Field(min_length=1)
    attestation: OwnerAttestation = OwnerAttestation()
    #: every release and refusal, one JSON object a line (mode 0600)
    audit_log: Path = DEFAULT_AUDIT_LOG
    #: seconds a Challenge's nonce stays valid (it is single use either way)
    nonce_ttl: float = Field(120.0, gt=0, le=3600)

    @field_validator("parties")
    @classmethod
    def _names(cls, v: dict[str, PartySpec]) -> dict[str, PartySpec]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(
                    f"party {name!r}: a certificate CN of 1-63 letters, digits, '.', '_' or '-'"
                )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> KeyServiceConfig:
        if self.sealing_key is None:
            wanting = [n for n, p in self.parties.items() if "sealing_key" in p.release]
            if wanting:
                raise ValueError(
                    f"parties.{wanting[0]}.release names sealing_key but sealing_key (the key "
                    "file) is not set"
                )
        return self

    def role_of(self, name: str) -> str:
        party = self.parties[name]
        return party.role or ("aggregator" if name == "aggregator" else "collaborator")


def _format(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    return f"invalid key service configuration {source}: " + "; ".join(parts)


def config_from_dict(data: Any, source: str, base: Path | None = None) -> KeyServiceConfig:
    if not isinstance(data, dict):
        raise TeeflError(f"invalid key service configuration {source}: expected a mapping")
    try:
        config = KeyServiceConfig.model_validate(data)
    except ValidationError as err:
        raise TeeflError(_format(err, source)) from None
    if base is not None:
        _resolve(config, base)
    return config


def _resolve(config: KeyServiceConfig, base: Path) -> None:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    tls = config.tls
    tls.ca, tls.cert, tls.key, tls.crl = fix(tls.ca), fix(tls.cert), fix(tls.key), fix(tls.crl)
    config.sealing_key = fix(config.sealing_key)
    config.audit_log = fix(config.audit_log) or config.audit_log
    for party in config.parties.values():
        party.tls_key = fix(party.tls_key)
    att = config.attestation
    att.collateral = fix(att.collateral)
    att.snp.certs = [p for p in map(fix, att.snp.certs) if p is not None]
    att.snp.crls = [p for p in map(fix, att.snp.crls) if p is not None]
    att.snp.kds_cache = fix(att.snp.kds_cache)


def load_config(path: Path | str) -> KeyServiceConfig:
    """Read and validate the owner's configuration; every problem is one `TeeflError` line."""
    from teefl.plan import read_yaml

    path = Path(path)
    data = read_yaml(path, "key service configuration")
    return config_from_dict(data, str(path), base=path.resolve().parent)


__all__ = [
    "KeyServiceConfig",
    "OwnerAttestation",
    "PartySpec",
    "ServiceTls",
    "config_from_dict",
    "load_config",
]
