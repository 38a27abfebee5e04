"""What materialize accepts: bad datasets, folders, CSVs, shapes, dtypes, split and size options.

Each test asserts the contract of docs/errors.md: one `error:` line with exit 2 and the store as it
was, or a result equal to an oracle computed with numpy from the source.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from conftest import assert_one_line_error, file_snapshot, lora_rows, materialize_to, open_store, run_cli, save_matrix_dataset

from pipeline.errors import PipelineError
from pipeline.layers import safe_key
from pipeline.store import label_path
from pipeline.materialize import MaterializeConfig, materialize
from pipeline.sources import Source

NAME = "unet.blk.attn1.to_q"
DOWN, UP = f"{NAME}.lora.down.weight", f"{NAME}.lora.up.weight"
KEY = safe_key(NAME)
PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- builders of bad inputs --------------------------------------------------------------------------


def matrix_dataset(path: Path, downs: list, ups: list, dtype: str = "float32", extra: dict | None = None,
                   extra_features: dict | None = None) -> Path:
    """A one-split save_to_disk dataset of one diffusers module, rows given as nested lists (any shape) or arrays."""
    data = {DOWN: [_listed(m) for m in downs], UP: [_listed(m) for m in ups], **(extra or {})}
    matrix = datasets.List(datasets.List(datasets.Value(dtype)))
    features = datasets.Features({DOWN: matrix, UP: matrix, **(extra_features or {})})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features)}).save_to_disk(str(path))
    return path


def _listed(matrix):
    return matrix.tolist() if isinstance(matrix, np.ndarray) else matrix


def in_memory_source(splits: dict[str, dict[str, list]], dtypes: dict[str, tuple[str, str]] | None = None) -> Source:
    """A Source of in-memory datasets (no files): split -> {column: rows}; dtypes: split -> (A dtype, B dtype)."""
    out = {}
    for name, columns in splits.items():
        a, b = (dtypes or {}).get(name, ("float32", "float32"))
        features = datasets.Features({DOWN: datasets.List(datasets.List(datasets.Value(a))),
                                      UP: datasets.List(datasets.List(datasets.Value(b)))})
        out[name] = datasets.Dataset.from_dict({k: [_listed(m) for m in v] for k, v in columns.items()}, features=features)
    return Source("memory", "save_to_disk", out, f"memory-{time.perf_counter_ns()}")


def adapters_folder(path: Path, n: int = 3, rank: int = 2, dtypes=None, labels: str | None = "y\n1\n2\n3\n") -> Path:
    """``n`` .safetensors adapters m0..m{n-1}; ``labels``: CSV text whose k-th data row is prefixed with mk's file name."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        dtype = (dtypes or [np.float32] * n)[i]
        save_file({DOWN: rng.standard_normal((rank, 6)).astype(dtype), UP: rng.standard_normal((5, rank)).astype(dtype)},
                  str(path / f"m{i}.safetensors"))
    if labels is not None:
        header, *rows = labels.splitlines()
        text = "\n".join([f"file,{header}"] + [f"m{i}.safetensors,{row}" for i, row in enumerate(rows)]) + "\n"
        (path / "labels.csv").write_text(text, encoding="utf-8")
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def arrow_file(folder: Path) -> Path:
    return next(folder.rglob("*.arrow"))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A clean 12-row save_to_disk dataset of one module; copy it before damaging it."""
    return save_matrix_dataset(tmp_path_factory.mktemp("good") / "src", lora_rows(12))


@pytest.fixture(scope="module")
def kept_store(good, tmp_path_factory) -> Path:
    """A finished store that every refused command below aims at (with --overwrite): it must stay byte-identical."""
    store = tmp_path_factory.mktemp("kept") / "kept.zarr"
    materialize_to(store, good)
    return store


def refused(kept_store: Path, *args, fragments=()) -> str:
    """Run materialize --overwrite on ``kept_store``: one error line, and not one byte of the store changed."""
    before = file_snapshot(kept_store)
    line = assert_one_line_error(run_cli("materialize", "--store", kept_store, "--overwrite", "--quiet", *args), *fragments)
    assert file_snapshot(kept_store) == before
    return line


def refused_while_copying(store: Path, src: Path, *fragments: str) -> None:
    """Values are only read while copying: one line, and the layer is left unmarked (verify and a rerun see it)."""
    assert_one_line_error(run_cli("materialize", "--store", store, "--source", src, "--quiet"), *fragments)
    root = open_store(store)
    assert not any(root[f"raw/{split}/{KEY}"].attrs.get("complete") for split in ("train", "val", "test") if f"raw/{split}/{KEY}" in root)


def api_refuses(source: Source, store: Path, **options) -> str:
    """The Python API refuses with one PipelineError line, writing nothing."""
    with pytest.raises(PipelineError) as info:
        materialize(MaterializeConfig(store=str(store), quiet=True, **options), source=source)
    assert "\n" not in str(info.value)
    assert not store.exists()
    return str(info.value)


def padded(rows: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The oracle of a ragged matrix column: each row zero-padded to ``shape``, as float32."""
    out = np.zeros((len(rows), *shape), np.float32)
    for i, m in enumerate(rows):
        m = np.asarray(m, np.float32)
        out[i, :m.shape[0], :m.shape[1]] = m
    return out


