"""Plans: defaults, and one clear line for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from teefl.errors import TeeflError
from teefl.plan import default_plan, load_plan, plan_from_dict


def test_default_plan_is_valid() -> None:
    plan = default_plan()
    assert len(plan.collaborators) == 3
    assert plan.federation.rounds >= 1


def test_collaborator_count_expands_to_names() -> None:
    assert plan_from_dict({"collaborators": 2}).collaborators == ["col1", "col2"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"federation": {"round": 3}}, "federation.round: unknown key"),
        ({"model": {"name": "vgg99"}}, "model.name: unknown model 'vgg99'"),
        ({"dataset": {"name": "imagenet"}}, "dataset.name: unknown dataset 'imagenet'"),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"collaborators": ["a", "a"]}, "unique"),
        ({"collaborators": ["bad name!"]}, "collaborator name"),
        (
            {"security": {"transport": "none", "attestation": {"collaborators": "required"}}},
            "needs transport tls or mtls",
        ),
        ({"security": {"at_rest": {"mode": "sealed"}}}, "key_file, key_env or key_from"),
        (
            {"security": {"at_rest": {"mode": "sealed", "key_from": "h:1"}}},
            "key_from needs client_cert and client_key",
        ),
        (
            {"security": {"at_rest": {"mode": "sealed", "key_env": "K", "key_from": "h:1"}}},
            "one source of the sealing key, not key_env and key_from",
        ),
        (
            {"security": {"at_rest": {"client_cert": "a.crt", "client_key": "a.key"}}},
            "client_cert and client_key are for key_from",
        ),
        (
            {
                "security": {
                    "transport": "none",
                    "at_rest": {
                        "mode": "sealed",
                        "key_from": "h:1",
                        "client_cert": "a.crt",
                        "client_key": "a.key",
                    },
                }
            },
            "the key service is reached over mTLS",
        ),
        (
            {"security": {"attestation": {"policies": {"collaborators": {"mrtd": ["zz"]}}}}},
            "security.attestation.policies.collaborators.mrtd",
        ),
        (  # the single policy of earlier plans: one line saying what replaces it
            {"security": {"attestation": {"policy": {"mrtd": ["00" * 48]}}}},
            "security.attestation: the single `policy:` is replaced by one policy per role",
        ),
        (
            {"security": {"attestation": {"policies": {"aggregators": {}}}}},
            "security.attestation.policies.aggregators: unknown key",
        ),
        (  # a role policy cannot open simulated evidence behind the plan's back
            {
                "security": {
                    "attestation": {
                        "policies": {
                            "aggregator": {
                                "allow_simulated": True,
                                "simulated_keys": ["00" * 32],
                                **{k: ["00" * 48] for k in ("mrtd", "rtmr0", "rtmr1")},
                                "tdx_unpinned": ["rtmr2", "rtmr3"],
                            }
                        }
                    }
                }
            },
            "policies.aggregator.allow_simulated needs allow_simulated: true",
        ),
        ({"network": {"port": 70000}}, "network.port"),
    ],
)
def test_bad_plans_name_the_key(data, message) -> None:
    with pytest.raises(TeeflError) as info:
        plan_from_dict(data, source="p.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  rounds: [1,\n")
    with pytest.raises(TeeflError, match=r"malformed YAML"):
        load_plan(bad)
    with pytest.raises(TeeflError, match="plan file not found"):
        load_plan(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_plan(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("dataset:\n  root: data\n")
    assert load_plan(tmp_path / "p.yaml").dataset.root == (tmp_path / "data").resolve()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(f"dataset:\n  root: {tmp_path / 'abs'}\n")
    assert load_plan(tmp_path / "p.yaml").dataset.root == tmp_path / "abs"


def test_transport_must_be_chosen() -> None:
    from teefl.plan import require_transport

    with pytest.raises(TeeflError, match=r"does not choose security\.transport"):
        require_transport(plan_from_dict({}))
    with pytest.raises(TeeflError, match=r"tls\.ca is not set"):
        require_transport(plan_from_dict({"security": {"transport": "tls"}}))
    plan = plan_from_dict({"security": {"tls": {"ca": "/x/ca.crt"}}})
    assert require_transport(plan) == "mtls"
    assert require_transport(plan_from_dict({"security": {"transport": "none"}})) == "none"


def test_where_the_sealing_key_comes_from_is_host_local(tmp_path: Path) -> None:
    """A key file on one host, the key service on another: the same plan fingerprint (the mode
    is compared); the key service's client certificate resolves against the plan."""
    from teefl.plan import plan_digest

    by_file = {"security": {"at_rest": {"mode": "sealed", "key_file": "owner.key"}}}
    rest = {"mode": "sealed", "key_from": "k:1", "client_cert": "c.crt", "client_key": "c.key"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"security": {"at_rest": rest}}))
    by_service = load_plan(tmp_path / "p.yaml")
    assert by_service.security.at_rest.client_cert == (tmp_path / "c.crt").resolve()
    assert plan_digest(plan_from_dict(by_file)) == plan_digest(by_service)
    plain = plan_from_dict({"security": {"at_rest": {"mode": "plain"}}})
    assert plan_digest(plain) != plan_digest(by_service)
