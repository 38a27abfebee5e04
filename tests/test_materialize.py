"""Stage 1 end to end: CLI, bit-exact round trip, splits, labels, read count, rerun/resume, bad input."""

from __future__ import annotations

import errno
import gc
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import xarray as xr
import zarr
from conftest import (
    SMALL_LAYERS,
    assert_one_line_error,
    assert_same_arrays,
    file_snapshot,
    lora_rows,
    materialize_to,
    open_store,
    raw_groups,
    run_cli,
    save_matrix_dataset,
    source_matrix,
    store_arrays,
)

from pipeline import arrowio
from pipeline.materialize import MaterializeConfig
from pipeline.sources import Source
from pipeline.synthetic import write_synthetic

# `pipeline.materialize` is the function (the package's public surface); this is the module.
MATERIALIZE = importlib.import_module("pipeline.materialize")
materialize = MATERIALIZE.materialize

DOWN = "unet.blk.attn1.to_q.lora.down.weight"
UP = "unet.blk.attn1.to_q.lora.up.weight"


def _datasets_split(n: int, test_size=0.3, val_test_size=0.67, seed=42) -> dict[str, np.ndarray]:
    """The split the datasets library makes, as row indices (an index column rides along)."""
    table = datasets.Dataset.from_dict({"i": np.arange(n)})
    first = table.train_test_split(test_size=test_size, seed=seed)
    second = first["test"].train_test_split(test_size=val_test_size, seed=seed)
    return {"train": np.asarray(first["train"]["i"]), "val": np.asarray(second["train"]["i"]), "test": np.asarray(second["test"]["i"])}


# --- the CLI ----------------------------------------------------------------------------------------