# --- 1. a row of the wrong shape is refused, even when its element count matches ---------------------


@pytest.mark.parametrize("column", ["down", "up"])
def test_wrong_shape_row_with_the_same_element_count_is_refused(tmp_path, kept_store, column):
    rows = lora_rows(12, rank=2, fan_in=4, fan_out=4)
    bad = [[1, 2, 3], [4, 5, 6, 7, 8]]  # 8 values, like every 2x4 row, but not a 2x4 matrix
    rows[DOWN if column == "down" else UP][5] = bad if column == "down" else [[1], [2, 3], [4], [5]]
    src = matrix_dataset(tmp_path / "src", rows[DOWN], rows[UP])
    refused(kept_store, "--source", src, fragments=("row 5",))


def test_wrong_shape_row_in_a_later_arrow_chunk_is_named(tmp_path):
    rows = lora_rows(6, rank=2, fan_in=4, fan_out=4)
    parts = [in_memory_source({"train": {DOWN: rows[DOWN][:3], UP: rows[UP][:3]}}).splits["train"],
             in_memory_source({"train": {DOWN: [[[1, 2, 3], [4, 5, 6, 7, 8]]] + rows[DOWN][4:], UP: rows[UP][3:]}}).splits["train"]]
    source = Source("memory", "save_to_disk", {"train": datasets.concatenate_datasets(parts)}, "two-chunks")
    assert source.splits["train"].data.column(DOWN).num_chunks == 2
    assert "row 3 " in api_refuses(source, tmp_path / "s.zarr")


# --- 2. labels of a safetensors folder: types from every value, one row per file ---------------------


def test_csv_column_type_comes_from_every_value(tmp_path):
    folder = adapters_folder(tmp_path / "a", labels="score,count,kind\n1,10,a\n2.5,11,b\n3,12,7\n")
    materialize_to(tmp_path / "s.zarr", folder)
    root = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(root["labels/train/score"][...], [1.0, 2.5, 3.0])
    assert root["labels/train/score"].dtype == np.float64
    np.testing.assert_array_equal(root["labels/train/count"][...], [10, 11, 12])
    assert root.attrs["labels"]["kind"]["classes"] == ["7", "a", "b"]  # one non-number makes the column text


def test_csv_file_listed_twice_is_refused(tmp_path, kept_store):
    folder = adapters_folder(tmp_path / "a", labels="y\n1\n2\n3\n")
    with open(folder / "labels.csv", "a") as handle:
        handle.write("m1.safetensors,9\n")
    refused(kept_store, "--source", folder, fragments=("'m1.safetensors' twice", "rows 3 and 5"))


def test_csv_empty_float_is_missing_and_empty_integer_is_refused(tmp_path, kept_store):
    folder = adapters_folder(tmp_path / "a", labels="x\n1.5\n\n2\n")
    materialize_to(tmp_path / "s.zarr", folder)
    x = open_store(tmp_path / "s.zarr")["labels/train/x"][...]
    assert x[0] == 1.5 and math.isnan(x[1]) and x[2] == 2.0
    folder = adapters_folder(tmp_path / "b", labels="count\n1\n\n2\n")
    refused(kept_store, "--source", folder, fragments=("'count'", "missing"))


