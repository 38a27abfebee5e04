"""A teammate who can only read the shared store: report, info, verify and xarray work and write nothing;
features and train say so in one line, and write to a store of their own with --personal-store."""

from __future__ import annotations

import csv

import os
import shutil
import stat

import numpy as np
import pytest
import zarr

from conftest import SMALL_LAYERS, assert_one_line_error, file_snapshot, materialize_to, run_cli
from pipeline import store as store_mod
from pipeline.errors import PipelineError
from pipeline.features import FeaturesConfig, compute_features
from pipeline.views import open_features

TRAIN = ["--runs", "2", "--hidden", "16", "--epochs", "3", "--patience", "2", "--quiet"]


@pytest.fixture
def shared(trained_small, tmp_path, monkeypatch):
    """A copy of the shared store that this process may only read: its files and folders lose write permission.
    Root ignores permissions, so for root the write probe, the one thing that asks, is told what the OS would say."""
    path = tmp_path / "shared.zarr"
    shutil.copytree(trained_small, path)
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:
        real = store_mod.check_writable

        def probe(location):
            if str(location).startswith(str(path)):
                raise PipelineError(f"cannot write to {path} (Permission denied); choose a writable --store")
            return real(location)

        monkeypatch.setattr(store_mod, "check_writable", probe)
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_readers_work_and_write_nothing(shared, tmp_path):
    before = file_snapshot(shared)
    assert run_cli("info", "--store", shared).exit_code == 0
    assert run_cli("info", "--store", shared, "--json").exit_code == 0
    assert run_cli("verify", "--store", shared, "--quiet").exit_code == 0
    report = run_cli("report", "--store", shared, "--out", tmp_path / "report")
    assert report.exit_code == 0, report.output
    ds = open_features(str(shared), "train")
    assert ds["dw_norms"].shape[0] == 28
    assert file_snapshot(shared) == before


@pytest.mark.parametrize("command", [["features", "--rep", "simple_stats", "--quiet"], ["train", "--rep", "dw_norms", "--runs", "3"]])
def test_writers_say_it_is_read_only_in_one_line(shared, command):
    before = file_snapshot(shared)
    result = run_cli(*command, "--store", shared)
    assert_one_line_error(result, f"store {shared} is read-only here", "--personal-store")
    assert file_snapshot(shared) == before


def test_output_store_builds_on_the_shared_one(shared, trained_small, tmp_path):
    before = file_snapshot(shared)
    mine = tmp_path / "mine.zarr"
    result = run_cli("features", "--store", shared, "--personal-store", mine, "--rep", "simple_stats", "--quiet")
    assert result.exit_code == 0, result.output
    # the same numbers as computing them in a writable copy of the shared store
    writable = tmp_path / "writable.zarr"
    shutil.copytree(trained_small, writable)
    compute_features(FeaturesConfig(store=str(writable), reps="simple_stats", quiet=True))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(zarr.open_group(str(mine))[f"features/{split}/simple_stats"][:],
                                      zarr.open_group(str(writable))[f"features/{split}/simple_stats"][:])
    root = zarr.open_group(str(mine), mode="r")
    assert "raw" not in root and root.attrs["base"]["store"] == str(shared)
    # train on one representation of each store, concatenated; the runs land in mine
    result = run_cli("train", "--store", shared, "--personal-store", mine, "--rep", "dw_norms+simple_stats", *TRAIN)
    assert result.exit_code == 0, result.output
    assert len(list(zarr.open_group(str(mine), mode="r")["runs"].group_keys())) == 1
    assert file_snapshot(shared) == before
    # mine is a store like any other: train again (nothing to do), report, info
    again = run_cli("train", "--store", mine, "--rep", "dw_norms+simple_stats", *TRAIN[:-1])
    assert again.exit_code == 0 and "up to date" in again.output
    assert run_cli("report", "--store", mine, "--out", tmp_path / "mine-report").exit_code == 0
    # its report shows its own configuration and the shared store's, as load_runs does
    with open(tmp_path / "mine-report" / "results.csv", newline="") as f:
        reported = {row["config_hash"] for row in csv.DictReader(f)}
    ours = set(zarr.open_group(str(mine), mode="r")["runs"].group_keys())
    theirs = set(zarr.open_group(str(shared), mode="r")["runs"].group_keys())
    assert reported == ours | theirs and len(ours) == len(theirs) == 1 and ours != theirs
    info = run_cli("info", "--store", mine)
    assert f"base     {shared}" in info.output
    # the same --personal-store again: it builds on the same data, and is up to date
    again = run_cli("features", "--store", shared, "--personal-store", mine, "--rep", "simple_stats")
    assert again.exit_code == 0 and "up to date simple_stats" in again.output


def test_an_output_store_of_other_data_is_refused(shared, synth_dir, tmp_path):
    other = tmp_path / "other.zarr"
    materialize_to(other, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02, split_seed=7)  # other splits: other data
    result = run_cli("features", "--store", shared, "--output", other, "--rep", "simple_stats")  # the old spelling of --personal-store
    assert_one_line_error(result, f"--personal-store {other} builds on other data than {shared}")