def test_cli_synth_materialize_info(tmp_path):
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    result = run_cli("synth", "--out", data, "--n", 20, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert (data / "dataset_dict.json").exists()

    result = run_cli("materialize", "--source", data, "--store", store, "--layers", SMALL_LAYERS, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output == ""

    result = run_cli("info", "--store", store)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    split = _datasets_split(20)
    assert lines[0] == f"store    {store}  (format weightspace-pipeline-store v2)"
    assert lines[1].startswith(f"source   {data}  [save_to_disk, fingerprint ")
    assert lines[2] == f"splits   train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])}"
    assert lines[3].startswith("layers   8 tensors in 4 modules, rank 1, ")
    assert lines[4] == "complete 12/12 (split, module) groups"
    classes = sorted(set(datasets.load_from_disk(str(data))["train"]["category_label"]))
    assert f"label    category_label (categorical) {len(classes)} classes: {', '.join(classes)}" in lines
    assert "label    num_images (integer)" in lines


def test_cli_materialize_reports_summary(tmp_path, synth_dir):
    store = tmp_path / "s.zarr"
    first = run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", SMALL_LAYERS)
    assert first.exit_code == 0, first.output
    assert f"{store}: 12 (split, module) groups written, 0 already complete" in first.output
    again = run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", SMALL_LAYERS)
    assert again.exit_code == 0, again.output
    assert f"{store}: 0 (split, module) groups written, 12 already complete; 0 MB" in again.output


def test_cli_store_defaults_to_env(tmp_path, synth_dir, monkeypatch):
    store = tmp_path / "env.zarr"
    monkeypatch.setenv("PIPELINE_STORE", str(store))
    result = run_cli("materialize", "--source", synth_dir, "--layers", SMALL_LAYERS, "--quiet")
    assert result.exit_code == 0, result.output
    assert raw_groups(store) and all(raw_groups(store).values())


# --- bit-exact round trip ---------------------------------------------------------------------------


def test_round_trip_every_split_and_module(synth_store, synth_ds):
    root = open_store(synth_store)
    attrs = root.attrs.asdict()
    modules = attrs["modules"]
    assert len(modules) == 64
    split_rows = {split: root[f"index/{split}/row"][...] for split in ("train", "val", "test")}
    for m in modules:
        # Each source column once, the plain datasets way, then the split rows of it.
        down, up = source_matrix(synth_ds, m["down"], range(40)), source_matrix(synth_ds, m["up"], range(40))
        for split, rows in split_rows.items():
            A, B = root[f"raw/{split}/{m['key']}/A"], root[f"raw/{split}/{m['key']}/B"]
            assert A.dtype == np.float32 and B.dtype == np.float32
            assert A.shape == (len(rows), 1, m["in"]) and B.shape == (len(rows), m["out"], 1)
            np.testing.assert_array_equal(A[...], down[rows])
            np.testing.assert_array_equal(B[...], up[rows])
            assert "rank" not in root[f"raw/{split}/{m['key']}"]  # ranks do not vary


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_round_trip_other_float_dtypes(tmp_path, dtype):
    cols = lora_rows(14, rank=3, seed=1)
    if dtype == "float16":  # values representable in float16, so the oracle is exact
        cols = {k: [np.asarray(m, np.float16) for m in v] for k, v in cols.items()}
    src = save_matrix_dataset(tmp_path / "src", cols, dtype=dtype)
    ds = datasets.load_from_disk(str(src))["train"]
    assert ds.features[DOWN].feature.feature.dtype == dtype
    materialize_to(tmp_path / "s.zarr", src)
    root = open_store(tmp_path / "s.zarr")
    (m,) = root.attrs["modules"]
    stored = np.float16 if dtype == "float16" else np.float32  # 2-byte weights stay 2 bytes
    assert m["dtype"] == np.dtype(stored).name
    for split in ("train", "val", "test"):
        rows = root[f"index/{split}/row"][...]
        for role, column in (("A", DOWN), ("B", UP)):
            array = root[f"raw/{split}/{m['key']}/{role}"]
            assert array.dtype == stored
            np.testing.assert_array_equal(np.asarray(array[...], np.float32), source_matrix(ds, column, rows))


def test_ragged_ranks_zero_padded_with_rank_array(tmp_path):
    rng = np.random.default_rng(3)
    ranks = [1, 2, 3, 2, 1, 3, 3, 1, 2, 2, 1, 3]
    downs = [rng.standard_normal((r, 6)).astype(np.float32) for r in ranks]
    ups = [rng.standard_normal((5, r)).astype(np.float32) for r in ranks]
    src = save_matrix_dataset(tmp_path / "src", {DOWN: downs, UP: ups})
    materialize_to(tmp_path / "s.zarr", src)
    root = open_store(tmp_path / "s.zarr")
    (m,) = root.attrs["modules"]
    assert m["rank"] == 3 and m["rank_varies"] is True
    for split in ("train", "val", "test"):
        rows = root[f"index/{split}/row"][...]
        group = root[f"raw/{split}/{m['key']}"]
        A, B, rank = group["A"][...], group["B"][...], group["rank"][...]
        assert A.shape == (len(rows), 3, 6) and B.shape == (len(rows), 5, 3)
        np.testing.assert_array_equal(rank, np.asarray(ranks)[rows])
        for i, row in enumerate(rows):
            r = ranks[row]
            np.testing.assert_array_equal(A[i, :r], downs[row])
            np.testing.assert_array_equal(B[i, :, :r], ups[row])
            assert not A[i, r:].any() and not B[i, :, r:].any()  # zero padding keeps B A unchanged
            np.testing.assert_allclose(B[i] @ A[i], ups[row] @ downs[row], rtol=1e-6, atol=1e-7)


def test_kohya_alpha_constant_and_varying(tmp_path):
    x, y = "lora_unet_blk_attn1_to_q", "lora_unet_blk_attn1_to_v"
    rng = np.random.default_rng(4)
    cols = {f"{m}.lora_{r}.weight": [rng.standard_normal((2, 6) if r == "down" else (5, 2)) for _ in range(12)]
            for m in (x, y) for r in ("down", "up")}
    alpha_y = [1.0, 2.0, 4.0] * 4
    src = save_matrix_dataset(tmp_path / "src", cols, extra={f"{x}.alpha": [8.0] * 12, f"{y}.alpha": alpha_y},
                              extra_features={f"{x}.alpha": datasets.Value("float32"), f"{y}.alpha": datasets.Value("float32")})
    materialize_to(tmp_path / "s.zarr", src)
    root = open_store(tmp_path / "s.zarr")
    modules = {m["name"]: m for m in root.attrs["modules"]}
    assert (modules[x]["alpha"], modules[x]["alpha_varies"], modules[x]["scheme"]) == (8.0, False, "kohya")
    assert (modules[y]["alpha"], modules[y]["alpha_varies"]) == (None, True)
    assert set(root.attrs["labels"]) == set()  # alpha columns are not labels
    for split in ("train", "val", "test"):
        rows = root[f"index/{split}/row"][...]
        assert "alpha" not in root[f"raw/{split}/{modules[x]['key']}"]
        np.testing.assert_array_equal(root[f"raw/{split}/{modules[y]['key']}/alpha"][...], np.asarray(alpha_y, np.float32)[rows])


# --- splits -----------------------------------------------------------------------------------------


def test_split_equals_datasets_train_test_split(synth_store, synth_dir, tmp_path):
    # On the real dataset (a copy, since train_test_split may write index caches beside it).
    copy = shutil.copytree(synth_dir, tmp_path / "copy")
    ds = datasets.load_from_disk(str(copy))["train"]
    first = ds.train_test_split(test_size=0.3, seed=42)
    second = first["test"].train_test_split(test_size=0.67, seed=42)
    expected = {"train": first["train"], "val": second["train"], "test": second["test"]}
    root = open_store(synth_store)
    rows = _datasets_split(ds.num_rows)
    column = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora.up.weight"
    key = next(m["key"] for m in root.attrs["modules"] if m["up"] == column)
    classes = np.asarray(root["labels/train/category_label"].attrs["classes"])
    for split, part in expected.items():
        np.testing.assert_array_equal(root[f"index/{split}/row"][...], rows[split])
        np.testing.assert_array_equal(root[f"raw/{split}/{key}/B"][...], np.asarray(part[column], np.float32))
        np.testing.assert_array_equal(classes[root[f"labels/{split}/category_label"][...]], np.asarray(part["category_label"]))
    assert sorted(np.concatenate(list(rows.values()))) == list(range(ds.num_rows))
    assert root.attrs["splits"] == {s: {"n": len(r), "source_split": "train"} for s, r in rows.items()}


@pytest.mark.parametrize("n", [3, 10])
def test_small_dataset_uses_all_rows_everywhere(tmp_path, n):
    src = save_matrix_dataset(tmp_path / "src", lora_rows(n))
    materialize_to(tmp_path / "s.zarr", src)
    root = open_store(tmp_path / "s.zarr")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(root[f"index/{split}/row"][...], np.arange(n))
        assert root[f"raw/{split}/unet.blk.attn1.to_q/A"].shape[0] == n


def test_eleven_rows_are_split(tmp_path):
    src = save_matrix_dataset(tmp_path / "src", lora_rows(11))
    materialize_to(tmp_path / "s.zarr", src)
    root = open_store(tmp_path / "s.zarr")
    for split, rows in _datasets_split(11).items():
        np.testing.assert_array_equal(root[f"index/{split}/row"][...], rows)


def test_custom_split_options(tmp_path, synth_dir):
    materialize_to(tmp_path / "s.zarr", synth_dir, layers=SMALL_LAYERS, test_size=0.5, val_test_size=0.5, split_seed=7)
    root = open_store(tmp_path / "s.zarr")
    for split, rows in _datasets_split(40, 0.5, 0.5, 7).items():
        np.testing.assert_array_equal(root[f"index/{split}/row"][...], rows)


def test_source_splits_are_kept(tmp_path):
    parts = {"train": lora_rows(13, seed=1), "validation": lora_rows(4, seed=2), "test": lora_rows(5, seed=3)}
    dd = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({k: [np.asarray(m).tolist() for m in v] for k, v in cols.items()} | {"y": list(range(len(cols[DOWN])))})
        for name, cols in parts.items()
    })
    dd.save_to_disk(str(tmp_path / "src"))
    materialize_to(tmp_path / "s.zarr", tmp_path / "src")
    root = open_store(tmp_path / "s.zarr")
    assert root.attrs["splits"] == {"train": {"n": 13, "source_split": "train"}, "val": {"n": 4, "source_split": "validation"},
                                    "test": {"n": 5, "source_split": "test"}}
    for stored, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        n = len(parts[name][DOWN])
        np.testing.assert_array_equal(root[f"index/{stored}/row"][...], np.arange(n))
        np.testing.assert_array_equal(root[f"labels/{stored}/y"][...], np.arange(n))
        np.testing.assert_array_equal(root[f"raw/{stored}/unet.blk.attn1.to_q/A"][...], np.asarray(parts[name][DOWN], np.float32))
        np.testing.assert_array_equal(root[f"raw/{stored}/unet.blk.attn1.to_q/B"][...], np.asarray(parts[name][UP], np.float32))