def test_csv_empty_text_is_the_missing_code(tmp_path):
    folder = adapters_folder(tmp_path / "a", labels="kind\ncat\n\ndog\n")
    materialize_to(tmp_path / "s.zarr", folder)
    root = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(root["labels/train/kind"][...], [0, -1, 1])


def test_csv_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    folder = adapters_folder(tmp_path / "a", labels=None)
    (folder / "labels.csv").write_bytes("\ufeffstyle,file\nanime,m0.safetensors\nphoto,m1.safetensors\nanime,m2.safetensors\n".encode())
    materialize_to(tmp_path / "s.zarr", folder)
    root = open_store(tmp_path / "s.zarr")
    assert "style" in root.attrs["labels"]
    np.testing.assert_array_equal(root["labels/train/style"][...], [0, 1, 0])


def test_csv_in_utf16_is_refused_naming_the_encoding(tmp_path, kept_store):
    folder = adapters_folder(tmp_path / "a", labels=None)
    (folder / "labels.csv").write_text("file,y\nm0.safetensors,1\nm1.safetensors,2\nm2.safetensors,3\n", encoding="utf-16")
    refused(kept_store, "--source", folder, fragments=("UTF-16", "UTF-8"))


def test_csv_in_latin1_is_refused(tmp_path, kept_store):
    folder = adapters_folder(tmp_path / "a", labels=None)
    (folder / "labels.csv").write_bytes("file,y\nm0.safetensors,caf\xe9\nm1.safetensors,b\nm2.safetensors,c\n".encode("latin-1"))
    refused(kept_store, "--source", folder, fragments=("not UTF-8",))


def test_labels_csv_naming_a_folder_is_refused(tmp_path, kept_store):
    folder = adapters_folder(tmp_path / "a")
    refused(kept_store, "--source", folder, "--labels-csv", tmp_path, fragments=("is a folder",))


def test_labels_csv_with_a_source_that_has_no_use_for_it_is_refused(tmp_path, kept_store, good):
    folder = adapters_folder(tmp_path / "a")
    refused(kept_store, "--source", good, "--labels-csv", folder / "labels.csv", fragments=("--labels-csv", "save_to_disk"))


@pytest.mark.parametrize("labels, fragment", [
    ("y,y\n1,2\n2,3\n3,4\n", "'y' twice"),
    ("y,\n1,2\n2,3\n3,4\n", "has no name"),
    ("y\n1\n2,7\n3\n", "row 3 has 3 fields"),
])
def test_malformed_csv_is_refused(tmp_path, kept_store, labels, fragment):
    refused(kept_store, "--source", adapters_folder(tmp_path / "a", labels=labels), fragments=(fragment,))


def test_csv_label_named_file_is_refused(tmp_path, kept_store):
    folder = adapters_folder(tmp_path / "a", labels=None)
    (folder / "labels.csv").write_text("path,file\nm0.safetensors,a\nm1.safetensors,b\nm2.safetensors,c\n")
    refused(kept_store, "--source", folder, fragments=("named 'file'",))


def test_float16_adapter_beside_float32_ones_is_not_cut(tmp_path):
    folder = adapters_folder(tmp_path / "a", dtypes=[np.float16, np.float32, np.float32])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or cast warning on the way
        materialize_to(tmp_path / "s.zarr", folder)
    root = open_store(tmp_path / "s.zarr")
    from safetensors.numpy import load_file

    expected = np.stack([load_file(str(folder / f"m{i}.safetensors"))[DOWN].astype(np.float32) for i in range(3)])
    assert root[f"raw/train/{KEY}/A"].dtype == np.float32
    np.testing.assert_array_equal(root[f"raw/train/{KEY}/A"][...], expected)


def test_csv_trailing_empty_rows_are_not_rows(tmp_path):
    folder = adapters_folder(tmp_path / "a", labels="y\n1\n2\n3\n")
    with open(folder / "labels.csv", "a") as handle:
        handle.write(",\n,\n\n")
    materialize_to(tmp_path / "s.zarr", folder)
    np.testing.assert_array_equal(open_store(tmp_path / "s.zarr")["labels/train/y"][...], [1, 2, 3])


