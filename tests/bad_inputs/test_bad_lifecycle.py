"""The store's life: label names, the commands printed to repair it, replacing it (--overwrite) and losing its root.

Each test is a defect found by a hostile tester; each asserts the contract of docs/errors.md.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import zarr

from conftest import (SMALL_LAYERS, assert_one_line_error, assert_same_arrays, file_snapshot, lora_rows, materialize_to,
                      run_cli, save_matrix_dataset)
from pipeline import store as store_mod
from pipeline.splits import original_split
from pipeline.features import FeaturesConfig, compute_features
from pipeline.train import TrainConfig, load_labels, train

ROOT = Path(__file__).resolve().parents[2]
TRAIN = dict(reps="dw_norms", runs=2, hidden=16, epochs=3, patience=2, quiet=True)
TRAIN_CLI = ("--rep", "dw_norms", "--runs", "2", "--hidden", "16", "--epochs", "3", "--patience", "2", "--quiet")


# --- builders --------------------------------------------------------------------------------------


def labelled_source(path, n: int = 24, **labels) -> Path:
    """A one-module save_to_disk dataset of ``n`` adapters with the given label columns (name -> values)."""
    def value_type(values):
        kind = np.asarray(values).dtype.kind
        return datasets.Value({"i": "int64", "u": "int64", "f": "float64"}.get(kind, "string"))

    return save_matrix_dataset(path, lora_rows(n, seed=3), extra={k: np.asarray(v).tolist() for k, v in labels.items()},
                               extra_features={k: value_type(v) for k, v in labels.items()})


def run_printed(command: str):
    """Run a command exactly as a message printed it (shell-quoted `pipeline ...`), in-process."""
    args = shlex.split(command.strip("`"))
    assert args[0] == "pipeline", command
    return run_cli(*args[1:])


def copy_of(store: Path, path: Path) -> tuple[Path, zarr.Group, str]:
    """A writable copy of ``store`` at ``path``: (path, its root, its first module's key)."""
    shutil.copytree(store, path)
    root = zarr.open_group(str(path), mode="r+")
    return path, root, root.attrs["modules"][0]["key"]


def flip_byte(chunk: Path, at: int | None = None) -> None:
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    chunk.write_bytes(bytes(data))


def printed_commands(text: str) -> list[str]:
    """The `pipeline ...` commands in a message (between backquotes) or a listing (indented lines)."""
    found = [part for i, part in enumerate(text.split("`")) if i % 2 and part.startswith("pipeline ")]
    return found + [line.strip() for line in text.splitlines() if line.startswith("  pipeline ")]


# --- label names: distinct columns stay distinct, bookkeeping apart ---------------------------------


def test_label_names_that_look_alike_keep_their_own_values(tmp_path):
    rng = np.random.default_rng(0)
    spaced, underscored = rng.integers(0, 3, 24), rng.integers(5, 9, 24)
    src = labelled_source(tmp_path / "src", **{"a b": spaced, "a_b": underscored})
    materialize_to(tmp_path / "s.zarr", src)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    keys = {name: info["key"] for name, info in root.attrs["labels"].items()}
    assert keys["a_b"] == "a_b" and keys["a b"] != "a_b"
    for split in ("train", "val", "test"):
        rows = root[f"index/{split}/row"][:]
        np.testing.assert_array_equal(root[store_mod.label_path(root, split, "a b")][:], spaced[rows])
        np.testing.assert_array_equal(root[store_mod.label_path(root, split, "a_b")][:], underscored[rows])
    _, y, _, classes = load_labels(root, str(tmp_path / "s.zarr"), "a b")  # what train --label 'a b' trains on
    assert classes == ["0", "1", "2"]
    np.testing.assert_array_equal(y["train"], spaced[root["index/train/row"][:]])


def test_labels_named_like_the_bookkeeping_do_not_replace_it(tmp_path):
    row_label = np.arange(24)[::-1] * 10
    model_id = np.linspace(0, 1, 24)
    src = labelled_source(tmp_path / "src", row=row_label, model_id=model_id)
    materialize_to(tmp_path / "s.zarr", src)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    expected = original_split(24)
    for split in ("train", "val", "test"):
        rows = root[f"index/{split}/row"][:]
        np.testing.assert_array_equal(rows, expected[split])  # source row indices, not the label's values
        np.testing.assert_array_equal(root[store_mod.label_path(root, split, "row")][:], row_label[rows])
        np.testing.assert_allclose(root[store_mod.label_path(root, split, "model_id")][:], model_id[rows])
    assert "model_id" not in root["index/train"]  # a float column names no model: it is a label
    assert set(root.attrs["labels"]) == {"row", "model_id"}


# --- printed commands work as printed --------------------------------------------------------------


@pytest.fixture(scope="module")
def made_with_options(tmp_path_factory):
    """A store made with every non-default materialize option, with features and a trained configuration."""
    base = tmp_path_factory.mktemp("options with space")
    rng = np.random.default_rng(1)
    src = labelled_source(base / "src", n=40, category_label=[f"c{i}" for i in rng.integers(0, 3, 40)])
    path = base / "my store.zarr"
    result = run_cli("materialize", "--store", path, "--source", src, "--chunk-mb", "0.0005", "--codec", "lz4",
                     "--test-size", "0.4", "--val-test-size", "0.5", "--split-seed", "7", "--memory", "64MiB", "--quiet")
    assert result.exit_code == 0, result.output
    compute_features(FeaturesConfig(store=str(path), reps="dw_norms", quiet=True))
    train(TrainConfig(store=str(path), **TRAIN))
    return path, src


def test_materialize_alone_resumes_with_the_options_the_store_was_made_with(made_with_options, tmp_path):
    clean, _ = made_with_options
    copy, root, key = copy_of(clean, tmp_path / "copy.zarr")
    store_mod.mark_incomplete(root, f"raw/val/{key}")
    features_before = file_snapshot(copy / "features")
    runs_before = file_snapshot(copy / "runs")
    result = run_cli("materialize", "--store", copy, "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_arrays(copy, clean)
    assert file_snapshot(copy / "features") == features_before and file_snapshot(copy / "runs") == runs_before


def test_verify_repair_prints_commands_that_repair_exactly(made_with_options, tmp_path):
    clean, _ = made_with_options
    copy, _, key = copy_of(clean, tmp_path / "with space's.zarr")
    flip_byte(sorted((copy / "raw" / "train" / key / "A" / "c").rglob("*"))[-1])
    result = run_cli("verify", "--store", copy, "--repair", "--quiet")
    assert result.exit_code == 1, result.output
    commands = printed_commands(result.output)
    assert commands and all(c.startswith("pipeline materialize") for c in commands), result.output
    for command in commands:
        outcome = run_printed(command)
        assert outcome.exit_code == 0, (command, outcome.output)
    assert_same_arrays(copy, clean)
    assert run_cli("verify", "--store", copy, "--quiet").exit_code == 0


def test_the_command_features_prints_for_unfinished_raw_data_works(made_with_options, tmp_path):
    clean, _ = made_with_options
    copy, root, key = copy_of(clean, tmp_path / "copy.zarr")
    store_mod.mark_incomplete(root, f"raw/test/{key}")
    line = assert_one_line_error(run_cli("features", "--store", copy, "--rep", "dw_norms", "--quiet"))
    (command,) = printed_commands(line)
    assert run_printed(command).exit_code == 0
    assert_same_arrays(copy, clean)


# --- replacing a store: crash-safe ------------------------------------------------------------------


def _sources(tmp_path):
    first = labelled_source(tmp_path / "first", n=30, category_label=["x", "y", "z"] * 10)
    second = save_matrix_dataset(tmp_path / "second", {**lora_rows(60, seed=8), **lora_rows(60, seed=9, name="unet.blk.attn2.to_v")},
                                 extra={"category_label": ["p", "q"] * 30},
                                 extra_features={"category_label": datasets.Value("string")})
    return first, second


def test_an_interrupted_overwrite_says_what_it_is_and_finishes(tmp_path):
    first, second = _sources(tmp_path)
    path = tmp_path / "s.zarr"
    materialize_to(path, first)
    from pipeline.materialize import MaterializeConfig, recorded_config  # materialize's own steps, run one by one

    config = MaterializeConfig(store=str(path), source=str(second), overwrite=True, quiet=True)
    store_mod.begin_replacing(path, recorded_config(config))
    shutil.rmtree(path / "raw")  # killed in the middle of clear(): raw gone, labels and index still there
    for args in (("info",), ("features", "--rep", "dw_norms"), ("train",), ("verify",), ("report",)):
        line = assert_one_line_error(run_cli(*args, "--store", path), "being replaced")
        assert "pipeline materialize --store" in line
    (command,) = printed_commands(assert_one_line_error(run_cli("info", "--store", path)))
    assert run_printed(command).exit_code == 0  # `materialize --store S` alone finishes the replacement
    clean = tmp_path / "clean.zarr"
    materialize_to(clean, second)
    assert_same_arrays(path, clean)


def _wait_for(predicate, proc, what: str) -> None:
    deadline = time.monotonic() + 120
    while not predicate():
        assert proc.poll() is None, f"finished before {what}: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def _root_attrs(path: Path) -> dict:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        return {}


@pytest.mark.slow
def test_kill_loop_over_materialize_overwrite(tmp_path):
    """SIGKILL `materialize --overwrite` at its steps and at moments after them; rerunning the same command
    always ends in the clean store, and in between every command says what the store is in one line.

    The moment in the middle of deleting the old contents is too short to hit from outside every time:
    test_an_interrupted_overwrite_says_what_it_is_and_finishes builds that state directly.
    """
    first, second = _sources(tmp_path)
    clean = tmp_path / "clean.zarr"
    materialize_to(clean, second, chunk_mb=0.0001)
    replacing = lambda p: "replacing" in _root_attrs(p)  # noqa: E731
    new_root = lambda p: _root_attrs(p).get("source", {}).get("uri") == str(second) and not replacing(p)  # noqa: E731
    kills = [("marked replacing", replacing, 0.0), ("new root written", new_root, 0.0),
             *((f"{delay}s after marking", replacing, delay) for delay in (0.005, 0.02, 0.1))]
    for i, (point, reached, delay) in enumerate(kills):
        path = tmp_path / f"kill-{i}.zarr"
        materialize_to(path, first)
        command = [sys.executable, str(ROOT / "cli.py"), "materialize", "--store", str(path), "--source", str(second),
                   "--overwrite", "--quiet", "--chunk-mb", "0.0001"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for(lambda: reached(path), proc, point)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
            proc.stderr.close()
        # whatever the point, the store says what it is in one line (never "not one of our stores")
        info = run_cli("info", "--store", path)
        assert "not one of our stores" not in info.output and "Traceback" not in info.output, (point, info.output)
        again = subprocess.run(command, capture_output=True, text=True)
        assert again.returncode == 0, (point, again.stderr)
        assert_same_arrays(path, clean)


# --- a lost or damaged root zarr.json ---------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "not json", "truncated"])
def test_a_lost_root_is_restored_by_verify_repair(small_store, tmp_path, damage):
    path = tmp_path / "s.zarr"
    shutil.copytree(small_store, path)
    meta = path / "zarr.json"
    original = meta.read_bytes()
    if damage == "deleted":
        meta.unlink()
    elif damage == "not json":
        meta.write_text("this is not json")
    else:
        meta.write_bytes(original[: len(original) // 2])
    before = file_snapshot(path)
    line = assert_one_line_error(run_cli("info", "--store", path), "lost its root metadata")
    assert file_snapshot(path) == before
    (command,) = printed_commands(line)
    result = run_printed(command)
    assert result.exit_code in (0, 1) and "Traceback" not in result.output, result.output
    assert json.loads(meta.read_text())["attributes"] == json.loads(original)["attributes"]
    assert_same_arrays(path, small_store)
    assert run_cli("verify", "--store", path, "--quiet").exit_code == 0


def test_materialize_restores_a_lost_root_and_keeps_everything(small_store, synth_dir, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(small_store, path)
    (path / "zarr.json").unlink()
    assert run_cli("materialize", "--store", path, "--quiet").exit_code == 0
    assert_same_arrays(path, small_store)


def test_a_root_lost_without_a_copy_can_be_replaced(small_store, synth_dir, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(small_store, path)
    (path / "zarr.json").unlink()
    shutil.rmtree(path / "index")  # as a store of schema 1 would be: no copy of the root
    line = assert_one_line_error(run_cli("info", "--store", path), "no copy", "--overwrite")
    assert "not one of our stores" not in line
    assert_one_line_error(run_cli("materialize", "--store", path, "--source", synth_dir, "--layers", SMALL_LAYERS))
    result = run_cli("materialize", "--store", path, "--source", synth_dir, "--layers", SMALL_LAYERS, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_arrays(path, small_store)


def test_verify_repair_of_a_run_prints_a_train_command_that_works(made_with_options, tmp_path):
    clean, _ = made_with_options
    copy, _, _ = copy_of(clean, tmp_path / "a 'quoted' store.zarr")
    flip_byte(next(p for p in sorted((copy / "runs").rglob("c/*")) if p.is_file() and "test_pred" in p.as_posix()), at=0)
    result = run_cli("verify", "--store", copy, "--repair", "--quiet")
    assert result.exit_code == 1, result.output
    (command,) = printed_commands(result.output)
    assert command.startswith("pipeline train ")
    assert run_printed(command).exit_code == 0
    assert run_cli("verify", "--store", copy, "--quiet").exit_code == 0
    assert_same_arrays(copy, clean)


def test_a_deleted_index_chunk_is_named_by_verify_and_repaired(made_with_options, tmp_path):
    clean, _ = made_with_options
    copy, _, _ = copy_of(clean, tmp_path / "copy.zarr")
    (copy / "index" / "val" / "row" / "c" / "0").unlink()
    result = run_cli("verify", "--store", copy, "--repair", "--quiet")
    assert result.exit_code == 1 and "index/val/row/c/0: chunk missing" in result.output, result.output
    for command in printed_commands(result.output):
        assert run_printed(command).exit_code == 0, command
    assert_same_arrays(copy, clean)


def test_a_lost_index_group_metadata_is_rewritten_with_its_copy(made_with_options, tmp_path):
    clean, _ = made_with_options
    copy, _, _ = copy_of(clean, tmp_path / "copy.zarr")
    (copy / "index" / "zarr.json").unlink()
    result = run_cli("verify", "--store", copy, "--repair", "--quiet")
    assert result.exit_code == 1 and "index:" in result.output, result.output
    assert store_mod.root_copy(copy) == json.loads((copy / "zarr.json").read_text())["attributes"]
    assert run_cli("verify", "--store", copy, "--quiet").exit_code == 0


# --- found by a second hostile pass ---------------------------------------------------------------


def test_the_resume_command_after_ctrl_c_drops_force():
    from cli import interrupted_message

    line = interrupted_message(["features", "--store", "my store.zarr", "--rep", "dw_norms", "--force"])
    assert "`pipeline features --store 'my store.zarr' --rep dw_norms`" in line and "--force" not in line


def test_a_damaged_configuration_group_is_rewritten_from_its_runs(made_with_options, tmp_path):
    clean, _ = made_with_options
    copy, _, _ = copy_of(clean, tmp_path / "copy.zarr")
    (digest,) = [p.name for p in (copy / "runs").iterdir() if p.is_dir()]
    (copy / "runs" / digest / "zarr.json").write_text("{")
    for args in (("report", "--out", tmp_path / "r"), ("train", *TRAIN_CLI)):
        assert_one_line_error(run_cli(*args, "--store", copy), "runs/", "verify --store")
    result = run_cli("verify", "--store", copy, "--repair", "--quiet")
    assert result.exit_code == 1 and f"runs/{digest}: " in result.output, result.output
    assert run_cli("verify", "--store", copy, "--quiet").exit_code == 0
    assert_same_arrays(copy, clean)  # nothing was deleted
    assert json.loads((copy / "runs" / digest / "zarr.json").read_text())["attributes"] == \
        json.loads((clean / "runs" / digest / "zarr.json").read_text())["attributes"]
    assert run_cli("report", "--store", copy, "--out", tmp_path / "r").exit_code == 0


def test_a_damaged_run_group_is_one_line_in_train_and_report(made_with_options, tmp_path):
    clean, _ = made_with_options
    copy, _, _ = copy_of(clean, tmp_path / "copy.zarr")
    (run,) = [p for p in (copy / "runs").glob("*/run-000")]
    (run / "zarr.json").write_text("not json")
    before = file_snapshot(copy)
    assert_one_line_error(run_cli("report", "--store", copy, "--out", tmp_path / "r"), "verify")
    assert_one_line_error(run_cli("train", "--store", copy, *TRAIN_CLI), "verify")
    assert file_snapshot(copy) == before


def test_a_label_named_zarr_json_is_kept(tmp_path):
    values = np.arange(24) % 3
    materialize_to(tmp_path / "s.zarr", labelled_source(tmp_path / "src", **{"zarr.json": values}))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    rows = root["index/train/row"][:]
    np.testing.assert_array_equal(root[store_mod.label_path(root, "train", "zarr.json")][:], values[rows])
    assert run_cli("verify", "--store", tmp_path / "s.zarr", "--quiet").exit_code == 0


def test_an_infinite_regression_target_is_refused(tmp_path):
    y = np.linspace(0, 1, 24)
    y[5] = np.inf
    path = tmp_path / "s.zarr"
    materialize_to(path, labelled_source(tmp_path / "src", y=y))
    compute_features(FeaturesConfig(store=str(path), reps="dw_norms", quiet=True))
    before = file_snapshot(path)
    assert_one_line_error(run_cli("train", "--store", path, "--label", "y", *TRAIN_CLI), "'y'", "infinite")
    assert file_snapshot(path) == before


@pytest.mark.parametrize("expires", ["NaN", "Infinity", str(time.time() + 10 * 24 * 3600)])
def test_a_lease_that_would_never_expire_is_damaged(small_store, tmp_path, expires):
    from pipeline import leases

    path = tmp_path / "s.zarr"
    shutil.copytree(small_store, path)
    lease = path / "_leases" / "materialize" / "00000000.json"
    lease.parent.mkdir(parents=True)
    lease.write_text('{"by": "x@y", "pid": 1, "token": "t", "since": 0, "expires": %s, "host": "%s"}'
                     % (expires, __import__("socket").gethostname()))
    assert leases.parse(json.loads(lease.read_text())) is None
    result = run_cli("verify", "--store", path, "--quiet")
    assert result.exit_code == 1 and "damaged lease" in result.output, result.output
    assert run_cli("materialize", "--store", path, "--quiet").exit_code == 0  # taken over, no wait