# --- labels -----------------------------------------------------------------------------------------


def test_categorical_labels_are_label_encoder_codes(synth_store, synth_ds):
    root = open_store(synth_store)
    for name in ("category_label", "category_name"):
        source = np.asarray(synth_ds[name])
        classes = np.unique(source)  # what sklearn's LabelEncoder().fit(source).classes_ is
        assert root.attrs["labels"][name] == {"kind": "categorical", "column": name, "classes": classes.tolist(), "key": name}
        for split in ("train", "val", "test"):
            array = root[f"labels/{split}/{name}"]
            rows = root[f"index/{split}/row"][...]
            codes = array[...]
            assert codes.dtype.kind == "i"
            assert array.attrs["classes"] == classes.tolist()
            np.testing.assert_array_equal(codes, np.searchsorted(classes, source[rows]))  # LabelEncoder.transform
            np.testing.assert_array_equal(classes[codes], source[rows])
    assert root.attrs["labels"]["category_label"]["classes"] == sorted(
        ["airplane", "bird", "car", "cat", "dog", "fish", "fruit", "ship", "snake", "vegetable"])
    # Upper case sorts first, as np.unique (and LabelEncoder) do.
    assert root.attrs["labels"]["category_name"]["classes"][0][0].isupper()


def test_numeric_labels_and_missing_categories(tmp_path):
    cols = lora_rows(12)
    extra = {"score": [0.5 * i for i in range(12)], "count": list(range(100, 112)),
             "kind": ["b", None, "a", "c", "a", "b", None, "c", "a", "a", "b", "c"]}
    feats = {"score": datasets.Value("float64"), "count": datasets.Value("int64"), "kind": datasets.Value("string")}
    src = save_matrix_dataset(tmp_path / "src", cols, extra=extra, extra_features=feats)
    materialize_to(tmp_path / "s.zarr", src, labels=("kind", "score"))
    root = open_store(tmp_path / "s.zarr")
    assert root.attrs["labels"]["kind"]["classes"] == ["a", "b", "c"]
    assert root.attrs["labels"]["score"]["kind"] == "float" and root.attrs["labels"]["count"]["kind"] == "integer"
    for split in ("train", "val", "test"):
        rows = root[f"index/{split}/row"][...]
        np.testing.assert_array_equal(root[f"labels/{split}/score"][...], np.asarray(extra["score"])[rows])
        np.testing.assert_array_equal(root[f"labels/{split}/count"][...], np.asarray(extra["count"])[rows])
        want = [{"a": 0, "b": 1, "c": 2, None: -1}[extra["kind"][r]] for r in rows]
        np.testing.assert_array_equal(root[f"labels/{split}/kind"][...], want)