def test_float64_adapter_too_large_for_float32_is_named(tmp_path):
    folder = adapters_folder(tmp_path / "a", dtypes=[np.float64] * 3)
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "m1.safetensors"))
    tensors[UP] = np.full_like(tensors[UP], 1e39)
    save_file(tensors, str(folder / "m1.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        refused_while_copying(tmp_path / "s.zarr", folder, "out of float32 range", "source row 1")


# --- 3. the stored dtype: float16 only when every split of A and B is float16 ------------------------


def test_float32_split_beside_float16_splits_is_kept_float32(tmp_path):
    rows = {s: lora_rows(n, seed=i) for i, (s, n) in enumerate((("train", 12), ("validation", 4), ("test", 4)))}
    big = {k: [np.asarray(m) * 1e5 for m in v] for k, v in rows["validation"].items()}  # finite in float32, not in float16
    source = in_memory_source({"train": rows["train"], "validation": big, "test": rows["test"]},
                              {"train": ("float16", "float16"), "validation": ("float32", "float32"), "test": ("float16", "float16")})
    materialize(MaterializeConfig(store=str(tmp_path / "s.zarr"), quiet=True), source=source)
    root = open_store(tmp_path / "s.zarr")
    assert root[f"raw/val/{KEY}/A"].dtype == np.float32
    np.testing.assert_array_equal(root[f"raw/val/{KEY}/A"][...], np.asarray(big[DOWN], np.float32))


# --- 4. damaged files: one line naming them ------------------------------------------------------------


def _copy(good: Path, to: Path) -> Path:
    shutil.copytree(good, to)
    return to


def test_truncated_save_to_disk_arrow_file(tmp_path, kept_store, good):
    src = _copy(good, tmp_path / "src")
    truncate(arrow_file(src))
    refused(kept_store, "--source", src, fragments=("cannot read",))


def test_corrupt_state_json(tmp_path, kept_store, good):
    src = _copy(good, tmp_path / "src")
    (src / "train" / "state.json").write_text("{garbage")
    refused(kept_store, "--source", src, fragments=("state.json", "not valid JSON"))


def test_dataset_dict_naming_a_missing_split(tmp_path, kept_store, good):
    src = _copy(good, tmp_path / "src")
    (src / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    refused(kept_store, "--source", src, fragments=("'test'", "dataset_dict.json"))


@pytest.mark.parametrize("splits", [("train",), ("train", "test")])
def test_empty_split(tmp_path, kept_store, splits):
    full = datasets.Dataset.from_dict({k: [np.asarray(m, np.float32).tolist() for m in v] for k, v in lora_rows(12).items()})
    empty = full.select([])
    parts = {"train": full, "test": empty} if len(splits) == 2 else {"train": empty}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "src"))
    refused(kept_store, "--source", tmp_path / "src", fragments=("has no rows",))


@pytest.mark.parametrize("suffix", ["parquet", "arrow"])
def test_garbage_data_file(tmp_path, kept_store, suffix):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"train.{suffix}").write_bytes(b"not a data file" * 20)
    refused(kept_store, "--source", tmp_path / "src", fragments=("cannot read", f"train.{suffix}"))


@pytest.mark.parametrize("suffix", ["parquet", "arrow"])
def test_truncated_data_file(tmp_path, kept_store, good, suffix):
    (tmp_path / "src").mkdir()
    ds = datasets.load_from_disk(str(good))["train"]
    target = tmp_path / "src" / f"train.{suffix}"
    if suffix == "parquet":
        ds.to_parquet(str(target))
    else:
        shutil.copy(arrow_file(good), target)
    truncate(target, 0.6)
    refused(kept_store, "--source", tmp_path / "src", fragments=("cannot read",))


