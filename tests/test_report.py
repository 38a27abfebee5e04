"""The report: its numbers are the stored runs' numbers, its files exist, its statistics are right."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import zarr

from conftest import assert_one_line_error, run_cli
from pipeline import metrics
from pipeline.report import default_out, write_report
from pipeline.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(signal_store, tmp_path_factory):
    """A copy of the signal store with a small grid trained: 2 reps x 2 layer sets, 3 runs each."""
    path = tmp_path_factory.mktemp("report") / "trained.zarr"
    shutil.copytree(signal_store, path, ignore=lambda folder, names: ["runs"] if folder == str(signal_store) else [])
    train(TrainConfig(store=str(path), reps="simple_stats,dw_norms", layers="all,visual", runs=3, hidden=16, epochs=6,
                      patience=3, quiet=True))
    return path


def test_t_quantile_matches_scipy():
    from scipy.stats import t

    for df in (1, 2, 5, 9, 29, 30, 31, 50, 1000):
        assert metrics.t975(df) == pytest.approx(t.ppf(0.975, df), abs=1e-5)


def test_report_numbers_equal_the_stored_runs(trained, tmp_path):
    summary = write_report(str(trained), tmp_path / "out")
    with open(tmp_path / "out" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    root = zarr.open_group(str(trained), mode="r")
    for r in rows:
        group = root[f"runs/{r['config_hash']}"]
        runs = [group[f"run-{i:03d}"].attrs for i in range(3)]
        acc = np.array([run["metrics"]["test"]["accuracy"] for run in runs])
        f1 = np.array([run["metrics"]["test"]["f1"] for run in runs])
        assert int(r["runs"]) == 3 and int(r["feature_width"]) == group.attrs["feature_width"]
        assert float(r["test_mean"]) == pytest.approx(acc.mean())
        assert float(r["test_std"]) == pytest.approx(acc.std(ddof=1))
        assert float(r["test_ci95"]) == pytest.approx(4.302653 * acc.std(ddof=1) / math.sqrt(3))
        assert float(r["test_f1_mean"]) == pytest.approx(f1.mean())
        assert float(r["train_seconds"]) == pytest.approx(sum(run["seconds"] for run in runs))
        assert f"| {r['reps']} | {r['layer_set']} | {r['feature_width']} | 3 | {acc.mean():.3f} ± {acc.std(ddof=1):.3f}" \
            in summary.table
    names = {f.name for f in summary.files}
    assert {"results.md", "results.csv", "test_category_label_mlp.png", "curves_category_label_mlp.png",
            "confusion_category_label_mlp.png"} <= names
    for f in summary.files:
        assert f.stat().st_size > 0
    assert (tmp_path / "out" / "test_category_label_mlp.png").read_bytes()[:4] == b"\x89PNG"
    assert summary.table in (tmp_path / "out" / "results.md").read_text()


def test_report_cli_prints_the_table_and_defaults_beside_the_store(trained):
    result = run_cli("report", "--store", trained)
    assert result.exit_code == 0, result.output
    assert "| dw_norms | visual |" in result.output
    assert default_out(str(trained)) == trained.with_name("trained.report")
    assert (trained.with_name("trained.report") / "results.md").is_file()


def test_report_ignores_unfinished_runs(trained, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(trained, copy)
    root = zarr.open_group(str(copy), mode="r+")
    digest = sorted(root["runs"].group_keys())[0]
    root[f"runs/{digest}/run-002"].attrs["complete"] = False
    rows = {r["config_hash"]: r for r in write_report(str(copy), tmp_path / "out").rows}
    assert rows[digest]["runs"] == 2


def test_report_without_runs_is_one_line(tmp_path):
    store = tmp_path / "empty.zarr"
    root = zarr.open_group(str(store), mode="w")
    root.attrs.put({"format": "weightspace-pipeline-store", "schema_version": 1})
    assert_one_line_error(run_cli("report", "--store", store), "no finished runs", "pipeline train")