# --- each weight column of each split read once -----------------------------------------------------


@pytest.mark.parametrize("budget", [None, "small"])
def test_each_column_read_once_per_split(tmp_path, synth_dir, synth_ds, monkeypatch, budget):
    tally: dict[str, list[np.ndarray]] = {}
    real_gather = MATERIALIZE.arrowio.gather

    def counting_gather(column, spec, ranks, rows, dtype):
        tally.setdefault(spec.name, []).append(np.array(rows))
        return real_gather(column, spec, ranks, rows, dtype)

    monkeypatch.setattr(MATERIALIZE.arrowio, "gather", counting_gather)
    options = dict(memory=48 * 1024, chunk_mb=0.01) if budget == "small" else {}
    materialize_to(tmp_path / "s.zarr", synth_dir, layers=SMALL_LAYERS, **options)
    root = open_store(tmp_path / "s.zarr")
    split_rows = [root[f"index/{s}/row"][...] for s in ("train", "val", "test")]
    lora_columns = {c for m in root.attrs["modules"] for c in (m["down"], m["up"])}
    assert len(lora_columns) == 8 and set(tally) == lora_columns
    for column, calls in tally.items():
        rows = np.concatenate(calls)
        assert len(rows) == sum(len(r) for r in split_rows) == synth_ds.num_rows, column
        np.testing.assert_array_equal(np.sort(rows), np.sort(np.concatenate(split_rows)))
        if budget == "small":  # several batches were needed, and each still read its rows once
            assert len(calls) > 3, (column, len(calls))
    for split, rows in zip(("train", "val", "test"), split_rows):
        for m in root.attrs["modules"]:
            np.testing.assert_array_equal(root[f"raw/{split}/{m['key']}/B"][...], source_matrix(synth_ds, m["up"], rows))


def test_no_batch_outlives_its_write_without_the_cyclic_gc(tmp_path, synth_dir, monkeypatch):
    """Reference counting frees every batch: nothing leaves one in a reference cycle.

    A cycle holding a frame of the copy loop keeps that frame's last batch until Python's cyclic
    GC runs, which may be many modules later: at 50k adapters such batches took the peak memory well
    beyond --memory (docs/performance.md).
    """
    batches = []
    real_gather = MATERIALIZE.arrowio.gather

    def tracked_gather(*args):
        values = real_gather(*args)
        batches.append(weakref.ref(values))
        return values

    monkeypatch.setattr(MATERIALIZE.arrowio, "gather", tracked_gather)
    gc.collect()
    gc.disable()
    try:
        materialize_to(tmp_path / "s.zarr", synth_dir, layers=SMALL_LAYERS, memory=48 * 1024, chunk_mb=0.01)
        alive = sum(ref() is not None for ref in batches)
    finally:
        gc.enable()
    assert len(batches) > 8 and alive == 0, f"{alive} of {len(batches)} batches still alive"


# --- rerun and resume -------------------------------------------------------------------------------


def test_rerun_on_complete_store_writes_nothing(tmp_path, synth_store, synth_dir):
    store = shutil.copytree(synth_store, tmp_path / "s.zarr")
    before = file_snapshot(store)
    started = time.perf_counter()
    summary = materialize_to(store, synth_dir)
    elapsed = time.perf_counter() - started
    assert summary.modules_written == 0 and summary.bytes_written == 0
    assert summary.modules_skipped == 3 * 64
    assert elapsed < 2.0, elapsed
    assert file_snapshot(store) == before