def test_parquet_files_with_different_columns(tmp_path, kept_store, good):
    (tmp_path / "src").mkdir()
    datasets.load_from_disk(str(good))["train"].to_parquet(str(tmp_path / "src" / "train-0.parquet"))
    datasets.Dataset.from_dict({"x": [1, 2]}).to_parquet(str(tmp_path / "src" / "train-1.parquet"))
    refused(kept_store, "--source", tmp_path / "src", fragments=("train-1.parquet", "different columns"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_safetensors_file(tmp_path, kept_store, damage):
    folder = adapters_folder(tmp_path / "a")
    if damage == "garbage":
        (folder / "m1.safetensors").write_bytes(b"garbage" * 30)
    else:
        truncate(folder / "m1.safetensors", 0.8)
    refused(kept_store, "--source", folder, fragments=("m1.safetensors",))


def _splits_dataset(path: Path, parts: dict[str, dict], features: dict[str, dict]) -> Path:
    datasets.DatasetDict({name: datasets.Dataset.from_dict(cols, features=datasets.Features(features[name]))
                          for name, cols in parts.items()}).save_to_disk(str(path))
    return path


def _listed_rows(n: int, seed: int) -> dict[str, list]:
    return {k: [np.asarray(m, np.float32).tolist() for m in v] for k, v in lora_rows(n, seed=seed).items()}


MATRIX = datasets.List(datasets.List(datasets.Value("float32")))


def test_weight_column_that_is_text_in_another_split(tmp_path, kept_store):
    train, test = _listed_rows(12, 1), _listed_rows(3, 2)
    test[UP] = ["not", "a", "matrix"]
    src = _splits_dataset(tmp_path / "src", {"train": train, "test": test},
                          {"train": {DOWN: MATRIX, UP: MATRIX}, "test": {DOWN: MATRIX, UP: datasets.Value("string")}})
    refused(kept_store, "--source", src, fragments=(UP, "'test'", "not a matrix"))


def test_label_of_two_types_across_splits(tmp_path, kept_store):
    train, test = {**_listed_rows(12, 1), "y": list(range(12))}, {**_listed_rows(3, 2), "y": ["a", "b", "c"]}
    src = _splits_dataset(tmp_path / "src", {"train": train, "test": test},
                          {"train": {DOWN: MATRIX, UP: MATRIX, "y": datasets.Value("int64")},
                           "test": {DOWN: MATRIX, UP: MATRIX, "y": datasets.Value("string")}})
    refused(kept_store, "--source", src, fragments=("'y'", "one type in every split"))


def test_label_integer_in_one_split_and_float_in_another_is_float(tmp_path):
    train, test = {**_listed_rows(12, 1), "y": list(range(12))}, {**_listed_rows(3, 2), "y": [0.5, 1.5, 2.5]}
    src = _splits_dataset(tmp_path / "src", {"train": train, "test": test},
                          {"train": {DOWN: MATRIX, UP: MATRIX, "y": datasets.Value("int64")},
                           "test": {DOWN: MATRIX, UP: MATRIX, "y": datasets.Value("float64")}})
    materialize_to(tmp_path / "s.zarr", src)
    root = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(root["labels/train/y"][...], np.arange(12.0))
    np.testing.assert_array_equal(root["labels/test/y"][...], [0.5, 1.5, 2.5])


def test_save_to_disk_shards_of_different_schemas(tmp_path, kept_store, good):
    src = _copy(good, tmp_path / "src")
    other = save_matrix_dataset(tmp_path / "other", {"x.lora.down.weight": [np.ones((1, 2))], "x.lora.up.weight": [np.ones((2, 1))]})
    shutil.copy(arrow_file(other), src / "train" / "data-00001-of-00002.arrow")
    state = json.loads((src / "train" / "state.json").read_text())
    state["_data_files"].append({"filename": "data-00001-of-00002.arrow"})
    (src / "train" / "state.json").write_text(json.dumps(state))
    refused(kept_store, "--source", src, fragments=("cannot read",))


def test_module_with_and_without_unet_prefix_is_refused(tmp_path, kept_store):
    rows = lora_rows(12)
    twin = lora_rows(12, name="blk.attn1.to_q")
    src = save_matrix_dataset(tmp_path / "src", {**rows, **twin})
    refused(kept_store, "--source", src, fragments=(DOWN, "blk.attn1.to_q.lora.down.weight", "unet."))


def test_synth_with_no_modules(tmp_path):
    assert_one_line_error(run_cli("synth", "--out", tmp_path / "d", "--n", 3, "--modules", "", "--quiet"), "--modules")
    assert not (tmp_path / "d").exists()


# --- 5. options: checked once, in MaterializeConfig -----------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("--test-size", "0"), ("--test-size", "1"), ("--test-size", "1.5"), ("--test-size", "nan"),
    ("--val-test-size", "0"), ("--val-test-size", "1"), ("--split-seed", "-1"),
    ("--chunk-mb", "nan"), ("--chunk-mb", "inf"), ("--chunk-mb", "0"), ("--chunk-mb", "-1"),
    ("--memory", "0"), ("--memory", "lots"),
])
def test_bad_option_is_refused(kept_store, good, option, value):
    refused(kept_store, "--source", good, option, value, fragments=(option,))


