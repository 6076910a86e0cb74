"""The sections of a plan (``model:``, ``dataset:``, ``network:``, ``security:``, ...): one strict
pydantic model each, with the checks that need only that section.

Why a module of their own: `teefl.plan` composes them into the `Plan` and loads it; the checks
across sections (quorum vs collaborators, attestation vs transport) are the Plan's. Every name
here is importable from `teefl.plan` too, where callers have always found them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from teefl.catalog import DATASET_NAMES, MODEL_NAMES
from teefl.policyspec import AttestationPolicies

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class Strict(BaseModel):
    """Unknown keys are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    """Which network; ``channels``/``classes`` default to the dataset's."""

    name: str = "small_cnn"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}; choose one of: {', '.join(MODEL_NAMES)}")
        return v


class SyntheticSpec(Strict):
    """Shape of the seeded synthetic dataset (used when ``dataset.name: synthetic``)."""

    shape: tuple[int, int, int] = (1, 28, 28)
    classes: int = Field(10, ge=2)
    train_size: int = Field(6000, ge=1)
    test_size: int = Field(1000, ge=1)


class DatasetSpec(Strict):
    name: str = "fashion-mnist"
    #: directory holding the files; else --data-dir, $TEEFL_DATA, /usr/share/datasets/<name>
    root: Path | None = None
    #: cap on training samples per collaborator (quick runs); None = the whole shard
    max_samples_per_collaborator: int | None = Field(None, ge=1)
    #: cap on test samples each collaborator evaluates on; None = its whole test shard
    max_test_samples: int | None = Field(None, ge=1)
    #: each collaborator evaluates on: its own shard of the test split, or the whole test split
    test_split: Literal["shard", "full"] = "shard"
    synthetic: SyntheticSpec = SyntheticSpec()

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(DATASET_NAMES)}")
        return v


class PartitionSpec(Strict):
    kind: Literal["iid", "dirichlet"] = "iid"
    #: concentration of the Dirichlet split; small = very non-IID
    alpha: float = Field(0.5, gt=0)