def test_incomplete_group_is_rewritten_and_nothing_else(tmp_path, small_store, synth_dir):
    store = shutil.copytree(small_store, tmp_path / "s.zarr")
    root = zarr.open_group(str(store), mode="r+")
    key = root.attrs["modules"][1]["key"]
    group = root[f"raw/val/{key}"]
    group.attrs.update({"complete": False})
    group["A"][...] = 0  # a half-finished write
    before = file_snapshot(store)
    summary = materialize_to(store, synth_dir, layers=SMALL_LAYERS)
    assert (summary.modules_written, summary.modules_skipped) == (1, 11)
    after = file_snapshot(store)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed and all(p.startswith(f"raw/val/{key}/") for p in changed), changed
    assert all(raw_groups(store).values())
    assert_same_arrays(store, small_store)


def _complete_groups_on_disk(store: Path) -> int:
    done = 0
    for meta in store.glob("raw/*/*/zarr.json"):
        try:
            done += bool(json.loads(meta.read_text()).get("attributes", {}).get("complete"))
        except (OSError, ValueError):  # being replaced right now
            pass
    return done


def test_crash_and_resume_equals_clean_run(tmp_path):
    src = write_synthetic(tmp_path / "src", n=200, rank=1, projections=("q",), seed=5)  # 32 modules
    store = tmp_path / "crashed.zarr"
    command = [sys.executable, "-m", "cli", "materialize", "--source", str(src), "--store", str(store), "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _complete_groups_on_disk(store) == 0:
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    groups = raw_groups(store)
    assert 0 < sum(groups.values()) < 3 * 32, "the kill must land mid-way"

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert all(raw_groups(store).values()) and len(raw_groups(store)) == 3 * 32
    clean = tmp_path / "clean.zarr"
    materialize_to(clean, src)
    assert_same_arrays(store, clean)
    resumed_attrs, clean_attrs = open_store(store).attrs.asdict(), open_store(clean).attrs.asdict()
    for attrs in (resumed_attrs, clean_attrs):
        attrs.pop("created")
    assert resumed_attrs == clean_attrs


# --- bad input: exit code 2, one line, nothing half-written ------------------------------------------


def test_missing_source_path(tmp_path):
    store = tmp_path / "s.zarr"
    line = assert_one_line_error(run_cli("materialize", "--source", tmp_path / "nope", "--store", store, "--quiet"), "nope")
    assert "holds no dataset" in line
    assert not store.exists()


def test_dataset_without_lora_columns(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": ["a", "b"]})}).save_to_disk(str(tmp_path / "src"))
    store = tmp_path / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", tmp_path / "src", "--store", store, "--quiet"), "no LoRA weight columns")
    assert not store.exists()


@pytest.mark.parametrize("missing", ["up", "down"])
def test_down_without_up(tmp_path, missing):
    cols = lora_rows(4)
    cols.pop(UP if missing == "up" else DOWN)
    src = save_matrix_dataset(tmp_path / "src", cols)
    store = tmp_path / "s.zarr"
    kept = DOWN if missing == "up" else UP
    assert_one_line_error(run_cli("materialize", "--source", src, "--store", store, "--quiet"), kept, f"without its {missing} matrix")
    assert not store.exists()


@pytest.mark.parametrize("column, matrix", [
    (UP, np.ones((4, 2))),  # out 4 where the others have 5
    (DOWN, np.ones((2, 7))),  # in 7 where the others have 6
    (UP, np.ones((5, 3))),  # rank 3 where its down has rank 2
], ids=["up rows differ", "down cols differ", "up rank differs from down rank"])
def test_a_row_of_another_shape_is_named(tmp_path, column, matrix):
    cols = lora_rows(12)
    cols[column][7] = matrix
    src = save_matrix_dataset(tmp_path / "src", cols)
    store = tmp_path / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", src, "--store", store, "--quiet"), column, "row 7")
    assert not store.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weights(tmp_path, bad):
    cols = lora_rows(12) | lora_rows(12, seed=9, name="unet.blk.attn2.to_q")
    bad_column = "unet.blk.attn2.to_q.lora.up.weight"
    cols[bad_column][5][1, 1] = bad
    src = save_matrix_dataset(tmp_path / "src", cols)
    ds = datasets.load_from_disk(str(src))["train"]
    store = tmp_path / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", src, "--store", store, "--quiet"), repr(bad_column), "source row 5",
                          "--allow-nonfinite")
    root = open_store(store)
    bad_split = next(s for s in ("train", "val", "test") if 5 in root[f"index/{s}/row"][...])
    groups = raw_groups(store)
    assert groups.get(f"raw/{bad_split}/unet.blk.attn2.to_q") is not True
    for path, complete in groups.items():  # whatever was finished is whole and right
        if complete:
            split, key = path.split("/")[1:]
            rows = root[f"index/{split}/row"][...]
            np.testing.assert_array_equal(root[f"{path}/A"][...], source_matrix(ds, f"{key}.lora.down.weight", rows))

    result = run_cli("materialize", "--source", src, "--store", store, "--quiet", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert all(raw_groups(store).values()) and len(raw_groups(store)) == 6
    root = open_store(store)
    for split in ("train", "val", "test"):
        rows = root[f"index/{split}/row"][...]
        np.testing.assert_array_equal(root[f"raw/{split}/unet.blk.attn2.to_q/B"][...], source_matrix(ds, bad_column, rows))


def test_missing_label_column(tmp_path, synth_dir):
    store = tmp_path / "s.zarr"
    result = run_cli("materialize", "--source", synth_dir, "--store", store, "--label", "category_label", "--label", "style", "--quiet")
    assert_one_line_error(result, "'style'", "category_label")
    assert not store.exists()


@pytest.mark.parametrize("what", ["folder", "file"])
def test_store_path_that_is_not_ours_is_left_alone(tmp_path, synth_dir, what):
    store = tmp_path / "mine"
    if what == "folder":
        store.mkdir()
        (store / "notes.txt").write_text("precious")
    else:
        store.write_text("precious")
    before = file_snapshot(tmp_path)
    assert_one_line_error(run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", SMALL_LAYERS, "--quiet"), str(store))
    assert file_snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_empty_folder_is_a_usable_store(tmp_path, synth_dir, small_store):
    (tmp_path / "s.zarr").mkdir()
    assert run_cli("materialize", "--source", synth_dir, "--store", tmp_path / "s.zarr", "--layers", SMALL_LAYERS, "--quiet").exit_code == 0
    assert_same_arrays(tmp_path / "s.zarr", small_store)


def test_unwritable_store_location(tmp_path, synth_dir):
    (tmp_path / "plain-file").write_text("x")
    store = tmp_path / "plain-file" / "sub" / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", SMALL_LAYERS, "--quiet"),
                          "cannot create store")
    assert (tmp_path / "plain-file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-file"]


def test_changed_source_is_refused_unless_overwrite(tmp_path):
    first = write_synthetic(tmp_path / "first", n=12, seed=1)
    second = write_synthetic(tmp_path / "second", n=12, seed=2)
    store = tmp_path / "s.zarr"
    assert run_cli("materialize", "--source", first, "--store", store, "--layers", SMALL_LAYERS, "--quiet").exit_code == 0
    before = file_snapshot(store)
    result = run_cli("materialize", "--source", second, "--store", store, "--layers", SMALL_LAYERS, "--quiet")
    assert_one_line_error(result, "different source", "--overwrite")
    assert file_snapshot(store) == before

    result = run_cli("materialize", "--source", second, "--store", store, "--layers", SMALL_LAYERS, "--quiet", "--overwrite")
    assert result.exit_code == 0, result.output
    clean = tmp_path / "clean.zarr"
    materialize_to(clean, second, layers=SMALL_LAYERS)
    assert_same_arrays(store, clean)
    assert open_store(store).attrs["source"]["uri"] == str(second)


def test_changed_layout_is_refused_unless_overwrite(tmp_path, small_store, synth_dir):
    store = shutil.copytree(small_store, tmp_path / "s.zarr")
    before = file_snapshot(store)
    result = run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", r"down_blocks\.1\.attentions\.0\.", "--quiet")
    assert_one_line_error(result, "different layers, splits or chunking")
    assert file_snapshot(store) == before


def _fail_raw_writes_after(monkeypatch, n: int, prefix: str = "raw/") -> list[str]:
    """Make the n-th zarr array write under ``prefix`` raise ENOSPC; returns the paths that failed."""
    original = zarr.core.array.Array.__setitem__
    seen, failed = [0], []

    def setitem(self, selection, value):
        if self.path.startswith(prefix):
            seen[0] += 1
            if seen[0] == n:
                failed.append(self.path)
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, selection, value)

    monkeypatch.setattr(zarr.core.array.Array, "__setitem__", setitem)
    return failed


def test_disk_full_during_write(tmp_path, synth_dir, small_store, monkeypatch):
    store = tmp_path / "s.zarr"
    failed = _fail_raw_writes_after(monkeypatch, 5)
    result = run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", SMALL_LAYERS, "--quiet")
    assert_one_line_error(result, "no space left", str(store))
    assert len(failed) == 1
    group = failed[0].rsplit("/", 1)[0]
    groups = raw_groups(store)
    assert groups.get(group) is not True
    assert sum(groups.values()) == 2  # the two groups finished before it are kept

    monkeypatch.undo()
    result = run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", SMALL_LAYERS, "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_arrays(store, small_store)


def test_disk_full_while_writing_labels(tmp_path, synth_dir, small_store, monkeypatch):
    store = tmp_path / "s.zarr"
    _fail_raw_writes_after(monkeypatch, 1, prefix="labels/")
    result = run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", SMALL_LAYERS, "--quiet")
    assert_one_line_error(result, "no space left")
    monkeypatch.undo()
    assert run_cli("materialize", "--source", synth_dir, "--store", store, "--layers", SMALL_LAYERS, "--quiet").exit_code == 0
    assert_same_arrays(store, small_store)


# --- names that could escape the store --------------------------------------------------------------


def test_column_names_cannot_escape_the_store(tmp_path):
    evil = "../../x"
    rng = np.random.default_rng(0)
    cols = {f"{evil}.lora.down.weight": [rng.standard_normal((2, 4)) for _ in range(4)],
            f"{evil}.lora.up.weight": [rng.standard_normal((3, 2)) for _ in range(4)]}
    src = save_matrix_dataset(tmp_path / "src" / "data", cols)
    store = tmp_path / "deep" / "er" / "s.zarr"
    store.parent.mkdir(parents=True)
    before = file_snapshot(tmp_path)
    materialize_to(store, src)
    new = {p for p in file_snapshot(tmp_path) if p not in before}
    assert new and all(p.startswith("deep/er/s.zarr/") for p in new), sorted(new)
    root = open_store(store)
    (m,) = root.attrs["modules"]
    assert m["name"] == evil
    assert "/" not in m["key"] and "\\" not in m["key"] and not m["key"].startswith(".")
    assert sorted(root["raw/train"].group_keys()) == [m["key"]]
    rows = root["index/train/row"][...]
    np.testing.assert_array_equal(root[f"raw/train/{m['key']}/A"][...], np.asarray(cols[f"{evil}.lora.down.weight"], np.float32)[rows])


# --- xarray -----------------------------------------------------------------------------------------


def test_xarray_opens_raw_and_labels(synth_store, synth_ds):
    root = open_store(synth_store)
    m = next(m for m in root.attrs["modules"] if "attn2.to_v" in m["name"])
    raw = xr.open_zarr(str(synth_store), group=f"raw/train/{m['key']}", consolidated=False)
    assert raw["A"].dims == ("model", "rank", "in") and raw["B"].dims == ("model", "out", "rank")
    rows = root["index/train/row"][...]
    assert raw["A"].shape == (len(rows), 1, m["in"])
    np.testing.assert_array_equal(raw["B"].values, source_matrix(synth_ds, m["up"], rows))
    labels = xr.open_zarr(str(synth_store), group="labels/train", consolidated=False)
    assert {"category_label", "category_name", "num_images", "rank"} <= set(labels.data_vars)
    assert "row" not in labels.data_vars  # bookkeeping lives in index/, apart from the labels
    index = xr.open_zarr(str(synth_store), group="index/train", consolidated=False)
    assert index["row"].dims == ("model",)
    np.testing.assert_array_equal(labels["num_images"].values, np.asarray(synth_ds["num_images"])[rows])


# --- the Arrow reader on chunked, sliced and ragged columns -------------------------------------------

_MATRIX = pa.list_(pa.list_(pa.float32()))


def _chunked(matrices, cuts) -> pa.ChunkedArray:
    """One matrix per row, cut into Arrow chunks at ``cuts`` (slices of one array, so offsets are non-zero)."""
    full = pa.array([np.asarray(m).tolist() for m in matrices], type=_MATRIX)
    return pa.chunked_array([full.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])], type=_MATRIX)