@pytest.mark.parametrize("field, value", [("test_size", 0.0), ("val_test_size", 1.0), ("split_seed", -1),
                                          ("chunk_mb", float("nan")), ("memory", 0), ("test_size", float("nan"))])
def test_python_api_refuses_the_same_options(field, value):
    with pytest.raises(PipelineError, match=field.replace("_", "-")):
        MaterializeConfig(**{field: value})


@pytest.mark.parametrize("test_size, val_test_size", [(0.05, 0.67), (0.3, 0.99), (0.99, 0.5)])
def test_sizes_that_leave_a_split_empty(kept_store, good, tmp_path, test_size, val_test_size):
    src = save_matrix_dataset(tmp_path / "src", lora_rows(20))
    refused(kept_store, "--source", src, "--test-size", test_size, "--val-test-size", val_test_size,
            fragments=("--test-size", "leave"))


def test_ten_rows_still_use_every_row_in_every_split(tmp_path):
    src = save_matrix_dataset(tmp_path / "src", lora_rows(10))
    materialize_to(tmp_path / "s.zarr", src, test_size=0.05)
    root = open_store(tmp_path / "s.zarr")
    assert {k: v["n"] for k, v in root.attrs["splits"].items()} == {"train": 10, "val": 10, "test": 10}


# --- 6. messages that say what is wrong ------------------------------------------------------------------


def test_rank_zero_in_row_zero_is_named_as_such(tmp_path, kept_store):
    rows = lora_rows(12)
    rows[DOWN][0], rows[UP][0] = np.zeros((0, 6)), np.zeros((5, 0))
    src = matrix_dataset(tmp_path / "src", rows[DOWN], rows[UP])
    refused(kept_store, "--source", src, fragments=("row 0 has rank 0",))


def test_up_matrix_of_another_height_in_row_zero_is_row_zero(tmp_path, kept_store):
    rows = lora_rows(12)
    rows[UP][0] = np.ones((4, 2))
    src = matrix_dataset(tmp_path / "src", rows[DOWN], rows[UP])
    refused(kept_store, "--source", src, fragments=("row 0 has 4 rows where the others have 5",))


def test_up_down_rank_mismatch_names_the_ranks(tmp_path, kept_store):
    rows = lora_rows(12, rank=2)
    rows[UP][7] = np.ones((5, 3))
    src = matrix_dataset(tmp_path / "src", rows[DOWN], rows[UP])
    refused(kept_store, "--source", src, fragments=("row 7 has rank 3", "down matrix has rank 2"))


def test_null_value_is_called_missing(tmp_path, kept_store):
    rows = lora_rows(12)
    downs = [np.asarray(m).tolist() for m in rows[DOWN]]
    downs[4][1][2] = None
    src = matrix_dataset(tmp_path / "src", downs, rows[UP])
    line = refused(kept_store, "--source", src, fragments=("missing (null)", "row 4"))
    assert "NaN" not in line.split(";")[0]


