"""A damaged store: chunks deleted, swapped or flipped, metadata deleted or garbled, root attrs missing,
damaged leases, verify on personal and read-only stores. Each damage is detected (verify names it, a
reader refuses it in one line), or refused in one line with the store unchanged, or repaired exactly."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import SMALL_LAYERS, SMALL_TRAIN, assert_one_line_error, assert_same_arrays, file_snapshot, materialize_to, run_cli
from pipeline import leases
from pipeline import store as store_mod
from pipeline.errors import PipelineError
from pipeline.features import FeaturesConfig, compute_features
from pipeline.train import TrainConfig, train
from pipeline.verify import verify

TRAIN_CLI = ["--rep", "dw_norms", "--runs", "2", "--hidden", "16", "--epochs", "3", "--patience", "2", "--quiet"]  # SMALL_TRAIN, as options


# --- builders of damage -----------------------------------------------------------------------------


def delete(store: Path, key: str) -> None:
    (store / key).unlink()


def swap(store: Path, a: str, b: str) -> None:
    pa, pb = store / a, store / b
    da, db = pa.read_bytes(), pb.read_bytes()
    assert da != db, "swap two chunks that differ"
    pa.write_bytes(db)
    pb.write_bytes(da)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def garble(path: Path) -> None:
    path.write_text("{this is not json")


def edit_root_attrs(store: Path, **changes) -> None:
    """Change the root attributes in place (a value of ... deletes the key)."""
    meta = json.loads((store / "zarr.json").read_text())
    for key, value in changes.items():
        if value is ...:
            meta["attributes"].pop(key)
        else:
            meta["attributes"][key] = value
    (store / "zarr.json").write_text(json.dumps(meta))


def write_lease(store: Path, scope: str, content: bytes, generation: int = 0) -> Path:
    path = store / "_leases" / scope / f"{generation:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def drop_rep(store: Path, name: str) -> None:
    for split in ("train", "val", "test"):
        shutil.rmtree(store / "features" / split / name, ignore_errors=True)
        shutil.rmtree(store / "features" / split / "_progress" / name, ignore_errors=True)


def module_key(store: Path, i: int = 1) -> str:
    return zarr.open_group(str(store), mode="r").attrs["modules"][i]["key"]


def digest(store: Path) -> str:
    return next(iter(zarr.open_group(str(store), mode="r")["runs"].group_keys()))


def problems(store: Path) -> dict:
    return {p.piece: p for p in verify(str(store)).problems}


def repair(store: Path) -> list[str]:
    result = run_cli("verify", "--store", store, "--repair", "--quiet")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    return [line.strip() for line in lines[lines.index("marked the damaged pieces for recomputation; now run, in this order:") + 1:]]


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def store(trained_small, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(trained_small, copy)
    return copy


def test_the_clean_store_has_manifests_and_passes(trained_small):
    root = zarr.open_group(str(trained_small), mode="r")
    raw = root[f"raw/train/{module_key(trained_small)}"]
    assert sorted(raw.attrs["chunks"]) == ["A", "B"]  # in the group's mark, written in one go with it
    assert raw.attrs["chunks"]["A"]["count"] == raw["A"].cdata_shape[0] > 1
    assert root["features/train/dw_norms"].attrs["chunks"]["count"] > 1
    assert verify(str(trained_small)).problems == []


# --- 1. a deleted chunk -------------------------------------------------------------------------------


def test_a_deleted_raw_chunk_is_named_refused_by_features_and_repaired(store, trained_small, synth_dir):
    key = f"raw/train/{module_key(store)}/A/c/1/0/0"
    delete(store, key)
    assert problems(store)[key].what.startswith("chunk missing")
    result = run_cli("features", "--store", store, "--rep", "simple_stats", "--quiet")
    assert_one_line_error(result, key, f"pipeline verify --store {store} --repair")
    assert not zarr.open_group(str(store), mode="r")["features/train/simple_stats"].attrs.get("complete")
    drop_rep(store, "simple_stats")  # what the refused run allocated: an unfinished representation
    assert repair(store) == [f"pipeline materialize --store {store}"]  # the store's own source and options
    assert materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02).modules_written == 1
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


def test_a_deleted_feature_chunk_is_refused_by_train_and_recomputed_alone(store, trained_small):
    key = "features/train/dw_norms/c/1/0/0"
    delete(store, key)
    assert problems(store)[key].what.startswith("chunk missing")
    before = file_snapshot(store)
    assert_one_line_error(run_cli("train", "--store", store, *TRAIN_CLI, "--force"), key, "pipeline verify")
    assert file_snapshot(store) == before
    assert repair(store) == [f"pipeline features --store {store} --rep dw_norms --split train"]
    assert compute_features(FeaturesConfig(store=str(store), reps="dw_norms", quiet=True)).tasks == 1
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


def test_a_deleted_label_chunk_is_refused_by_train(store):
    key = "labels/train/category_label/c/0"
    delete(store, key)
    assert problems(store)[key].what.startswith("chunk missing")
    before = file_snapshot(store)
    assert_one_line_error(run_cli("train", "--store", store, *TRAIN_CLI, "--force"), key, "pipeline verify")
    assert file_snapshot(store) == before


def test_a_deleted_run_chunk_is_refused_by_report_and_retrained(store, trained_small, tmp_path):
    key = f"runs/{digest(store)}/run-001/epoch/c/0"
    delete(store, key)
    assert problems(store)[key].what.startswith("chunk missing")
    before = file_snapshot(store)
    assert_one_line_error(run_cli("report", "--store", store, "--out", tmp_path / "report"), key, "pipeline verify")
    assert file_snapshot(store) == before
    commands = repair(store)
    assert len(commands) == 1 and commands[0].startswith(f"pipeline train --store {store} --rep dw_norms")
    assert train(TrainConfig(store=str(store), **SMALL_TRAIN)).trained == 2
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


def test_views_refuse_a_deleted_feature_chunk(store):
    from pipeline.views import open_features

    delete(store, "features/val/dw_norms/c/0/0/0")
    with pytest.raises(PipelineError, match="features/val/dw_norms/c/0/0/0"):
        open_features(str(store), "val")


def test_an_array_from_before_manifests_says_so(store):
    group = zarr.open_group(str(store), mode="r+")[f"raw/val/{module_key(store)}"]
    group.attrs.put({k: v for k, v in group.attrs.asdict().items() if k != "chunks"})
    key = f"raw/val/{module_key(store)}/B/c/0/0/0"
    delete(store, key)
    what = problems(store)[key].what
    assert what.startswith("chunk missing") and "predates chunk manifests" in what


def test_every_chunk_is_written_even_all_zero(tmp_path):
    root = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    array = store_mod.require_array(root, "g/x", (4,), (2,), "int32", ("model",))
    array[:] = 0
    assert sorted(os.listdir(tmp_path / "z.zarr" / "g" / "x" / "c")) == ["0", "1"]


# --- 2. swapped chunks ----------------------------------------------------------------------------------


def test_swapped_raw_chunks_are_named_and_repaired(store, trained_small, synth_dir):
    a, b = (f"raw/test/{module_key(store)}/A/c/{i}/0/0" for i in (0, 1))
    swap(store, a, b)
    found = problems(store)
    assert found[a].what == "holds the chunk written at c/1/0/0 (chunks swapped or copied)"
    assert found[b].what == "holds the chunk written at c/0/0/0 (chunks swapped or copied)"
    repair(store)
    assert materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02).modules_written == 1
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


def test_swapped_feature_chunks_are_recomputed(store, trained_small):
    a, b = (f"features/train/dw_norms/c/{i}/0/0" for i in (0, 1))
    swap(store, a, b)
    assert {a, b} <= set(problems(store))
    repair(store)
    assert compute_features(FeaturesConfig(store=str(store), reps="dw_norms", quiet=True)).tasks == 2
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


# --- 3. damaged metadata --------------------------------------------------------------------------------


def test_a_deleted_array_metadata_is_named_and_repaired(store, trained_small, synth_dir):
    group = f"raw/train/{module_key(store)}"
    delete(store, f"{group}/A/zarr.json")
    assert problems(store)[group].what == "marked complete but A missing"
    repair(store)
    assert materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02).modules_written == 1
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


def test_a_garbled_array_metadata_is_named_not_a_crash_and_repaired(store, trained_small, synth_dir):
    group = f"raw/val/{module_key(store)}"
    garble(store / group / "B" / "zarr.json")
    assert problems(store)[f"{group}/B"].what.startswith("metadata (zarr.json) unreadable")
    assert_one_line_error(run_cli("features", "--store", store, "--rep", "simple_stats", "--quiet"),
                          f"{group}/B", "is damaged", "pipeline verify")
    drop_rep(store, "simple_stats")  # what the refused run allocated: an unfinished representation
    repair(store)
    materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


def test_a_garbled_feature_metadata_is_named_and_recomputed(store, trained_small):
    garble(store / "features" / "test" / "dw_norms" / "zarr.json")
    assert problems(store)["features/test/dw_norms"].what.startswith("metadata (zarr.json) unreadable")
    before = file_snapshot(store)
    assert_one_line_error(run_cli("info", "--store", store), "unreadable metadata", f"pipeline verify --store {store}")
    assert file_snapshot(store) == before
    assert repair(store) == [f"pipeline features --store {store} --rep dw_norms --split test"]
    compute_features(FeaturesConfig(store=str(store), reps="dw_norms", quiet=True))
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


def test_a_deleted_label_array_is_noticed(store, synth_dir):
    delete(store, "labels/test/category_label/zarr.json")
    assert problems(store)["labels/test"].what == "marked complete but category_label missing"
    before = file_snapshot(store)
    assert_one_line_error(run_cli("train", "--store", store, *TRAIN_CLI, "--force"), "labels/test/category_label",
                          "pipeline verify")
    assert file_snapshot(store) == before
    repair(store)
    materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    assert verify(str(store)).problems == []


def test_a_deleted_progress_flag_of_a_complete_rep_is_named(store):
    delete(store, "features/test/_progress/dw_norms/c/0")
    found = problems(store)["features/test/dw_norms"]
    assert found.what == "marked complete but chunks are missing" and found.repair.endswith("--split test --force")


@pytest.mark.parametrize("group", ["raw/train/{module}", "labels/val", "runs/{digest}/run-000"])
def test_a_garbled_group_metadata_is_named_and_repaired(store, trained_small, synth_dir, group):
    group = group.format(module=module_key(store), digest=digest(store))
    garble(store / group / "zarr.json")
    assert problems(store)[group].what.startswith("metadata (zarr.json) unreadable")
    repair(store)
    materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    train(TrainConfig(store=str(store), **SMALL_TRAIN))
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


@pytest.mark.parametrize("group", ["raw/val", "features/train", "runs"])
@pytest.mark.parametrize("damage", ["garble", "delete"])
def test_a_plain_group_metadata_is_named_and_rewritten(store, trained_small, synth_dir, group, damage):
    """A group that only holds others: without its zarr.json zarr's listings and the writers break."""
    (garble if damage == "garble" else Path.unlink)(store / group / "zarr.json")
    assert group in problems(store)
    assert repair(store) == []
    materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_coordinate_is_rewritten_by_a_features_run(store, trained_small, damage):
    key = "features/val/module/c/0"
    flip(store / key) if damage == "flip" else delete(store, key)
    found = problems(store)[key]
    assert "predates" not in found.what
    assert repair(store) == [f"pipeline features --store {store} --split val --rep dw_norms"]
    assert run_cli("features", "--store", store, "--split", "val", "--rep", "dw_norms", "--quiet").exit_code == 0
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)


