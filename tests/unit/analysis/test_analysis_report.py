"""teefl report / fit / predict end to end on fabricated runs, and the import boundary."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO
from typer.testing import CliRunner

from teefl.analysis.report import form_groups, make_report, plan_signature

EXAMPLES = REPO / "examples"
CONFIGS = {  # name -> (fabricate_run kwargs, slow-down used to fabricate the timeline)
    "baseline": ({}, 1.0),
    "tls": ({"transport": "tls"}, 1.05),
    "tdx": ({"tee": "tdx"}, 1.15),
    "tdx+tls": ({"tee": "tdx", "transport": "tls"}, 1.20),
}


def _fab():
    spec = importlib.util.spec_from_file_location(
        "teefl_test_fabricate", REPO / "tests/unit/analysis/test_analysis_fabricate.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fab = _fab()


def make_study(root: Path, hosts: tuple[str, ...] = ("hostA",), repeats: int = 2) -> None:
    """2 models x 2 datasets x 4 configurations x repeats, spread over host folders."""
    k = 0
    for model in ("resnet18", "mobilenet_v3_small"):
        for dataset in ("mnist", "cifar10"):
            for cname, (kw, slow) in CONFIGS.items():
                for rep in range(repeats):
                    host = hosts[k % len(hosts)]
                    k += 1
                    fab.fabricate_run(
                        root / host / "runs",
                        f"{model}-{dataset}-{cname}-{rep}",
                        model=model,
                        dataset=dataset,
                        slow=slow * (1 + 0.01 * rep),
                        comm_slow=1.1 if "tls" in cname else 1.0,
                        host=host,
                        **kw,
                    )


def test_report_cli_writes_tables_and_figures(tmp_path: Path) -> None:
    from teefl.cli import app

    make_study(tmp_path / "in", hosts=("hostA", "hostB"))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "report",
            str(tmp_path / "in" / "hostA"),
            str(tmp_path / "in" / "hostB"),
            "--out",
            str(out),
            "--resamples",
            "200",
        ],
    )
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    for name in (
        "table1_models.csv",
        "table1_datasets.csv",
        "table2_wallclock.csv",
        "table3_communication.csv",
        "phases.csv",
        "runs.csv",
        "fit.json",
        "coefficients.csv",
        "fit_predictions.csv",
    ):
        assert (out / name).is_file(), name
        assert f"({name})" in md or name in ("phases.csv", "runs.csv", "fit_predictions.csv")
    for model in ("resnet18", "mobilenet_v3_small"):
        for kind in ("phases", "overhead"):
            png = out / f"{kind}_{model}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({png.name})" in md
    assert "one group" in md
    assert "Table II" in md and "Table III" in md
    # Table II: means over the 2 repeats, n=2, 16 cells
    with open(out / "table2_wallclock.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16
    assert {r["n"] for r in rows} == {"2"}
    # Table III: 3 collaborators x 3 rounds x 2 repeats
    with open(out / "table3_communication.csv") as fh:
        t3 = list(csv.DictReader(fh))
    assert {r["n"] for r in t3} == {"18"}
    tls = next(
        r
        for r in t3
        if r["config"] == "tls" and r["model"] == "resnet18" and r["dataset"] == "mnist"
    )
    base = next(
        r
        for r in t3
        if r["config"] == "baseline" and r["model"] == "resnet18" and r["dataset"] == "mnist"
    )
    assert float(tls["mean_s"]) > float(base["mean_s"])
    # Table I from run.json model_info / dataset_info
    with open(out / "table1_models.csv") as fh:
        t1 = list(csv.DictReader(fh))
    assert t1[0]["parameters"] == "11172042" and t1[0]["tensors"] == "122"
    # runs.csv is itself valid input for teefl fit
    fit = json.loads((out / "fit.json").read_text())
    for mf in fit["models"].values():
        assert mf["runs"] == 16
        assert mf["coefficients"]["tdx"]["value"] > mf["coefficients"]["tls"]["value"] > 0
    res2 = CliRunner().invoke(app, ["fit", str(out / "runs.csv"), "--resamples", "50"])
    assert res2.exit_code == 0, res2.output
    assert "C[tdx]" in res2.output


def test_groups_split_on_plan_differences(tmp_path: Path) -> None:
    fab.fabricate_run(tmp_path, "a", rounds=3)
    fab.fabricate_run(
        tmp_path,
        "b",
        rounds=3,
        transport="tls",
        dataset="cifar10",
        plan_overrides={"name": "other", "seed": 5},
    )
    fab.fabricate_run(tmp_path, "c", rounds=2)
    fab.fabricate_run(tmp_path, "d", rounds=3, plan_overrides={"training.batch_size": 32})
    res = make_report([tmp_path], tmp_path / "out", resamples=20)
    groups = {g.gid: sorted(e.summary["run_id"] for e in g.entries) for g in res["groups"]}
    assert sorted(groups.values()) == [["a", "b"], ["c"], ["d"]]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "separate groups" in md
    assert "`federation.rounds`" in md and "`training.batch_size`" in md
    assert (tmp_path / "out" / "table2_wallclock-g1.csv").is_file()
    assert (tmp_path / "out" / "table2_wallclock-g2.csv").is_file()


def test_plan_signature_ignores_security_dataset_name_network() -> None:
    p1 = fab.base_plan()
    p2 = fab.base_plan()
    p2["security"]["transport"] = "mtls"
    p2["dataset"]["name"], p2["dataset"]["root"] = "cifar10", "/elsewhere"
    p2["network"]["host"] = "10.0.0.1"
    p2["name"] = "x"
    assert plan_signature(p1) == plan_signature(p2)
    p2["federation"]["rounds"] = 100
    assert plan_signature(p1) != plan_signature(p2)


def test_report_excludes_failed_and_duplicate_runs(tmp_path: Path) -> None:
    fab.fabricate_run(tmp_path / "A", "ok")
    fab.fabricate_run(tmp_path / "A", "bad", status="failed")
    fab.fabricate_run(tmp_path / "B", "ok")
    res = make_report([tmp_path / "A", tmp_path / "B"], tmp_path / "out", resamples=10)
    reasons = " ".join(r for _, r in res["excluded"])
    assert "failed" in reasons and "duplicate" in reasons
    assert res["runs"] == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Excluded runs" in md
    assert "Not fitted" in md  # only a baseline: nothing to fit, said clearly


def test_report_without_runs_is_a_clear_error(tmp_path: Path) -> None:
    from teefl.cli import app

    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "no run directory" in str(res.exception)


def test_fit_and_predict_cli_on_paper_table(tmp_path: Path) -> None:
    from teefl.cli import app

    out = tmp_path / "fit.json"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "fit",
            str(EXAMPLES / "paper_table2_tdx.csv"),
            "--out",
            str(out),
            "--resamples",
            "300",
            "--plot-dir",
            str(tmp_path / "plots"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "C[tdx]" in res.output and "C[tls]" in res.output and "R²" in res.output
    assert (tmp_path / "plots" / "overhead_resnet18.png").is_file()
    data = json.loads(out.read_text())
    assert data["bootstrap"] == {"resamples": 300, "seed": 0, "level": 0.95}
    res = runner.invoke(
        app, ["predict", "--fit", str(out), "--baseline", "01:00", "--model", "resnet18"]
    )
    assert res.exit_code == 0, res.output
    assert "tdx+tls" in res.output and "01:00:00" in res.output
    res = runner.invoke(app, ["predict", "--fit", str(out), "--baseline", "1:75"])
    assert res.exit_code != 0
    assert "minutes must be 00-59" in str(res.exception)


def test_fit_cli_on_run_directories(tmp_path: Path) -> None:
    from teefl.cli import app

    make_study(tmp_path, repeats=1)
    res = CliRunner().invoke(app, ["fit", str(tmp_path / "hostA"), "--resamples", "50"])
    assert res.exit_code == 0, res.output
    assert "resnet18" in res.output and "C[tdx]" in res.output
    fab.fabricate_run(tmp_path / "hostA" / "runs", "other-plan", rounds=2, tee="tdx")
    res = CliRunner().invoke(app, ["fit", str(tmp_path / "hostA"), "--resamples", "20"])
    assert res.exit_code == 0, res.output
    assert "2 plans" in res.output and "federation.rounds" in res.output


def test_fit_cli_warns_on_collinear_mechanisms(tmp_path: Path) -> None:
    from teefl.cli import app

    p = tmp_path / "t.csv"
    p.write_text("model,dataset,config,time\nm,d,baseline,01:00\nm,d,tdx+tls,01:10\n")
    res = CliRunner().invoke(app, ["fit", str(p), "--resamples", "20"])
    assert res.exit_code == 0, res.output
    assert "always on together" in res.output
    assert "C[tdx&tls]" in res.output


def test_fit_cli_and_report_say_an_exact_fit_has_no_intervals(tmp_path: Path) -> None:
    from teefl.cli import app

    p = tmp_path / "t.csv"
    p.write_text("model,dataset,config,time\nm,d,baseline,01:00\nm,d,tdx,01:10\nm,d,tls,01:03\n")
    out = tmp_path / "fit.json"
    res = CliRunner().invoke(app, ["fit", str(p), "--resamples", "50", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "exact fit" in res.output and "the fit is exact" in res.output
    assert "[0.1667, 0.1667]" not in res.output  # no zero-width interval shown
    mf = json.loads(out.read_text())["models"]["m"]
    assert mf["intervals_estimable"] is False
    assert any("the fit is exact" in w for w in mf["warnings"])
    # the report: one run per configuration on one dataset, fabricated as teefl runs
    for cname in ("baseline", "tls", "tdx"):
        kw, slow = CONFIGS[cname]
        fab.fabricate_run(tmp_path / "runs", f"m-{cname}", slow=slow, **kw)
    res = make_report([tmp_path / "runs"], tmp_path / "report", resamples=50)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**exact fit**" in md and "the fit is exact" in md
    fits = list((tmp_path / "report").glob("fit*.json"))
    assert fits and all(
        m["intervals_estimable"] is False
        for f in fits
        for m in json.loads(f.read_text())["models"].values()
    )


def test_groups_of_one_plan(tmp_path: Path) -> None:
    fab.fabricate_run(tmp_path, "a")
    from teefl.analysis.report import collect

    entries, _ = collect([tmp_path])
    assert len(form_groups(entries)) == 1


def test_analysis_never_imports_torch_grpc_or_federation() -> None:
    code = (
        "import sys\n"
        "import teefl.analysis, teefl.analysis.report, teefl.analysis.perfmodel, "
        "teefl.analysis.summary, teefl.analysis.tables, teefl.analysis.plots, "
        "teefl.analysis.loader, teefl.analysis.timefmt, teefl.analysis.mechanisms\n"
        "import teefl.commands.analysis\n"
        "from teefl.analysis.plots import _pyplot; _pyplot()\n"
        "bad = [m for m in sys.modules if m in ('torch', 'grpc', 'torchvision') "
        "or m.startswith(('teefl.federation', 'teefl.workload'))]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_command_module_imports_analysis_lazily() -> None:
    code = (
        "import sys\n"
        "import teefl.commands.analysis\n"
        "heavy = [m for m in ('pandas', 'scipy', 'matplotlib', 'numpy') if m in sys.modules]\n"
        "heavy += [m for m in sys.modules if m.startswith('teefl.analysis')]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("cmd", ["report", "fit", "predict", "summarize"])
def test_help(cmd: str) -> None:
    from teefl.cli import app

    res = CliRunner().invoke(app, [cmd, "--help"])
    assert res.exit_code == 0
