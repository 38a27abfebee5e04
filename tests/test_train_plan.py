"""`pipeline train`'s progress (configurations, runs, epochs, ETA) and `train --dry-run` (the grid and its cost,
nothing written)."""

from __future__ import annotations

import re
import shutil

import zarr

from conftest import file_snapshot, run_cli
from pipeline.train import TrainConfig, train
from pipeline.train_plan import plan

FAST = dict(runs=2, hidden=16, epochs=4, patience=2)


def test_dry_run_prints_the_grid_and_writes_nothing(signal_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(signal_store, path, ignore=lambda folder, names: ["runs"] if folder == str(signal_store) else [])
    before = file_snapshot(path)
    args = ("train", "--store", path, "--rep", "simple_stats,dw_norms", "--layers", "all,visual", "--runs", 2,
            "--hidden", 16, "--epochs", 4, "--patience", 2, "--dry-run")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert file_snapshot(path) == before  # nothing written: no runs, no lease, no personal store
    lines = result.output.splitlines()
    assert lines[0].startswith("dry run: 4 configurations x 2 runs") and "nothing is trained or written" in lines[0]
    assert "time unknown: no run is stored yet" in lines[-1] and lines[-1].startswith("total: 8 runs")
    planned = plan(TrainConfig(store=str(path), reps="simple_stats,dw_norms", layers="all,visual", **FAST))
    trained = train(TrainConfig(store=str(path), reps="simple_stats,dw_norms", layers="all,visual", quiet=True, **FAST))
    assert [p.config_hash for p in planned.configurations] == [r.config_hash for r in trained.results]
    assert [p.width for p in planned.configurations] == [r.width for r in trained.results]
    for p in planned.configurations:
        assert re.search(rf"{re.escape(p.setup.name)}\s+{p.config_hash}\s+width\s+{p.width}\s+2 runs to train", result.output)
    again = run_cli(*args[:-1], "--runs", 3, "--dry-run")  # now timed by the stored runs, 2 of 3 finished each
    assert again.exit_code == 0, again.output
    assert again.output.count("1 runs to train, 2 finished") == 4
    assert "at the 8 stored mlp runs' median" in again.output and re.search(r"~\d+ s", again.output)
    other = run_cli("train", "--store", path, "--rep", "dw_norms", "--model", "linear", "--dry-run")  # none of its own
    assert other.exit_code == 0, other.output
    assert "at the 8 stored runs (of every model)' median" in other.output
    planned = plan(TrainConfig(store=str(path), reps="dw_norms", model="linear", runs=2))
    mlp_rate = plan(TrainConfig(store=str(path), reps="dw_norms", **FAST)).seconds_per_gflop
    assert planned.timed_by == "" and planned.seconds_per_gflop == mlp_rate
    train(TrainConfig(store=str(path), reps="dw_norms", model="linear", runs=1, quiet=True))
    assert plan(TrainConfig(store=str(path), reps="dw_norms", model="linear", runs=2)).timed_by == "linear"


def test_dry_run_on_a_read_only_store_with_a_personal_store_creates_nothing(signal_store, tmp_path):
    mine = tmp_path / "mine.zarr"
    result = run_cli("train", "--store", signal_store, "--rep", "dw_norms", "--personal-store", mine, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not mine.exists()


def test_train_shows_progress_unless_quiet(signal_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(signal_store, path, ignore=lambda folder, names: ["runs"] if folder == str(signal_store) else [])
    args = ("train", "--store", path, "--rep", "dw_norms", "--layers", "all,visual", "--runs", 2, "--hidden", 16,
            "--epochs", 4, "--patience", 2)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert re.search(r"train: 100%\|.*\| 2/2 \[", result.output)  # configurations done of the total, with tqdm's ETA
    assert "runs 4/4" in result.output and "epoch" in result.output
    quiet = run_cli(*args, "--force", "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""
    assert len(list(zarr.open_group(str(path), mode="r")["runs"].group_keys())) == 2