def test_value_out_of_float32_range_is_called_so_without_a_warning(tmp_path):
    rows = lora_rows(12)
    rows[UP][3] = np.full((5, 2), 1e39)
    src = matrix_dataset(tmp_path / "src", rows[DOWN], rows[UP], dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        refused_while_copying(tmp_path / "s.zarr", src, "out of float32 range", "source row 3")


def test_real_nan_is_still_called_nan(tmp_path):
    rows = lora_rows(12)
    rows[DOWN][2] = np.full((2, 6), np.nan)
    src = matrix_dataset(tmp_path / "src", rows[DOWN], rows[UP])
    refused_while_copying(tmp_path / "s.zarr", src, "NaN or Inf", "source row 2")


def test_allow_nonfinite_stores_a_null_as_nan(tmp_path):
    rows = lora_rows(12)
    downs = [np.asarray(m).tolist() for m in rows[DOWN]]
    downs[4][1][2] = None
    src = matrix_dataset(tmp_path / "src", downs, rows[UP])
    materialize_to(tmp_path / "s.zarr", src, allow_nonfinite=True)
    root = open_store(tmp_path / "s.zarr")
    rows_of = {}
    for split in ("train", "val", "test"):
        for i, r in enumerate(root[f"index/{split}/row"][...]):
            rows_of[int(r)] = root[f"raw/{split}/{KEY}/A"][i]
    assert np.isnan(rows_of[4][1, 2]) and np.isfinite(np.delete(rows_of[4].ravel(), 8)).all()


@pytest.fixture
def datasets_bars_on(monkeypatch):
    """The datasets library's progress bars as a user has them (the test session turns them off)."""
    hf_tqdm = sys.modules["datasets.utils.tqdm"]  # the module: its name is shadowed by its tqdm class
    monkeypatch.setattr(hf_tqdm, "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    was_off = datasets.are_progress_bars_disabled()
    datasets.enable_progress_bars()
    yield
    if was_off:
        datasets.disable_progress_bars()


@pytest.mark.parametrize("kind", ["safetensors", "parquet"])
def test_quiet_hides_the_datasets_progress_bars(tmp_path, datasets_bars_on, good, kind):
    if kind == "safetensors":
        src = adapters_folder(tmp_path / "a")
    else:
        src = tmp_path / "p"
        src.mkdir()
        datasets.load_from_disk(str(good))["train"].to_parquet(str(src / "train.parquet"))
    result = run_cli("materialize", "--source", src, "--store", tmp_path / "s.zarr", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert not datasets.are_progress_bars_disabled()  # put back as it was


def test_unreachable_hub_fails_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.perf_counter()
    line = assert_one_line_error(run_cli("materialize", "--source", "owner/name", "--store", tmp_path / "s.zarr", "--quiet"),
                                 "'owner/name'", "HF_HUB_OFFLINE")
    assert time.perf_counter() - started < 5 and "Retry" not in line
    assert not (tmp_path / "s.zarr").exists()


def test_offline_hub_id_is_one_line(tmp_path):
    started = time.perf_counter()
    assert_one_line_error(run_cli("materialize", "--source", "owner/name", "--store", tmp_path / "s.zarr", "--quiet"), "'owner/name'")
    assert time.perf_counter() - started < 5


# --- property-based: the store equals a numpy oracle, or the command refuses in one line -----------------


@st.composite
def ragged_module(draw):
    """Rows of one module with ranks 1..3, and maybe one wrong-shape row with the right element count."""
    n = draw(st.integers(2, 8))
    fan_in, fan_out = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    ranks = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    downs = [rng.standard_normal((r, fan_in)).astype(np.float32) for r in ranks]
    ups = [rng.standard_normal((fan_out, r)).astype(np.float32) for r in ranks]
    bad = draw(st.none() | st.tuples(st.integers(0, n - 1), st.sampled_from(["down", "up"])))
    if bad and bad[1] == "down" and ranks[bad[0]] == 1:  # one list cannot be misshaped without changing the rank
        bad = (bad[0], "up")
    return downs, ups, bad


def _misshape(matrix: np.ndarray) -> list:
    """The same values and number of lists as ``matrix`` (2 or more), but one list one value shorter, the next longer."""
    rows = [list(map(float, r)) for r in matrix]
    rows[1].insert(0, rows[0].pop())
    return rows


@PROPERTY
@given(ragged_module())
def test_property_shapes(case):
    downs, ups, bad = case
    down_rows, up_rows = [d.tolist() for d in downs], [u.tolist() for u in ups]
    if bad:
        row, column = bad
        (down_rows if column == "down" else up_rows)[row] = _misshape((downs if column == "down" else ups)[row])
    source = in_memory_source({"train": {DOWN: down_rows, UP: up_rows}})
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "s.zarr"
        if bad:
            message = api_refuses(source, store)
            row, column = bad
            if column == "down" and len(downs) == 2:  # one row against one: either may be called the odd one
                assert "row 0 " in message or "row 1 " in message
            else:
                assert f"row {row} " in message
            return
        materialize(MaterializeConfig(store=str(store), quiet=True), source=source)
        root = open_store(store)
        rank = max(d.shape[0] for d in downs)
        np.testing.assert_array_equal(root[f"raw/train/{KEY}/A"][...], padded(downs, (rank, downs[0].shape[1])))
        np.testing.assert_array_equal(root[f"raw/train/{KEY}/B"][...], padded(ups, (ups[0].shape[0], rank)))
        if len({d.shape[0] for d in downs}) > 1:
            np.testing.assert_array_equal(root[f"raw/train/{KEY}/rank"][...], [d.shape[0] for d in downs])


FLOATS = st.sampled_from(["float16", "float32", "float64"])


@PROPERTY
@given(st.lists(st.tuples(FLOATS, FLOATS), min_size=1, max_size=3), st.integers(0, 2**16))
def test_property_dtypes_across_splits(dtypes, seed):
    names = ["train", "validation", "test"][:len(dtypes)]
    sizes = {"train": 12, "validation": 3, "test": 3} if len(names) > 1 else {"train": 12}
    rows = {name: lora_rows(sizes[name], seed=seed + i) for i, name in enumerate(names)}
    source = in_memory_source(rows, dict(zip(names, dtypes)))
    stored = np.float16 if all(d == "float16" for pair in dtypes for d in pair) else np.float32
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "s.zarr"
        materialize(MaterializeConfig(store=str(store), quiet=True), source=source)
        root = open_store(store)
        for name, (a, b) in zip(names, dtypes):
            if len(names) == 1:
                split, picked = "train", root["index/train/row"][...]
            else:
                split, picked = {"validation": "val"}.get(name, name), np.arange(sizes[name])
            for role, column, dtype in (("A", DOWN, a), ("B", UP, b)):
                array = root[f"raw/{split}/{KEY}/{role}"]
                assert array.dtype == stored
                source_values = np.asarray(rows[name][column], np.float64).astype(dtype)  # what the source holds
                np.testing.assert_array_equal(array[...], source_values[picked].astype(stored))


LABEL_VALUE = st.one_of(  # (what it is, its CSV text): the oracle's type rule reads the tags, never the text
    st.integers(-10**6, 10**6).map(lambda v: ("int", str(v))),
    st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: ("float", repr(v))),
    st.text("abcxyzé ", min_size=1, max_size=4).filter(str.strip).map(lambda v: ("text", v)),
    st.just(("empty", "")),
)
LABEL_NAME = st.text("aZé _-/.,\"'#", min_size=1, max_size=6)


def _expected_kind(tags: list[str]) -> str:
    """int if every present value is an int, float if any is a float (and none is text), else categorical."""
    if "text" in tags:
        return "categorical"
    return "float" if "float" in tags else "integer"


@PROPERTY
@given(st.lists(st.tuples(LABEL_NAME, st.lists(LABEL_VALUE, min_size=3, max_size=3)), min_size=1, max_size=2))
def test_property_csv_labels(columns):
    names = [name.strip() for name, _ in columns]  # header cells are read stripped
    tags = [[tag for tag, _ in values] for _, values in columns]
    texts = [[text for _, text in values] for _, values in columns]
    kinds = [_expected_kind(t) for t in tags]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["file", *[name for name, _ in columns]])
    for i in range(3):
        writer.writerow([f"m{i}.safetensors", *[t[i] for t in texts]])
    must_refuse = (any(not n for n in names) or len(set(names)) < len(names) or "file" in names
                   or any(kind == "integer" and "empty" in t for kind, t in zip(kinds, tags)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = adapters_folder(Path(tmp) / "a", labels=None)
        (folder / "labels.csv").write_text(out.getvalue(), encoding="utf-8")
        store = Path(tmp) / "s.zarr"
        result = run_cli("materialize", "--source", folder, "--store", store, "--quiet")
        if must_refuse:
            assert_one_line_error(result)
            assert not store.exists()
            return
        assert result.exit_code == 0, result.output
        root = open_store(store)
        for name, kind, t, values in zip(names, kinds, tags, texts):
            info = root.attrs["labels"][name]
            assert info["kind"] == kind
            stored = root[label_path(root, "train", name)][...]  # every name has its own key, row and model_id too
            if kind == "integer":
                np.testing.assert_array_equal(stored, [int(v) for v in values])
            elif kind == "float":
                np.testing.assert_array_equal(stored, [np.nan if tag == "empty" else float(v) for tag, v in zip(t, values)])
            else:
                classes = sorted({v for tag, v in zip(t, values) if tag != "empty"})
                assert info["classes"] == classes
                np.testing.assert_array_equal(stored, [-1 if tag == "empty" else classes.index(v) for tag, v in zip(t, values)])
