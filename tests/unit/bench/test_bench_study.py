"""teefl bench: study validation, cell expansion and order, skip reasons, the OUT study copy."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedutil import SYNTHETIC, teefl
from teefl.bench import matrix
from teefl.bench.matrix import expand, plan_cells
from teefl.bench.outdir import check_study_copy
from teefl.bench.runner import run_study
from teefl.bench.study import (
    default_study,
    load_study,
    paper_study_text,
    rate_bits,
    study_from_dict,
)
from teefl.errors import TeeflError


def study(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "base": copy.deepcopy(SYNTHETIC),
        "axes": {"transport": ["none", "tls", "mtls"], "repeats": 1},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return data


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (study(axes={"model": ["resnet18"]}), "axes.model: unknown key"),
        (study(axes={"models": ["resnet50"]}), "unknown model 'resnet50'"),
        (study(axes={"datasets": ["imagenet"]}), "unknown dataset 'imagenet'"),
        (study(axes={"transport": ["ssl"]}), "axes.transport.0"),
        (study(axes={"transport": ["tls", "tls"]}), "tls more than once"),
        (study(axes={"transport": []}), "at least one value"),
        (study(axes={"repeats": 0}), "axes.repeats"),
        (study(axes={"rounds": [0]}), "rounds must be >= 1"),
        (study(network={"bandwidth": "1gbps"}), "tc rate in bits per second"),
        (study(network={"mode": "vpn"}), "network.mode"),
        (study(network={"subnet": "8.8.8.0/24"}), "private IPv4"),
        (study(name="a b"), "name: 'a b' must be"),
        (study(tee_label="TD X"), "invalid TEE label"),
        (study(launch="native"), "launch: unknown key"),
        (study(base={**SYNTHETIC, "training": {"batch_size": 0}}), "base: invalid plan"),
        (study(base={**SYNTHETIC, "rounds": 3}), "rounds: unknown key"),
        ([1, 2], "top level must be a mapping"),
    ],
)
def test_validation_errors_name_the_key(data: Any, message: str) -> None:
    with pytest.raises(TeeflError) as err:
        study_from_dict(data, "s.yaml")
    assert message in str(err.value)
    assert "invalid study s.yaml" in str(err.value)


def test_malformed_yaml_and_missing_base_plan(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: [unclosed\n")
    with pytest.raises(TeeflError, match="malformed YAML"):
        load_study(bad)
    with pytest.raises(TeeflError, match="study file not found"):
        load_study(tmp_path / "nope.yaml")
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump({"base_plan": "plan.yaml"}))
    with pytest.raises(TeeflError, match=r"base_plan .*plan\.yaml not found"):
        load_study(s)


def test_base_plan_file_is_inlined_and_overridden(tmp_path: Path) -> None:
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(SYNTHETIC))
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump({"base_plan": "plan.yaml", "base": {"training": {"lr": 0.5}}}))
    st = load_study(s)
    assert st.base_plan is None
    plan = st.base_plan_obj()
    assert plan.training.lr == 0.5 and plan.training.batch_size == 32
    assert plan.dataset.synthetic.shape == (1, 12, 12)


def test_yaml_off_is_attestation_off_and_scalars_become_lists() -> None:
    data = yaml.safe_load(
        "axes: {attestation: off, transport: tls, rounds: 3, models: small_cnn}\n"
        "base: {dataset: {name: synthetic}}"
    )
    st = study_from_dict(data)
    assert st.axes.attestation == ["off"]
    assert st.axes.transport == ["tls"] and st.axes.rounds == [3]
    assert st.axes.models == ["small_cnn"]
    assert rate_bits("1gbit") == 1e9 and rate_bits("100mbit") == 1e8


def test_embedded_studies_are_valid() -> None:
    st = default_study()
    assert set(st.axes.models or []) == {"resnet18", "mobilenet_v3_small"}
    assert st.axes.transport == ["none", "tls", "mtls"] and st.axes.repeats == 2
    assert st.base_plan_obj().dataset.max_samples_per_collaborator
    paper = study_from_dict(yaml.safe_load(paper_study_text()), "paper")
    assert paper.axes.rounds == [100]
    assert paper.axes.datasets == ["mnist", "cifar10", "cifar100"]
    base = paper.base_plan_obj()
    assert base.training.lr == 1e-4 and base.training.optimizer == "adam"
    assert len(base.collaborators) == 3


# -- expansion ----------------------------------------------------------------------------------


def test_expansion_interleaves_configurations() -> None:
    st = study_from_dict(
        study(axes={"models": ["small_cnn", "resnet18"], "repeats": 2}), check=False
    )
    cells, invalid = expand(st)
    assert not invalid
    assert len(cells) == 2 * 3 * 2
    order = [(c.repeat, c.model, c.config.name) for c in cells]
    assert order == [
        (1, "small_cnn", "baseline"),
        (1, "small_cnn", "tls"),
        (1, "small_cnn", "mtls"),
        (1, "resnet18", "tls"),
        (1, "resnet18", "mtls"),
        (1, "resnet18", "baseline"),
        (2, "small_cnn", "tls"),
        (2, "small_cnn", "mtls"),
        (2, "small_cnn", "baseline"),
        (2, "resnet18", "mtls"),
        (2, "resnet18", "baseline"),
        (2, "resnet18", "tls"),
    ]
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    assert names[0] == "small_cnn-synthetic-baseline-r1"
    # the cell's plan says what the cell is
    plan = matrix.build_plan(st, cells[3])
    assert plan.model.name == "resnet18" and plan.security.transport == "tls"
    assert plan.federation.rounds == 2 and plan.training.lr == 0.003


def test_rounds_axis_and_host_label_enter_names() -> None:
    st = study_from_dict(
        study(axes={"rounds": [1, 2], "transport": ["none"]}, host_label="tdx-vm"), check=False
    )
    cells, _ = expand(st)
    assert [c.name for c in cells] == [
        "tdx-vm-small_cnn-synthetic-1rounds-baseline-r1",
        "tdx-vm-small_cnn-synthetic-2rounds-baseline-r1",
    ]
    assert [matrix.build_plan(st, c).federation.rounds for c in cells] == [1, 2]


def test_invalid_combinations_are_left_out_with_the_reason() -> None:
    st = study_from_dict(study(axes={"attestation": ["off", "required"]}))
    cells, invalid = expand(st)
    assert {c.config.name for c in cells} == {
        "baseline",
        "tls",
        "mtls",
        "attested+mtls",
    }
    reasons = {cfg.name: why for cfg, why in invalid}
    assert set(reasons) == {"attested", "attested+tls"}
    assert "tls or mtls" in reasons["attested"] or "TLS key" in reasons["attested"]


def test_skip_reasons(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from teefl.workload import datasets

    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path / "no-data")
    monkeypatch.delenv("TEEFL_DATA", raising=False)
    monkeypatch.setattr(matrix.shutil, "which", lambda name: None)
    st = study_from_dict(
        study(
            axes={
                "transport": ["mtls"],
                "launcher": ["native", "gramine-direct"],
                "attestation": ["off", "required"],
                "datasets": ["synthetic", "mnist"],
            }
        )
    )
    cells, _ = plan_cells(st)
    why = {c.name: c.skip for c in cells}
    assert why["small_cnn-synthetic-mtls-r1"] is None
    assert "gramine-direct, gramine-manifest not found on PATH" in (
        why["small_cnn-synthetic-gramine-direct+mtls-r1"] or ""
    )
    assert why["small_cnn-synthetic-attested+mtls-r1"] == (
        "attestation provider not available on this host"
    )
    assert "dataset mnist not found" in why["small_cnn-mnist-mtls-r1"]


def test_simulated_attestation_is_runnable() -> None:
    base = copy.deepcopy(SYNTHETIC)
    base["security"] = {
        "transport": "none",
        "attestation": {"provider": "simulated", "allow_simulated": True},
    }
    st = study_from_dict(study(base=base, axes={"attestation": ["required"]}))
    cells, invalid = plan_cells(st)
    assert [c.config.name for c in cells] == ["attested+mtls"]
    assert cells[0].skip is None
    assert len(invalid) == 2


def test_missing_dataset_falls_back_to_synthetic(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from teefl.workload import datasets

    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path / "no-data")
    monkeypatch.delenv("TEEFL_DATA", raising=False)
    st = study_from_dict(
        study(
            axes={"datasets": ["fashion-mnist"], "transport": ["none"]},
            dataset_fallback="synthetic",
        )
    )
    cells, _ = plan_cells(st)
    (cell,) = cells
    assert cell.skip is None and cell.dataset == "synthetic"
    assert cell.name == "small_cnn-synthetic-baseline-r1"
    assert "SYNTHETIC" in cell.notes[0] and "fashion-mnist not found" in cell.notes[0]
    assert matrix.build_plan(st, cell).dataset.name == "synthetic"


def test_strict_refuses_unrunnable_cells(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(matrix.shutil, "which", lambda name: None)
    st = study_from_dict(study(axes={"launcher": ["native", "gramine-sgx"]}))
    with pytest.raises(TeeflError, match="--strict: 3 cell"):
        run_study(st, tmp_path / "out", strict=True, dry_run=True, report=False)
    res = run_study(st, tmp_path / "out", dry_run=True, report=False)
    assert res.count("skipped") == 3


# -- the study copy in OUT ----------------------------------------------------------------------


def test_a_different_study_in_the_same_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    a = study_from_dict(study())
    check_study_copy(a, out, force=False)
    check_study_copy(a, out, force=False)  # same study: fine
    b = study_from_dict(study(axes={"repeats": 3}, base={**SYNTHETIC, "seed": 7}))
    with pytest.raises(TeeflError) as err:
        check_study_copy(b, out, force=False)
    assert "axes.repeats" in str(err.value) and "base.seed" in str(err.value)
    check_study_copy(b, out, force=True)
    assert yaml.safe_load((out / "study.yaml").read_text())["axes"]["repeats"] == 3


def test_cli_writes_study_files(tmp_path: Path) -> None:
    res = teefl("bench", "--paper", cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    st = load_study(tmp_path / "paper-study.yaml")
    assert st.name == "paper" and st.axes.rounds == [100]
    res = teefl("bench", "--paper", cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and "--force" in res.stderr
    res = teefl("bench", "--write-study", "mine.yaml", cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert load_study(tmp_path / "mine.yaml").name == "default"


def test_cli_dry_run_and_validation_error(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study()))
    res = teefl("bench", "s.yaml", "--dry-run", "--out", "o", cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "small_cnn-synthetic-mtls-r1" in res.stdout and "to run" in res.stdout
    assert not (tmp_path / "o" / "small_cnn-synthetic-baseline-r1").exists()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(study(axes={"transports": ["tls"]})))
    res = teefl("bench", "bad.yaml", cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    assert "axes.transports: unknown key" in res.stderr


def test_netns_without_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from teefl.bench import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(TeeflError, match="needs root"):
        netns.require_netns()