def drop_root_copy(store: Path) -> None:
    """As a store of schema 1 is: no copy of the root attrs in index/zarr.json."""
    meta = json.loads((store / "index" / "zarr.json").read_text())
    meta["attributes"].pop("root")
    (store / "index" / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("key", ["splits", "modules", "source", "labels"])
@pytest.mark.parametrize("command", ["info", "features", "train"])
def test_root_attrs_missing_a_key_points_to_the_restore(store, key, command):
    edit_root_attrs(store, **{key: ...})
    args = {"info": [], "features": ["--rep", "simple_stats", "--quiet"], "train": TRAIN_CLI}[command]
    before = file_snapshot(store)
    assert_one_line_error(run_cli(command, "--store", store, *args), "lost its root metadata", "verify --store", "--repair")
    assert file_snapshot(store) == before


@pytest.mark.parametrize("key", ["splits", "modules", "source", "labels"])
def test_root_attrs_missing_a_key_are_restored_by_verify_repair(store, trained_small, key):
    edit_root_attrs(store, **{key: ...})
    result = run_cli("verify", "--store", store, "--repair", "--quiet")
    assert result.exit_code == 1 and "zarr.json: the root metadata" in result.output, result.output
    assert verify(str(store)).problems == []
    assert_same_arrays(store, trained_small)
    assert json.loads((store / "zarr.json").read_text()) == json.loads((trained_small / "zarr.json").read_text())


@pytest.mark.parametrize("key", ["splits", "modules", "source", "labels"])
@pytest.mark.parametrize("command", ["info", "verify", "features", "train", "materialize"])
def test_root_attrs_missing_a_key_without_a_copy_is_one_line_everywhere(store, synth_dir, tmp_path, key, command):
    edit_root_attrs(store, **{key: ...})
    drop_root_copy(store)
    args = {"info": [], "verify": ["--quiet"], "features": ["--rep", "simple_stats", "--quiet"], "train": TRAIN_CLI,
            "materialize": ["--source", synth_dir, "--layers", SMALL_LAYERS, "--chunk-mb", "0.02", "--quiet"]}[command]
    before = file_snapshot(store)
    line = assert_one_line_error(run_cli(command, "--store", store, *args), repr(key))
    assert "--overwrite" in line
    assert file_snapshot(store) == before


def test_report_needs_no_root_attrs_but_its_runs(store, tmp_path):
    edit_root_attrs(store, splits=..., modules=..., labels=...)
    before = file_snapshot(store)
    assert run_cli("report", "--store", store, "--out", tmp_path / "report").exit_code == 0
    assert file_snapshot(store) == before and (tmp_path / "report" / "results.csv").is_file()


def test_materialize_overwrite_recovers_damaged_root_attrs(store, trained_small, synth_dir):
    edit_root_attrs(store, splits=...)
    drop_root_copy(store)  # with the copy, materialize restores the root from it (test_bad_lifecycle.py)
    materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02, overwrite=True)
    assert verify(str(store)).problems == []