class TrainingSpec(Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    #: torch intra-op threads per process; None = torch's default
    threads: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class NetworkSpec(Strict):
    #: where collaborators connect (host name or IP of the aggregator)
    host: str = "127.0.0.1"
    #: TCP port; 0 = pick a free one (single-host runs only)
    port: int = Field(0, ge=0, le=65535)
    #: the address the aggregator listens on; defaults to ``host``
    listen: str | None = None
    #: payload bytes per gRPC stream message (data_plane grpc)
    chunk_size: int = Field(1 << 20, ge=1024, le=64 << 20)
    #: how the model and the updates travel: "socket" = one TCP/TLS 1.3 connection per
    #: collaborator beside the gRPC control channel (same certificates, authorised by a token
    #: from Join; ~4x faster), "grpc" = gRPC streams of chunk_size messages (one port only)
    data_plane: Literal["socket", "grpc"] = "socket"
    #: the data plane's TCP port on the aggregator; 0 = any free port (announced at Join)
    data_port: int = Field(0, ge=0, le=65535)
    #: seconds a data connection has from its accept() to its HELLO answered (TLS handshake
    #: included, in all) before the aggregator closes it
    handshake_timeout: float = Field(10.0, gt=0)
    #: data connections accepted and not authorised yet, in all: each costs a file descriptor
    #: and a few KB, never a thread; beyond this the oldest one is closed to make room
    max_pending_handshakes: int = Field(256, ge=1)
    #: the same, from one IP address (raise it when many collaborators share one NAT address)
    max_pending_per_address: int = Field(64, ge=1)
    #: what a receiver checks each payload against: "auto" = its CRC32C over transport none
    #: (accidental corruption) and nothing more over TLS, whose records are each authenticated
    #: by their AEAD tag; "crc32c" or "sha256" = that, whatever the transport (SHA-256 costs
    #: ~5x CRC32C: docs/decisions/002-payload-check.md)
    payload_check: Literal["auto", "crc32c", "sha256"] = "auto"
    #: the model and the updates compressed on the data plane (off by default: float weights
    #: barely shrink, so it pays only on slow links; docs/decisions/003-*.md); socket only
    compression: Literal["none", "zstd"] = "none"
    #: zstd level: 1 is the fastest; higher levels barely shrink float weights further
    compression_level: int = Field(1, ge=1, le=19)

    @model_validator(mode="after")
    def _compression_on_the_data_plane(self) -> NetworkSpec:
        if self.compression != "none" and self.data_plane != "socket":
            raise ValueError(
                f"network.compression: {self.compression} needs network.data_plane: socket"
            )
        return self


class TlsSpec(Strict):
    """Certificates for tls/mtls, paths relative to the plan file."""

    ca: Path | None = None
    #: aggregator's certificate and key
    server_cert: Path | None = None
    server_key: Path | None = None
    #: directory holding <name>.crt / <name>.key for each collaborator
    client_dir: Path | None = None
    #: certificate revocation list of the CA (`teefl pki revoke`): the aggregator refuses
    #: client certificates it lists, collaborators an aggregator endorsement it lists
    crl: Path | None = None


class SnpCollateralSpec(Strict):
    """Where an SEV-SNP verifier finds AMD's certificates (besides the guest's own table)."""

    #: ARK/ASK/ASVK cert_chain files and VCEK/VLEK certificates (PEM or DER, any order)
    certs: list[Path] = Field(default_factory=list)
    #: AMD CRLs (``/vcek/v1/<product>/crl``); each is used for the chain of its ARK
    crls: list[Path] = Field(default_factory=list)
    #: fetch what is missing (VCEK, cert_chain, CRL) from AMD's KDS: needs network
    kds: bool = False
    #: where KDS answers are kept; None = $XDG_CACHE_HOME/teefl/amd-kds (~/.cache/...)
    kds_cache: Path | None = None
    #: refuse a report whose chain has no (fresh, ARK-signed) CRL
    require_crl: bool = False


class ReattestSpec(Strict):
    """How long an accepted attestation lasts before the party must attest again, with fresh
    evidence for a fresh nonce (``security.attestation.reattest_every``): ``rounds: N`` -- an
    attestation accepted while round r is open covers rounds r .. r+N-1; ``seconds: S`` -- it
    covers every round handed to the party within S seconds of it. Exactly one of the two.

    Why not a bare number: "2" reads as rounds to one user and as seconds to another, and a
    wrong guess silently weakens (or floods) the check.
    """

    rounds: int | None = Field(None, ge=1, strict=True)
    seconds: float | None = Field(None, gt=0, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _not_a_bare_number(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(
                f"write {{rounds: N}} or {{seconds: S}}, not {data!r} (a bare number could mean "
                "either)"
            )
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> ReattestSpec:
        if (self.rounds is None) == (self.seconds is None):
            raise ValueError("give exactly one of rounds or seconds")
        return self


class AttestationSpec(Strict):
    """Who must prove its TEE, with which evidence, judged by which policy.

    Evidence is bound to the party's TLS key, so attestation needs transport tls or mtls. Each
    role's evidence is judged by its own policy (``policies.aggregator`` /
    ``policies.collaborators``), which must pin the TEE identity where that role is required
    (checked when a verifying party starts; see teefl.security.tee.policy).
    """

    #: the aggregator verifies every collaborator's evidence at join
    collaborators: Literal["off", "required"] = "off"
    #: every collaborator verifies the aggregator's evidence before downloading anything
    aggregator: Literal["off", "required"] = "off"
    #: where this host's evidence comes from; auto = configfs-tsm, else Gramine's /dev/attestation
    provider: Literal["auto", "configfs-tsm", "gramine", "simulated"] = "auto"
    #: the simulated provider proves nothing; it must be allowed explicitly (tests, demos)
    allow_simulated: bool = False
    #: the simulated provider's signing key (PEM, ECDSA P-256) -- what policies pin by fingerprint
    simulated_key: Path | None = None
    #: DCAP collateral: a JSON file (offline) or a PCCS URL
    collateral: Path | None = None
    pccs_url: str | None = None
    #: SEV-SNP collateral: AMD certificate/CRL files, KDS access
    snp: SnpCollateralSpec = SnpCollateralSpec()
    #: what each role's evidence must show (see teefl.security.tee.policy.Policy)
    policies: AttestationPolicies = AttestationPolicies()
    #: attest again during the run: ``{rounds: N}`` or ``{seconds: S}`` (None: at Join only);
    #: each required role produces fresh evidence for a fresh nonce at that cadence
    reattest_every: ReattestSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_policy_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "policy" in data:
            raise ValueError(
                "the single `policy:` is replaced by one policy per role: write "
                "`policies: {aggregator: {...}, collaborators: {...}}` (the aggregator's "
                "evidence is judged by `aggregator`, each collaborator's by `collaborators`); "
                "`teefl tee policy QUOTE --role ROLE` prints a pinned one"
            )
        return data

    @model_validator(mode="after")
    def _simulated_switch(self) -> AttestationSpec:
        for key in ("aggregator", "collaborators"):
            policy = getattr(self.policies, key)
            if policy is not None and policy.allow_simulated and not self.allow_simulated:
                raise ValueError(
                    f"policies.{key}.allow_simulated needs allow_simulated: true beside it "
                    "(simulated evidence is for tests and demos only)"
                )
        if self.reattest_every is not None and not self.enabled:
            raise ValueError(
                "reattest_every needs attestation: set collaborators or aggregator to required"
            )
        return self

    @property
    def enabled(self) -> bool:
        return "required" in (self.collaborators, self.aggregator)


class AtRestSpec(Strict):
    """Checkpoints and the final model: plain safetensors, or sealed with AES-256-GCM.

    The sealing key comes from exactly one of a file, an environment variable, or the owner's
    key service (``key_from``: `teefl keys serve`, which releases it only to an aggregator whose
    TEE evidence verifies under the owner's policy; the aggregator then never reads a key file).
    """

    mode: Literal["plain", "sealed"] = "plain"
    #: the owner's key: a file (32 raw bytes or 64 hex) or an environment variable (hex)
    key_file: Path | None = None
    key_env: str | None = None
    #: or HOST:PORT of the owner's key service (mTLS with security.tls.ca)
    key_from: str | None = None
    #: the aggregator's client certificate and key for the key service (issued by the plan's
    #: CA: ``teefl pki issue DIR --key-client aggregator``)
    client_cert: Path | None = None
    client_key: Path | None = None
    #: seconds to reach the key service and get the key before the aggregator gives up
    key_timeout: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> AtRestSpec:
        given = [k for k in ("key_file", "key_env", "key_from") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one source of the sealing key, not {' and '.join(given)}")
        if self.key_from and not (self.client_cert and self.client_key):
            raise ValueError(
                "key_from needs client_cert and client_key (the aggregator's certificate for "
                "the key service: teefl pki issue DIR --key-client aggregator)"
            )
        if (self.client_cert or self.client_key) and not self.key_from:
            raise ValueError("client_cert and client_key are for key_from; set key_from too")
        return self


class SecuritySpec(Strict):
    #: none | tls | mtls; None = mtls when certificates are configured, else an error asks
    transport: Literal["none", "tls", "mtls"] | None = None
    tls: TlsSpec = TlsSpec()
    attestation: AttestationSpec = AttestationSpec()
    at_rest: AtRestSpec = AtRestSpec()


class RuntimeSpec(Strict):
    """How each party is started, and what the host is (when detection cannot tell)."""

    launcher: Literal["native", "gramine-direct", "gramine-sgx"] = "native"
    #: a TEE label stated by the user (recorded as stated, never as detected)
    tee_label: str | None = None
    enclave_size: str = "16G"
    max_threads: int = Field(64, ge=8)
    #: gramine-sgx-sign key; None = Gramine's default key
    sign_key: Path | None = None


class StrategySpec(Strict):
    """Which aggregation strategy, with its options.

    ``name``: a registered name (``fedavg``, ``fedadam``, ...) or a ``module:attr`` reference.
    Checked only by form here: the strategy registry imports torch, which loading a plan must
    not; the name and the options are resolved by `teefl.strategy.registry.check_plan_strategy`
    before any party starts.
    """

    name: str = "fedavg"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _reference(cls, v: str) -> str:
        v = v.strip()
        if not re.match(r"^[A-Za-z0-9_.:-]+$", v) or v.count(":") > 1:
            raise ValueError(
                f"strategy {v!r} must be a strategy name (fedavg, fedadam, ...) or a "
                "'module:attribute' reference"
            )
        return v


class FederationSpec(Strict):
    rounds: int = Field(3, ge=1)
    #: a round closes when every collaborator's update is in, or -- once ``round_timeout``
    #: seconds have passed -- with at least this many (None = all collaborators, no quorum)
    min_collaborators: int | None = Field(None, ge=1)
    #: seconds a round may stay open; then it closes with a quorum or the run fails. A transfer
    #: that is still moving bytes is waited for (see idle_timeout)
    round_timeout: float = Field(3600.0, gt=0)
    #: an upload that moves no byte for this long is cut off (a dead peer, not a slow one)
    idle_timeout: float = Field(120.0, gt=0)
    #: a collaborator keeps reconnecting to an unreachable aggregator for this long (seconds)
    reconnect_timeout: float = Field(600.0, gt=0)
    #: largest sample count one update may claim (so nobody can dominate FedAvg by claiming
    #: a billion samples)
    max_samples_per_update: int = Field(1_000_000, ge=1)
    #: the aggregation strategy (docs/strategies.md); the older spelling ``aggregation: NAME``
    #: (+ ``trim_ratio``) is read as ``strategy: {name: NAME, options: {trim_ratio: ...}}``
    strategy: StrategySpec = StrategySpec()
    #: updates received and decoded at once; more uploads wait in gRPC flow control
    max_inflight_updates: int = Field(4, ge=1)
    #: downloads of the global model streamed at once; more wait for a slot (the wait counts as
    #: their download time). Bounds the aggregator's send buffers, whatever the federation's size
    max_concurrent_downloads: int = Field(4, ge=1)
    #: keep every accepted update on disk after its round (audit / replay); else deleted
    keep_updates: bool = False
    #: where a received update waits for its acknowledgement. "memory": received straight into
    #: a file in shared memory (``staging_dir``, a tmpfs), which outlives the aggregator
    #: process, and moved to the run directory after the ack; "disk": written to the run
    #: directory piece by piece while it arrives (a copy of every byte before the ack). Both
    #: survive a crash of the aggregator process, neither a crash of its host. "memory" falls
    #: back to "disk" where it cannot be used: sealed storage, a Gramine launcher, no usable tmpfs
    #: (and is not used with `network.data_plane: grpc`, whose updates are stored after decoding)
    update_staging: Literal["memory", "disk"] = "memory"
    #: the tmpfs for "memory" staging (teefl makes a folder ``teefl-<uid>`` in it)
    staging_dir: Path = Path("/dev/shm")
    #: the aggregator's memory (docs/large-models.md). "fast": updates are received into
    #: memory (``update_staging``) and summed at once into a float64 running sum (2 model sizes
    #: for a float32 model). "flat", for models of several GB: each update is received
    #: straight into its file in the run directory, whose pages the aggregator gives back as they
    #: arrive, and FedAvg sums the round's files window by window when the round closes -- the
    #: aggregator holds the global model and the next one's buffer, whatever the model's size
    #: and the number of collaborators; ``update_staging`` is then not used
    memory: Literal["fast", "flat"] = "fast"

    @model_validator(mode="before")
    @classmethod
    def _aggregation_spelling(cls, data: Any) -> Any:
        """Plans written before strategies were objects say ``aggregation: median`` and
        ``trim_ratio: 0.2``; they keep working, read as the ``strategy`` section they mean."""
        if not isinstance(data, dict) or not ({"aggregation", "trim_ratio"} & data.keys()):
            return data
        data = dict(data)
        name = data.pop("aggregation", None)
        ratio = data.pop("trim_ratio", None)
        if name is None:
            return data  # trim_ratio alone: it never applied to fedavg
        if "strategy" in data:
            raise ValueError(
                "federation.aggregation and federation.strategy are both set: keep only "
                "federation.strategy"
            )
        if name not in ("fedavg", "median", "trimmed_mean"):
            raise ValueError(
                f"federation.aggregation {name!r}: choose fedavg, median or trimmed_mean, or "
                "name any strategy under federation.strategy.name"
            )
        options = {"trim_ratio": ratio} if name == "trimmed_mean" and ratio is not None else {}
        data["strategy"] = {"name": name, "options": options}
        return data


#: a workload reference's form (checked here, torch-free; resolved and imported later, by
#: `teefl.workload.resolve.plan_workload`, before any process starts): a registered name, a
#: ``module:attr``, or a ``./file.py:attr`` / ``/abs/file.py:attr``
WORKLOAD_REF_RE = re.compile(
    r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*"  # a registered name (vision, image-folder, an entry point)
    r"|[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*"  # module:attr
    r"|(?:\.{1,2}/|/|~/)[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*)$"  # ./file.py:attr
)
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
#: the sections of a plan that belong to the ``vision`` workload (its options)
VISION_SECTIONS: tuple[str, ...] = ("model", "dataset", "partition", "training")


class WorkloadSpec(Strict):
    """What is trained: ``name`` (a reference, see `WORKLOAD_REF_RE`), its ``options`` (validated
    against the workload's ``Options`` when it is resolved), the other parties' workload
    digests this federation accepts besides the aggregator's own, and where each collaborator's
    own data is (``data_root``: ``<data_root>/<collaborator name>``, a collaborator's
    ``--data-dir`` wins). ``base``: what ``./file.py`` references are relative to (set to the
    plan file's directory on loading; host-local)."""

    name: str = "vision"
    options: dict[str, Any] = Field(default_factory=dict)
    allowed_digests: list[str] = Field(default_factory=list)
    data_root: Path | None = None
    base: Path | None = None

    @field_validator("name")
    @classmethod
    def _ref(cls, v: str) -> str:
        v = v.strip()
        if not WORKLOAD_REF_RE.match(v):
            raise ValueError(
                f"{v!r} is not a workload reference: write a registered name (vision, tabular, "
                "image-folder, noop), 'module:Class' or './file.py:Class'"
            )
        return v

    @field_validator("allowed_digests")
    @classmethod
    def _digests(cls, v: list[str]) -> list[str]:
        out = [d.strip().lower() for d in v]
        bad = [d for d in out if not DIGEST_RE.match(d)]
        if bad:
            raise ValueError(
                f"{bad[0]!r} is not a workload digest (64 hex digits, as `teefl workload "
                "digest REF` prints)"
            )
        return out

    @property
    def is_vision(self) -> bool:
        return self.name == "vision"
