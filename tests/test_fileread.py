"""Adapter files read directly (issue 15 §2): no HuggingFace cache, each file opened once per split, a killed run
resumes at the next batch, and the fingerprint follows every file (by content with --verify-source)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_arrays, materialize_to, open_store, run_cli

from loras import MODULES, diffusers_folder, factors

from pipeline import fileread
from pipeline.sources import open_source

Q1 = MODULES[2]
N = 24


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """24 diffusers adapter folders with a labels CSV (a 16/2/6 split); read-only."""
    root = tmp_path_factory.mktemp("files") / "loras"
    for i in range(N):
        diffusers_folder(root / f"a{i:02d}", factors(i))
    (root / "labels.csv").write_text("file,label\n" + "".join(f"a{i:02d},{'cat' if i % 2 else 'dog'}\n" for i in range(N)))
    return root


@pytest.fixture(scope="module")
def clean(tree, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("clean") / "clean.zarr"
    materialize_to(store, tree, chunk_mb=0.02)  # chunks of a few adapters: several batches below
    return store


def _count_opens(monkeypatch) -> list[str]:
    opened = []
    real = fileread._open

    def counting(path, framework="numpy"):
        opened.append(Path(path).parent.name)
        return real(path, framework)

    monkeypatch.setattr(fileread, "_open", counting)
    return opened


def test_no_huggingface_cache_and_each_file_opened_once_per_split(tree, clean, tmp_path, monkeypatch):
    cache = Path(os.environ["HF_DATASETS_CACHE"])
    before = sorted(p for p in cache.rglob("*")) if cache.exists() else []
    opened = _count_opens(monkeypatch)
    store = tmp_path / "s.zarr"
    materialize_to(store, tree, chunk_mb=0.02, memory=64 * 2**10)
    assert (sorted(p for p in cache.rglob("*")) if cache.exists() else []) == before  # nothing written to the cache
    # one header read per file, then each file once for its split's copy (all modules of it at once)
    assert sorted(opened) == sorted([f"a{i:02d}" for i in range(N)] * 2)
    assert_same_arrays(store, clean)
    attrs = open_store(store).attrs
    assert {s: v["n"] for s, v in attrs["splits"].items()} == {"train": 16, "val": 2, "test": 6}
    rows = open_store(store)["index/test/row"][...]
    np.testing.assert_array_equal(open_store(store)[f"raw/test/{attrs['modules'][2]['key']}/B"][...],
                                  np.stack([factors(int(r))[Q1][1] for r in rows]))


def test_a_killed_run_resumes_at_the_next_batch(tree, clean, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    real = fileread.read_rows
    calls = []

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) in the middle of the train split
        return real(*args, **kwargs)

    monkeypatch.setattr(fileread, "read_rows", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        materialize_to(store, tree, chunk_mb=0.02, memory=64 * 2**10)
    monkeypatch.setattr(fileread, "read_rows", real)
    done = open_store(store)["raw/train"].attrs["files_progress"]
    assert done["rows"] > 0 and len(done["modules"]) == len(MODULES)
    opened = _count_opens(monkeypatch)
    materialize_to(store, tree, chunk_mb=0.02, memory=64 * 2**10)
    copied = len(opened) - N  # the header pass opens every file once
    assert copied == N - done["rows"]  # the train rows already written are not read again
    assert_same_arrays(store, clean)
    assert open_store(store)["raw/train"].attrs.get("files_progress") is None


def test_fingerprint_follows_each_file_and_verify_source_its_bytes(tree, tmp_path):
    root = tmp_path / "copy"
    for i in range(3):
        diffusers_folder(root / f"a{i}", factors(i))
    (root / "labels.csv").write_text("file,y\na0,0\na1,1\na2,2\n")
    first, by_content = open_source(str(root)).fingerprint, open_source(str(root), verify_source=True).fingerprint
    assert first != by_content
    file = root / "a1" / "pytorch_lora_weights.safetensors"
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: same bytes
    assert open_source(str(root)).fingerprint != first
    assert open_source(str(root), verify_source=True).fingerprint == by_content
    data = bytearray(file.read_bytes())
    data[-1] ^= 1  # one bit of one weight, with size and mtime put back
    file.write_bytes(bytes(data))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert open_source(str(root), verify_source=True).fingerprint != by_content


def test_verify_source_is_recorded_and_resumes(tree, tmp_path):
    store = tmp_path / "s.zarr"
    result = run_cli("materialize", "--source", tree, "--verify-source", "--store", store, "--quiet")
    assert result.exit_code == 0, result.output
    assert open_store(store).attrs["materialize_config"]["verify_source"] is True
    again = run_cli("materialize", "--store", store, "--quiet")
    assert again.exit_code == 0, again.output
    assert "0 (split, module) groups written" in run_cli("materialize", "--store", store).output


def test_token_embeddings_of_a_file_are_listed_as_ignored(tmp_path):
    from loras import save, tensors_of

    root = tmp_path / "emb"
    for i in range(2):
        save(root / f"m{i}.safetensors", {**tensors_of("diffusers", factors(i)), "<s1>": np.ones(768, np.float32)})
    (root / "labels.csv").write_text("file,y\nm0,0\nm1,1\n")
    materialize_to(tmp_path / "s.zarr", root)
    assert open_store(tmp_path / "s.zarr").attrs["ignored_columns"] == ["<s1>"]


def test_a_module_reopened_by_repair_is_read_again_whole(tree, clean, tmp_path):
    import shutil

    from pipeline import store as store_mod

    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    root = open_store(store)
    key = root.attrs["modules"][3]["key"]
    chunk = next(p for p in (store / "raw" / "train" / key / "B" / "c").rglob("*") if p.is_file())
    chunk.unlink()  # damage, then what verify --repair does: the group loses its mark
    import zarr

    store_mod.mark_incomplete(zarr.open_group(str(store), mode="r+"), f"raw/train/{key}")
    materialize_to(store, tree, chunk_mb=0.02, memory=64 * 2**10)
    assert_same_arrays(store, clean)