def test_verify_never_tracebacks_on_any_damaged_file(store):
    """Garble, truncate or delete a sample of the store's files, one at a time: verify reports or refuses in one line."""
    files = sorted(p for p in store.rglob("*") if p.is_file() and p.relative_to(store).as_posix() != "zarr.json")
    rng = np.random.default_rng(0)
    for i, path in enumerate(rng.choice(files, size=24, replace=False)):
        saved = path.read_bytes()
        [garble, lambda p: p.write_bytes(b""), Path.unlink][i % 3](path)
        try:
            result = run_cli("verify", "--store", store, "--quiet")
            assert result.exit_code == 1 and "Traceback" not in result.output, (path, result.output)
            node = path.relative_to(store).parent.as_posix().split("/c/")[0]
            assert node.rsplit("/", 1)[-1] in result.output, (path, result.output)
        finally:
            path.write_bytes(saved)


# --- 4. a damaged chunk met by a reader ------------------------------------------------------------------


def test_a_flipped_raw_chunk_in_features_is_one_line(store):
    key = f"raw/train/{module_key(store)}/B/c/1/0/0"
    flip(store / key)
    result = run_cli("features", "--store", store, "--rep", "simple_stats", "--quiet")
    line = assert_one_line_error(result, key, "checksum", f"pipeline verify --store {store} --repair")
    assert "Compute Failed" not in result.output and line


