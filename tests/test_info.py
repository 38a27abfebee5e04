"""`pipeline info [--json]`: what a store holds, each representation's state and each trained configuration;
and the schema version guard every command passes through."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from conftest import assert_one_line_error, run_cli

REPS = "simple_stats,dw_norms"


@pytest.fixture(scope="module")
def trained_store(small_store, tmp_path_factory):
    """small_store with two representations computed and one tiny configuration trained (3 runs)."""
    path = tmp_path_factory.mktemp("info") / "s.zarr"
    shutil.copytree(small_store, path)
    result = run_cli("features", "--store", path, "--rep", REPS, "--quiet")
    assert result.exit_code == 0, result.output
    result = run_cli("train", "--store", path, "--rep", "dw_norms", "--runs", 3, "--hidden", 16, "--epochs", 3,
                     "--quiet")
    assert result.exit_code == 0, result.output
    return path


def info_json(path) -> dict:
    result = run_cli("info", "--store", path, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_reports_splits_representations_and_training(trained_store):
    info = info_json(trained_store)
    attrs = zarr.open_group(str(trained_store), mode="r").attrs.asdict()
    assert info["splits"] == {name: s["n"] for name, s in attrs["splits"].items()}
    assert info["layers"] == 8 and info["modules"] == 4 and info["raw_complete"] == "12/12"
    assert info["labels"]["category_label"]["classes"] == attrs["labels"]["category_label"]["classes"]

    assert set(info["representations"]) == set(REPS.split(","))
    for name, rep in info["representations"].items():
        assert rep["state"] == "fresh", name
        assert set(rep["splits"]) == {"train", "val", "test"}
        assert all("@" in s["created_by"] and s["created_at"] for s in rep["splits"].values())
        files = [f for f in (trained_store / "features").rglob("*") if f.is_file() and f"/{name}/" in str(f)]
        assert rep["bytes"] == sum(f.stat().st_size for f in files) > 0

    [config] = info["training"]
    assert config["reps"] == "dw_norms" and config["layer_set"] == "all" and config["runs_done"] == 3
    group = zarr.open_group(str(trained_store), mode="r")[f"runs/{config['config_hash']}"]
    accuracies = [group[f"run-{r:03d}"].attrs["metrics"]["test"]["accuracy"] for r in range(3)]
    assert config["best_test"] == max(accuracies)
    assert config["mean_test"] == pytest.approx(np.mean(accuracies))

    on_disk = sum(f.stat().st_size for f in trained_store.rglob("*") if f.is_file())
    assert info["bytes_on_disk"] == on_disk
    assert info["compression_ratio"] == pytest.approx(info["bytes_uncompressed"] / on_disk)


def test_text_lists_each_representation_and_configuration(trained_store):
    result = run_cli("info", "--store", trained_store)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum(line.startswith("feature  ") and " fresh " in line for line in lines) == 2
    assert any(line.startswith("trained  dw_norms") and "3 runs" in line for line in lines)
    assert lines[-1].startswith("size     ")


def test_stale_and_incomplete_representations_are_named(trained_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(trained_store, path)
    root = zarr.open_group(str(path), mode="r+")
    root["features/train/simple_stats"].attrs["spec_hash"] = "0" * 16  # as if made by another version
    for split in ("train", "val", "test"):
        root[f"features/{split}/dw_norms"].attrs["complete"] = False  # as if interrupted
    reps = info_json(path)["representations"]
    assert reps["dw_norms"]["state"] == "incomplete"
    assert reps["simple_stats"]["state"] == "mixed: train stale, val fresh, test fresh"


def _set_schema(path, version) -> None:
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = version
    meta.write_text(json.dumps(doc))


@pytest.mark.parametrize("command", [("info",), ("features", "--rep", "simple_stats"), ("train",), ("report",)])
def test_a_store_from_a_newer_schema_is_refused(small_store, tmp_path, command):
    path = tmp_path / "s.zarr"
    shutil.copytree(small_store, path)
    _set_schema(path, 99)
    before = (path / "zarr.json").read_bytes()
    result = run_cli(*command, "--store", path)
    assert_one_line_error(result, "newer pipeline", "schema 99", "upgrade")
    assert (path / "zarr.json").read_bytes() == before


def test_a_malformed_schema_version_is_refused(small_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(small_store, path)
    _set_schema(path, "one")
    assert_one_line_error(run_cli("info", "--store", path), "invalid schema version", "--overwrite")


def test_work_in_progress_is_shown_with_who_and_since(trained_store, tmp_path):
    from pipeline import leases
    from pipeline.store import zarr_store

    path = tmp_path / "s.zarr"
    shutil.copytree(trained_store, path)
    digest = info_json(path)["training"][0]["config_hash"]
    held = [leases.take(zarr_store(path), scope) for scope in ("features/val/dw_norms", f"train/{digest}", "materialize")]
    try:
        info = info_json(path)
        me = held[0]._record()["by"]
        assert info["representations"]["dw_norms"]["splits"]["val"]["state"] == "being computed"
        assert info["representations"]["dw_norms"]["splits"]["val"]["being_computed"]["by"] == me
        assert info["representations"]["dw_norms"]["state"] == "mixed: train fresh, val being computed, test fresh"
        assert info["training"][0]["being_trained"]["by"] == me and info["being_materialized"]["by"] == me
        text = run_cli("info", "--store", path).output
        assert f"being materialized by {me}" in text and f"being trained by {me}" in text
    finally:
        for lease in held:
            lease.release()
    assert info_json(path)["representations"]["dw_norms"]["state"] == "fresh"


def test_a_configuration_being_trained_is_shown_with_who_and_since(trained_store, tmp_path):
    """One being trained for the first time is shown from its lease (who, since when) by its hash; a trained one
    names who trained it and when."""
    from pipeline import leases
    from pipeline.store import zarr_store

    path = tmp_path / "s.zarr"
    shutil.copytree(trained_store, path)
    lease = leases.take(zarr_store(path), "train/0123456789abcdef")  # a configuration whose attrs are not written yet
    try:
        info = info_json(path)
        [busy] = [t for t in info["training"] if t["config_hash"] == "0123456789abcdef"]
        assert busy["being_trained"]["by"] == lease._record()["by"] and busy["runs_done"] == 0
        text = run_cli("info", "--store", path).output
        assert f"training 0123456789abcdef  being trained by {busy['being_trained']['by']} since " in text
    finally:
        lease.release()
    [done] = info_json(path)["training"]
    assert done["author"] and "@" in done["author"] and done["trained_at"].endswith("Z")
    assert f"by {done['author']} at {done['trained_at']}" in run_cli("info", "--store", path).output