def test_gather_ragged_across_sliced_chunks():
    rng = np.random.default_rng(0)
    ranks = np.array([1, 2, 3, 1, 2, 3, 2, 2, 2, 1, 3, 3, 1, 1, 2])
    downs = [rng.standard_normal((r, 4)).astype(np.float32) for r in ranks]
    ups = [rng.standard_normal((3, r)).astype(np.float32) for r in ranks]
    down_col, up_col = _chunked(downs, [0, 4, 4, 9, 15]), _chunked(ups, [0, 7, 15])
    got_ranks = arrowio.row_ranks(down_col, "d")
    np.testing.assert_array_equal(got_ranks, ranks)
    down_spec, up_spec = arrowio.describe(down_col, "d", 0, got_ranks), arrowio.describe(up_col, "u", 1, got_ranks)
    assert (down_spec.rows, down_spec.cols, up_spec.rows, up_spec.cols) == (3, 4, 3, 3)
    rows = np.array([14, 0, 5, 5, 9, 3])  # any order, repeats allowed
    A = arrowio.gather(down_col, down_spec, got_ranks, rows, np.float32)
    B = arrowio.gather(up_col, up_spec, got_ranks, rows, np.float32)
    assert A.shape == (6, 3, 4) and B.shape == (6, 3, 3)
    for i, row in enumerate(rows):
        r = ranks[row]
        np.testing.assert_array_equal(A[i, :r], downs[row])
        np.testing.assert_array_equal(B[i, :, :r], ups[row])
        assert not A[i, r:].any() and not B[i, :, r:].any()