def test_a_flipped_feature_chunk_in_train_is_one_line(store):
    key = "features/val/dw_norms/c/0/0/0"
    flip(store / key)
    before = file_snapshot(store)
    assert_one_line_error(run_cli("train", "--store", store, *TRAIN_CLI, "--force"), key, "checksum", "pipeline verify")
    assert file_snapshot(store) == before


def test_a_flipped_run_chunk_in_report_is_one_line(store, tmp_path):
    key = f"runs/{digest(store)}/run-000/train_score/c/0"
    flip(store / key)
    before = file_snapshot(store)
    assert_one_line_error(run_cli("report", "--store", store, "--out", tmp_path / "report"), key, "checksum",
                          "pipeline verify")
    assert file_snapshot(store) == before


# --- 5. a personal store --------------------------------------------------------------------------------


def test_verify_checks_what_a_personal_store_holds_and_repair_copies_no_raw_data(store, tmp_path):
    mine = tmp_path / "mine.zarr"
    compute_features(FeaturesConfig(store=str(store), reps="simple_stats", output=str(mine), quiet=True))
    result = run_cli("verify", "--store", mine, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"pipeline verify --store {store}" in result.output and "raw/" not in result.output
    key = "features/train/simple_stats/c/0/0/0"
    delete(mine, key)
    assert list(problems(mine)) == [key]
    assert repair(mine) == [f"pipeline features --store {mine} --rep simple_stats --split train"]
    compute_features(FeaturesConfig(store=str(store), reps="simple_stats", output=str(mine), quiet=True))
    assert verify(str(mine)).problems == [] and not (mine / "raw").exists()


# --- 6. --repair on a read-only store --------------------------------------------------------------------


def test_repair_on_a_read_only_store_is_one_line_and_changes_nothing(store, monkeypatch):
    delete(store, "features/train/dw_norms/c/0/0/0")
    for p in [store, *store.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:  # root ignores permissions: the write probe is told what the OS would say
        monkeypatch.setattr(store_mod, "check_writable", lambda location: (_ for _ in ()).throw(
            PipelineError(f"cannot write to {location} (Permission denied); choose a writable --store")))
    try:
        before = file_snapshot(store)
        assert_one_line_error(run_cli("verify", "--store", store, "--repair", "--quiet"), "cannot repair",
                              "Permission denied", "nothing was changed")
        assert file_snapshot(store) == before
    finally:
        for p in [store, *store.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


# --- 7. damaged leases ----------------------------------------------------------------------------------

DAMAGED_LEASES = {"empty": b"", "not json": b"{\x00garbage", "no by": json.dumps(
    {"pid": 1, "token": "t", "since": 0, "expires": 9e99}).encode(), "a list": b"[1, 2]"}


def finishes(fn, seconds: float = 60.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it spins past ``seconds``."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "spins forever"
    return out.get("value")


@pytest.mark.parametrize("content", DAMAGED_LEASES.values(), ids=DAMAGED_LEASES.keys())
def test_a_damaged_lease_is_taken_over_not_a_spin(tmp_path, content):
    write_lease(tmp_path, "features/train/x", content)
    zstore = store_mod.zarr_store(tmp_path)
    h = leases.holder(zstore, "features/train/x")
    assert h is not None and not h.active() and h.damaged
    lease = finishes(lambda: leases.take(zstore, "features/train/x", poll=0.01), 5)
    assert lease.generation == 1 and not (tmp_path / "_leases/features/train/x/00000000.json").exists()
    lease.release()
    assert leases.active_holders(zstore) == {}


def test_materialize_and_features_take_over_a_damaged_lease(store, synth_dir):
    write_lease(store, "materialize", b"")
    write_lease(store, "features/train/simple_stats", b"not json")
    finishes(lambda: materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02))
    summary = finishes(lambda: compute_features(FeaturesConfig(store=str(store), reps="simple_stats", quiet=True)))
    assert summary.computed == {"train": ["simple_stats"], "val": ["simple_stats"], "test": ["simple_stats"]}
    assert not (store / "_leases").exists()


def test_verify_reports_damaged_leases_and_repair_deletes_them(store):
    path = write_lease(store, "train/abc", DAMAGED_LEASES["no by"])
    assert problems(store)["_leases/train/abc/00000000.json"].what.startswith("damaged lease file")
    assert run_cli("info", "--store", store).exit_code == 0
    assert repair(store) == []
    assert not path.exists() and verify(str(store)).problems == []


# --- 8. the root's schema version and a plain file ------------------------------------------------------


def test_schema_version_true_is_refused(store):
    edit_root_attrs(store, schema_version=True)
    before = file_snapshot(store)
    assert_one_line_error(run_cli("info", "--store", store), "invalid schema version True")
    assert file_snapshot(store) == before


@pytest.mark.parametrize("command", ["info", "verify"])
def test_a_plain_file_is_named_a_file(tmp_path, command):
    path = tmp_path / "notes.zarr"
    path.write_text("hello")
    line = assert_one_line_error(run_cli(command, "--store", path), "is a file, not a pipeline store")
    assert "materialize" not in line


@pytest.mark.parametrize("command", ["info", "features", "train"])
def test_a_garbled_root_metadata_is_named(store, command):
    garble(store / "zarr.json")
    before = file_snapshot(store)
    assert_one_line_error(run_cli(command, "--store", store), "lost its root metadata", "unreadable")
    assert file_snapshot(store) == before


def test_a_foreign_folder_suggests_no_materialize(tmp_path):
    (tmp_path / "thing").mkdir()
    (tmp_path / "thing" / "data.csv").write_text("a,b\n")
    line = assert_one_line_error(run_cli("info", "--store", tmp_path / "thing"), "not a pipeline store")
    assert "materialize" not in line
