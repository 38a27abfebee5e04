"""pipeline verify: every checksum and mark is checked; a flipped byte is named, and its repair restores the bytes."""

from __future__ import annotations

import shutil

import pytest
import zarr

from conftest import SMALL_LAYERS, assert_same_arrays, materialize_to, run_cli
from pipeline import features as features_mod
from pipeline.features import FeaturesConfig, compute_features
from pipeline.train import TrainConfig, train
from pipeline.verify import verify

TRAIN = dict(reps="dw_norms", runs=2, hidden=16, epochs=3, patience=2, quiet=True)


@pytest.fixture(scope="module")
def clean_store(synth_dir, tmp_path_factory):
    """Four modules of the 40 adapters in several chunks, two representations, one trained configuration."""
    path = tmp_path_factory.mktemp("verify") / "clean.zarr"
    materialize_to(path, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    compute_features(FeaturesConfig(store=str(path), reps="simple_stats,dw_norms", quiet=True))
    train(TrainConfig(store=str(path), **TRAIN))
    return path


@pytest.fixture
def store(clean_store, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(clean_store, copy)
    return copy


def flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def repair_commands(store) -> list[str]:
    result = run_cli("verify", "--store", store, "--repair", "--quiet")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    return [line.strip() for line in lines[lines.index("marked the damaged pieces for recomputation; now run, in this order:") + 1:]]


def test_a_clean_store_passes(clean_store):
    report = verify(str(clean_store))
    assert report.problems == [] and report.chunks > 20 and report.bytes > 0
    result = run_cli("verify", "--store", clean_store, "--quiet")
    assert result.exit_code == 0 and "every checksum and completion mark agrees" in result.output


def test_a_flipped_raw_byte_is_named_and_materialize_repairs_it(store, clean_store, synth_dir):
    root = zarr.open_group(str(store), mode="r")
    module = root.attrs["modules"][1]["key"]
    chunk = store / "raw" / "train" / module / "B" / "c" / "1" / "0" / "0"
    flip(chunk)
    result = run_cli("verify", "--store", store, "--quiet")
    assert result.exit_code == 1
    assert f"raw/train/{module}/B/c/1/0/0: unreadable chunk (Stored and computed checksum do not match" in result.output
    commands = repair_commands(store)
    assert commands == [f"pipeline materialize --store {store}"]  # the store's own source and options
    summary = materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    assert summary.modules_written == 1  # that module of that split, nothing else
    assert verify(str(store)).problems == []
    assert_same_arrays(store, clean_store)


def test_a_flipped_feature_byte_is_recomputed_alone(store, clean_store, monkeypatch):
    flip(store / "features" / "val" / "simple_stats" / "c" / "0" / "0" / "0")
    report = verify(str(store))
    assert [p.piece for p in report.problems] == ["features/val/simple_stats/c/0/0/0"]
    assert repair_commands(store) == [f"pipeline features --store {store} --rep simple_stats --split val"]
    reads = []
    real = features_mod.read_raw
    monkeypatch.setattr(features_mod, "read_raw", lambda group, role, a, b: reads.append((group.path, a)) or real(group, role, a, b))
    summary = compute_features(FeaturesConfig(store=str(store), reps="simple_stats", splits="val", quiet=True))
    assert summary.tasks == 1 and {start for _, start in reads} == {0}  # only chunk 0 of val was read again
    assert verify(str(store)).problems == []
    assert_same_arrays(store, clean_store)


def test_a_flipped_run_byte_retrains_that_run(store, clean_store):
    root = zarr.open_group(str(store), mode="r")
    digest = next(iter(root["runs"].group_keys()))
    flip(store / "runs" / digest / "run-001" / "test_pred" / "c" / "0")
    commands = repair_commands(store)
    assert len(commands) == 1 and commands[0].startswith(f"pipeline train --store {store} --rep dw_norms --layers all")
    summary = train(TrainConfig(store=str(store), **TRAIN))
    assert summary.trained == 2  # run 1 with run 0, the batch it was trained in: the same bytes as before
    assert verify(str(store)).problems == []
    assert_same_arrays(store, clean_store)


def test_marks_are_checked_against_the_data(store):
    root = zarr.open_group(str(store), mode="r+")
    root["features/train/_progress/dw_norms"][0] = 0  # marked complete, but a chunk is not done
    root["features/test/simple_stats"].attrs.update({"complete": False})  # an interrupted run
    problems = {p.piece: p for p in verify(str(store)).problems}
    assert problems["features/train/dw_norms"].what == "marked complete but chunks are missing"
    assert problems["features/train/dw_norms"].repair.endswith("--rep dw_norms --split train --force")
    assert problems["features/test/simple_stats"].what.startswith("never finished")


def test_labels_recorded_without_their_key_are_found_under_their_safe_name(store):
    """Stores written before the root attrs recorded each label's key: verify looks for its safe name."""
    import json

    from pipeline.layers import safe_key

    meta = json.loads((store / "zarr.json").read_text())
    for name, info in meta["attributes"]["labels"].items():
        assert info.pop("key") == safe_key(name)
    (store / "zarr.json").write_text(json.dumps(meta))
    assert verify(str(store)).problems == []