def test_gather_uniform_sliced_chunks_and_dtype():
    rng = np.random.default_rng(1)
    mats = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(10)]
    col = _chunked(mats, [0, 3, 3, 10])
    ranks = arrowio.row_ranks(col, "x")
    spec = arrowio.describe(col, "x", 0, ranks)
    rows = np.array([9, 0, 4])
    np.testing.assert_array_equal(arrowio.gather(col, spec, ranks, rows, np.float32), np.stack([mats[9], mats[0], mats[4]]))
    half = arrowio.gather(col, spec, ranks, rows, np.float16)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, np.stack([mats[9], mats[0], mats[4]]).astype(np.float16))


def test_materialize_multi_chunk_ragged_source(tmp_path):
    """A source whose columns come in several Arrow chunks, ranks varying within and across them."""
    rng = np.random.default_rng(2)
    ranks = [1, 2, 3, 1, 2, 3, 2, 2, 2, 1, 3, 3, 1, 1, 2, 3, 1]
    downs = [rng.standard_normal((r, 6)).astype(np.float32) for r in ranks]
    ups = [rng.standard_normal((5, r)).astype(np.float32) for r in ranks]
    table = pa.table({DOWN: _chunked(downs, [0, 5, 11, 17]), UP: _chunked(ups, [0, 2, 17])})
    ds = datasets.Dataset(table)
    assert ds.data.column(DOWN).num_chunks == 3
    source = Source("memory://chunks", "save_to_disk", {"train": ds}, "f" * 32)
    materialize(MaterializeConfig(store=str(tmp_path / "s.zarr"), quiet=True, memory=3 * 120, chunk_mb=1e-4), source=source)
    root = open_store(tmp_path / "s.zarr")
    for split in ("train", "val", "test"):
        rows = root[f"index/{split}/row"][...]
        np.testing.assert_array_equal(root[f"raw/{split}/unet.blk.attn1.to_q/rank"][...], np.asarray(ranks)[rows])
        A, B = root[f"raw/{split}/unet.blk.attn1.to_q/A"][...], root[f"raw/{split}/unet.blk.attn1.to_q/B"][...]
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(A[i, :ranks[row]], downs[row])
            np.testing.assert_array_equal(B[i, :, :ranks[row]], ups[row])
            assert not A[i, ranks[row]:].any() and not B[i, :, ranks[row]:].any()


