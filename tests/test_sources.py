"""Where a dataset can come from: save_to_disk, parquet folders, arrow globs, safetensors folders; and bad paths."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import xarray as xr
from conftest import (
    SMALL_LAYERS,
    assert_one_line_error,
    assert_same_arrays,
    lora_rows,
    materialize_to,
    open_store,
    run_cli,
)
from safetensors.numpy import save_file

from pipeline.errors import PipelineError
from pipeline.sources import open_source

DOWN = "unet.blk.attn1.to_q.lora.down.weight"
UP = "unet.blk.attn1.to_q.lora.up.weight"


# --- the same data in other file forms gives the same store -----------------------------------------


def test_save_to_disk_source(synth_dir):
    source = open_source(str(synth_dir))
    assert source.kind == "save_to_disk" and list(source.splits) == ["train"]
    assert source.splits["train"].num_rows == 40
    assert open_source(str(synth_dir)).fingerprint == source.fingerprint  # stable


def test_parquet_folder_equals_save_to_disk(tmp_path, synth_ds, small_store):
    folder = tmp_path / "parquet"
    folder.mkdir()
    synth_ds.to_parquet(str(folder / "data.parquet"))
    source = open_source(str(folder))
    assert source.kind == "files" and list(source.splits) == ["train"]
    materialize_to(tmp_path / "s.zarr", folder, layers=SMALL_LAYERS)
    assert_same_arrays(tmp_path / "s.zarr", small_store)


def test_arrow_glob_equals_save_to_disk(tmp_path, synth_dir, small_store):
    pattern = str(synth_dir / "train" / "*.arrow")
    source = open_source(pattern)
    assert source.kind == "files" and list(source.splits) == ["train"]
    materialize_to(tmp_path / "s.zarr", pattern, layers=SMALL_LAYERS)
    assert_same_arrays(tmp_path / "s.zarr", small_store)


def test_parquet_files_named_by_split(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    for name, n, seed in (("train", 12, 1), ("validation", 4, 2), ("test", 5, 3)):
        cols = {k: [np.asarray(m, np.float32).tolist() for m in v] for k, v in lora_rows(n, seed=seed).items()}
        datasets.Dataset.from_dict(cols).to_parquet(str(folder / f"{name}-00000.parquet"))
    source = open_source(str(folder))
    assert {k: v.num_rows for k, v in source.splits.items()} == {"train": 12, "validation": 4, "test": 5}
    materialize_to(tmp_path / "s.zarr", folder)
    root = open_store(tmp_path / "s.zarr")
    assert {k: v["n"] for k, v in root.attrs["splits"].items()} == {"train": 12, "val": 4, "test": 5}
    np.testing.assert_array_equal(root["raw/val/unet.blk.attn1.to_q/A"][...], np.asarray(lora_rows(4, seed=2)[DOWN], np.float32))


def test_parquet_fingerprint_follows_the_files(tmp_path, synth_ds):
    folder = tmp_path / "parquet"
    folder.mkdir()
    synth_ds.select(range(12)).to_parquet(str(folder / "data.parquet"))
    first = open_source(str(folder)).fingerprint
    assert open_source(str(folder)).fingerprint == first
    synth_ds.select(range(12, 24)).to_parquet(str(folder / "data.parquet"))
    os.utime(folder / "data.parquet", ns=(1, 1))  # a rewrite within the same mtime tick still differs
    assert open_source(str(folder)).fingerprint != first


def test_mixed_parquet_and_arrow_refused(tmp_path, synth_ds, synth_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    synth_ds.select(range(3)).to_parquet(str(folder / "a.parquet"))
    shutil.copy(next((synth_dir / "train").glob("*.arrow")), folder / "b.arrow")
    with pytest.raises(PipelineError, match="mixes parquet and arrow"):
        open_source(str(folder))


# --- paths that hold nothing ------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["./no/such/dataset", "/no/such/dataset", "~/no-such-dataset-here", "no_such_dir/*.parquet"])
def test_local_looking_path_that_does_not_exist(tmp_path, uri):
    store = tmp_path / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", uri, "--store", store, "--quiet"), repr(uri), "holds no dataset")
    assert not store.exists()


def test_bare_name_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", "nosuchdataset", "--store", store, "--quiet"), "'nosuchdataset' does not exist")
    assert not store.exists()


def test_empty_folder_is_not_a_source(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("materialize", "--source", tmp_path / "empty", "--store", tmp_path / "s.zarr", "--quiet"),
                          "holds no dataset")


# --- a folder of .safetensors adapters --------------------------------------------------------------


def _adapters(folder: Path, n: int = 3, rank: int = 2, dtype=np.float32) -> dict[str, dict[str, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n):
        tensors = {DOWN: rng.standard_normal((rank, 6)).astype(dtype), UP: rng.standard_normal((5, rank)).astype(dtype)}
        save_file(tensors, str(folder / f"m{i}.safetensors"))
        out[f"m{i}.safetensors"] = tensors
    return out


def test_safetensors_folder_with_labels(tmp_path):
    folder = tmp_path / "adapters"
    adapters = _adapters(folder, n=3)
    (folder / "labels.csv").write_text("file,style,strength\nm0.safetensors,anime,1.5\nm1.safetensors,photo,2\nm2.safetensors,anime,0.5\n")
    source = open_source(str(folder))
    assert source.kind == "safetensors"
    materialize_to(tmp_path / "s.zarr", folder)
    root = open_store(tmp_path / "s.zarr")
    assert root.attrs["id_column"] == "file"
    np.testing.assert_array_equal(root["index/train/model_id"][...], ["m0.safetensors", "m1.safetensors", "m2.safetensors"])
    np.testing.assert_array_equal(root["labels/train/style"][...], [0, 1, 0])
    np.testing.assert_array_equal(root["labels/train/strength"][...], [1.5, 2.0, 0.5])
    np.testing.assert_array_equal(root["raw/train/unet.blk.attn1.to_q/A"][...], np.stack([adapters[f"m{i}.safetensors"][DOWN] for i in range(3)]))
    labels = xr.open_zarr(str(tmp_path / "s.zarr"), group="index/train", consolidated=False)
    assert [str(v) for v in labels["model_id"].values] == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]


def test_labels_csv_option(tmp_path):
    folder = tmp_path / "adapters"
    _adapters(folder, n=2)
    csv = tmp_path / "elsewhere.csv"
    csv.write_text("filename,y\nm0.safetensors,1\nm1.safetensors,2\n")
    result = run_cli("materialize", "--source", folder, "--labels-csv", csv, "--store", tmp_path / "s.zarr", "--quiet")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(open_store(tmp_path / "s.zarr")["labels/train/y"][...], [1, 2])


@pytest.mark.parametrize("case, fragment", [
    ("no-csv", "no labels CSV"),
    ("file-not-in-csv", "have no row in labels.csv"),
    ("csv-names-unknown-file", "not in"),
    ("other-tensor-names", "different tensor names"),
])
def test_safetensors_folder_errors(tmp_path, case, fragment):
    folder = tmp_path / "adapters"
    _adapters(folder, n=2)
    rows = ["file,y", "m0.safetensors,1", "m1.safetensors,2"]
    if case == "file-not-in-csv":
        rows.pop()
    if case == "csv-names-unknown-file":
        rows.append("m9.safetensors,3")
    if case == "other-tensor-names":
        save_file({"x.lora.down.weight": np.ones((2, 6), np.float32), "x.lora.up.weight": np.ones((5, 2), np.float32)},
                  str(folder / "m1.safetensors"))
    if case != "no-csv":
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", folder, "--store", store, "--quiet"), fragment)
    assert not store.exists()


def test_quiet_run_on_source_with_ids_prints_no_warning(tmp_path):
    folder = tmp_path / "adapters"
    _adapters(folder, n=2)
    (folder / "labels.csv").write_text("file,y\nm0.safetensors,1\nm1.safetensors,2\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        materialize_to(tmp_path / "s.zarr", folder)
    assert [str(w.message)[:80] for w in caught if "zarr" in w.filename] == []