# --- codecs, checksums, root description ------------------------------------------------------------


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_codecs_round_trip_with_checksums(tmp_path, synth_dir, small_store, codec):
    result = run_cli("materialize", "--source", synth_dir, "--store", tmp_path / "s.zarr", "--layers", SMALL_LAYERS, "--codec", codec, "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_arrays(tmp_path / "s.zarr", small_store)
    root = open_store(tmp_path / "s.zarr")
    key = root.attrs["modules"][0]["key"]
    meta = json.loads((tmp_path / "s.zarr" / "raw" / "train" / key / "A" / "zarr.json").read_text())
    names = [c["name"] for c in meta["codecs"]]
    assert names[-1] == "crc32c" and "blosc" in names
    assert meta["dimension_names"] == ["model", "rank", "in"]
    clean = json.loads((small_store / "raw" / "train" / key / "A" / "zarr.json").read_text())
    assert [c["name"] for c in clean["codecs"]] == ["bytes", "crc32c"]  # the default: no compression, checksummed


def test_root_attrs_describe_the_store(synth_store, synth_dir, synth_ds):
    attrs = open_store(synth_store).attrs.asdict()
    assert attrs["format"] == "weightspace-pipeline-store" and attrs["schema_version"] == 2
    assert attrs["source"]["uri"] == str(synth_dir) and attrs["source"]["kind"] == "save_to_disk"
    assert len(attrs["layers"]) == 128 and len(attrs["modules"]) == 64
    lora = sorted(c for c in synth_ds.column_names if ".lora." in c)
    assert sorted(layer["name"] for layer in attrs["layers"]) == lora
    for m in attrs["modules"]:
        assert m["down"] == f"{m['name']}.lora.down.weight" and m["up"] == f"{m['name']}.lora.up.weight"
        assert m["scheme"] == "diffusers" and m["rank"] == 1 and m["rank_varies"] is False and m["dtype"] == "float32"
    assert attrs["ignored_columns"] == []
    assert set(attrs["labels"]) == {"category_label", "category_name", "num_images", "rank"}
    assert attrs["materialize_config"]["source"] == str(synth_dir)


def test_layers_selection_keeps_ignored_columns_non_lora(small_store):
    attrs = open_store(small_store).attrs.asdict()
    assert len(attrs["modules"]) == 4
    assert attrs["ignored_columns"] == []
