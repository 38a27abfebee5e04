"""Adapters as people keep them (issue 15 §1): every folder layout and label source, on files derived from the real
LoRA files (tests/loras.py), and each bad input as one error line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, materialize_to, open_store, run_cli

from loras import MODULES, diffusers_folder, factors, keys, peft_folder, save, tensors_of

from pipeline.layers import safe_key
from pipeline.sources import open_source

Q1 = f"{MODULES[2]}"  # attn1.to_q of the first block


def _ids(store, split="train") -> list[str]:
    return [str(v) for v in open_store(store)[f"index/{split}/model_id"][...]]


def _classes(store, column="label", split="train") -> list[str]:
    root = open_store(store)
    classes = root.attrs["labels"][column]["classes"]
    return [classes[c] for c in root[f"labels/{split}/{column}"][...]]


def _stored_A(store, module_name, split="train") -> np.ndarray:
    root = open_store(store)
    key = next(m["key"] for m in root.attrs["modules"] if m["name"].endswith(module_name))
    return root[f"raw/{split}/{key}/A"][...]


def _stored_B(store, module_name, split="train") -> np.ndarray:
    root = open_store(store)
    key = next(m["key"] for m in root.attrs["modules"] if m["name"].endswith(module_name))
    return root[f"raw/{split}/{key}/B"][...]


# --- one folder per adapter -------------------------------------------------------------------------


def test_diffusers_folder_per_adapter_with_csv_by_folder_name(tmp_path):
    root = tmp_path / "loras"
    for i in range(3):
        diffusers_folder(root / f"a{i}", factors(i))
    (root / "labels.csv").write_text("file,style\na0,anime\na1,photo\na2,anime\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert _ids(store) == ["a0", "a1", "a2"]
    assert _classes(store, "style") == ["anime", "photo", "anime"]
    np.testing.assert_array_equal(_stored_B(store, Q1), np.stack([factors(i)[Q1][1] for i in range(3)]))
    assert {m["scheme"] for m in open_store(store).attrs["modules"]} == {"diffusers"}
    assert len(open_store(store).attrs["modules"]) == len(MODULES)


def test_peft_folders_at_depth_with_jsonl_labels(tmp_path):
    root = tmp_path / "runs"
    for i in range(3):
        peft_folder(root / "sd15" / f"run-{i}", factors(i), r=4, lora_alpha=4)
    (root / "labels.jsonl").write_text("".join(json.dumps({"file": f"run-{i}", "num_images": 4 + i}) + "\n" for i in range(3)))
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert _ids(store) == ["sd15/run-0", "sd15/run-1", "sd15/run-2"]
    np.testing.assert_array_equal(open_store(store)["labels/train/num_images"][...], [4, 5, 6])
    assert {m["scheme"] for m in open_store(store).attrs["modules"]} == {"peft"}


def test_kohya_files_in_label_folders(tmp_path):
    root = tmp_path / "kohya"
    for i, label in enumerate(["cat", "dog", "cat", "dog"]):
        save(root / label / f"k{i}.safetensors", tensors_of("kohya", factors(i), alpha=4.0))
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert _ids(store) == ["cat/k0.safetensors", "cat/k2.safetensors", "dog/k1.safetensors", "dog/k3.safetensors"]
    assert _classes(store) == ["cat", "cat", "dog", "dog"]
    np.testing.assert_array_equal(_stored_A(store, "attn1_to_q"), np.stack([factors(i)[Q1][0] for i in (0, 2, 1, 3)]))


def test_a_labels_path_names_an_adapter_only_where_its_folders_agree(tmp_path):
    """A path written from elsewhere (absolute, or below another folder) finds the adapter whose own path ends it;
    one whose folders disagree (``dog/k0`` for ``cat/k0``) names no adapter: refused, never the other one."""
    root = tmp_path / "kohya"
    for i, label in enumerate(["cat", "dog"]):
        save(root / label / f"k{i}.safetensors", tensors_of("kohya", factors(i)))
    (root / "labels.csv").write_text(f"file,score\n{root}/cat/k0.safetensors,1\n/elsewhere/dog/k1.safetensors,2\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert _ids(store) == ["cat/k0.safetensors", "dog/k1.safetensors"]
    np.testing.assert_array_equal(open_store(store)["labels/train/score"][...], [1, 2])
    (root / "labels.csv").write_text("file,score\ndog/k0.safetensors,1\ndog/k1.safetensors,2\n")
    result = run_cli("materialize", "--source", root, "--store", tmp_path / "t.zarr", "--quiet")
    assert_one_line_error(result, "no row in labels.csv", "cat/k0.safetensors")  # its row named another folder
    assert not (tmp_path / "t.zarr").exists()


def test_folder_labels_and_a_labels_file_together(tmp_path):
    root = tmp_path / "loras"
    for i, label in enumerate(["cat", "dog", "cat"]):
        diffusers_folder(root / label / f"a{i}", factors(i))
    (root / "labels.json").write_text(json.dumps({"a0": {"steps": 100}, "a1": {"steps": 200}, "a2": {"steps": 300.5}}))
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert _ids(store) == ["cat/a0", "cat/a2", "dog/a1"]
    assert _classes(store) == ["cat", "cat", "dog"]
    np.testing.assert_array_equal(open_store(store)["labels/train/steps"][...], [100.0, 300.5, 200.0])


@pytest.mark.parametrize("key", ["m1", "m1.safetensors", "./m1.safetensors", "/somewhere/else/m1.safetensors"])
def test_labels_keyed_with_or_without_extension(tmp_path, key):
    root = tmp_path / "flat"
    for i in range(2):
        save(root / f"m{i}.safetensors", tensors_of("diffusers", factors(i)))
    (root / "labels.csv").write_text(f"file,y\nm0,1\n{key},2\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    np.testing.assert_array_equal(open_store(store)["labels/train/y"][...], [1, 2])


# --- split folders ----------------------------------------------------------------------------------


def _split_tree(root: Path, counts=(("train", 6), ("val", 2), ("test", 3))) -> dict[str, list[int]]:
    made, i = {}, 0
    for split, n in counts:
        made[split] = []
        for _ in range(n):
            diffusers_folder(root / split / ("cat" if i % 2 else "dog") / f"m{i:02d}", factors(i))
            made[split].append(i)
            i += 1
    return made


def test_split_folders_are_kept_with_folder_labels(tmp_path):
    root = tmp_path / "tree"
    made = _split_tree(root)
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    attrs = open_store(store).attrs
    assert {s: v["n"] for s, v in attrs["splits"].items()} == {"train": 6, "val": 2, "test": 3}
    assert attrs["splits"]["val"]["source_split"] == "validation"
    for split, members in made.items():
        order = sorted(members, key=lambda i: ("cat" if i % 2 else "dog", i))
        assert _ids(store, split) == [f"{'cat' if i % 2 else 'dog'}/m{i:02d}" for i in order]
        np.testing.assert_array_equal(_stored_B(store, Q1, split), np.stack([factors(i)[Q1][1] for i in order]))


def test_imagefolder_metadata_per_split_folder(tmp_path):
    root = tmp_path / "tree"
    for split, ids in (("train", [0, 1, 2]), ("test", [3, 4])):
        rows = []
        for i in ids:
            diffusers_folder(root / split / f"m{i}", factors(i))
            rows.append({"file_name": f"m{i}/pytorch_lora_weights.safetensors", "concept": f"c{i % 2}"})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = open_source(str(root))
    assert {k: v.num_rows for k, v in source.splits.items()} == {"train": 3, "test": 2}
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert _classes(store, "concept", "test") == ["c1", "c0"]


def test_split_column_gives_the_splits(tmp_path):
    root = tmp_path / "flat"
    rows = ["file,label,split"]
    for i in range(12):
        save(root / f"m{i:02d}.safetensors", tensors_of("diffusers", factors(i)))
        rows.append(f"m{i:02d}.safetensors,{'cat' if i % 2 else 'dog'},{['train', 'validation', 'test'][i % 3]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "s.zarr"
    result = run_cli("materialize", "--source", root, "--split-column", "split", "--store", store, "--quiet")
    assert result.exit_code == 0, result.output
    attrs = open_store(store).attrs
    assert {s: v["n"] for s, v in attrs["splits"].items()} == {"train": 4, "val": 4, "test": 4}
    assert "split" not in attrs["labels"]
    assert _ids(store, "val") == [f"m{i:02d}.safetensors" for i in (1, 4, 7, 10)]
    assert attrs["materialize_config"]["split_column"] == "split"
    again = run_cli("materialize", "--store", store, "--quiet")  # the recorded options resume it as it was made
    assert again.exit_code == 0, again.output


def test_without_split_column_a_split_label_is_said(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        save(root / f"m{i}.safetensors", tensors_of("diffusers", factors(i)))
    (root / "labels.csv").write_text("file,split\nm0,train\nm1,test\nm2,train\n")
    assert any("--split-column split" in note for note in open_source(str(root)).notes)


# --- what is refused, in one line, with nothing written ---------------------------------------------


def _refused(tmp_path, root, *fragments, options=()):
    store = tmp_path / "s.zarr"
    line = assert_one_line_error(run_cli("materialize", "--source", root, "--store", store, "--quiet", *options), *fragments)
    assert not store.exists()
    return line


def test_a_folder_of_no_known_layout_says_what_it_looked_for_and_found(tmp_path):
    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    (root / "a" / "pytorch_lora_weights.bin").write_bytes(b"x")
    (root / "a" / "readme.md").write_text("hi")
    line = _refused(tmp_path, root, "holds no dataset", "pytorch_lora_weights.safetensors", "adapter_model.safetensors",
                    "train/ val/ test/", "found 1 folder(s) and 2 file(s)", ".bin")
    assert "1 .bin" in line


def test_truncated_adapter_file(tmp_path):
    root = tmp_path / "loras"
    for i in range(3):
        diffusers_folder(root / f"a{i}", factors(i))
    data = (root / "a1" / "pytorch_lora_weights.safetensors").read_bytes()
    (root / "a1" / "pytorch_lora_weights.safetensors").write_bytes(data[: len(data) // 2])
    (root / "labels.csv").write_text("file,y\na0,1\na1,2\na2,3\n")
    _refused(tmp_path, root, "cannot read safetensors file", "a1")


def test_a_file_whose_keys_match_no_scheme(tmp_path):
    root = tmp_path / "loras"
    save(root / "good.safetensors", tensors_of("diffusers", factors(0)))
    save(root / "odd.safetensors", {"model.weight": np.ones((3, 3), np.float32), "model.bias": np.ones(3, np.float32)})
    (root / "labels.csv").write_text("file,y\ngood,1\nodd,2\n")
    _refused(tmp_path, root, "odd.safetensors holds no LoRA tensors", "'model.bias'", "matches no naming scheme")


def test_two_schemes_mixed_in_one_dataset(tmp_path):
    root = tmp_path / "loras"
    save(root / "d.safetensors", tensors_of("diffusers", factors(0)))
    save(root / "k.safetensors", tensors_of("kohya", factors(1)))
    (root / "labels.csv").write_text("file,y\nd,1\nk,2\n")
    _refused(tmp_path, root, "mix naming schemes", "'d.safetensors' is diffusers", "'k.safetensors' is kohya")


def test_labels_missing_for_some_adapters(tmp_path):
    root = tmp_path / "loras"
    for i in range(3):
        diffusers_folder(root / f"a{i}", factors(i))
    (root / "labels.csv").write_text("file,y\na0,1\na2,3\n")
    _refused(tmp_path, root, "1 adapter file(s) have no row in labels.csv", "'a1'")


def test_folder_labels_missing_for_some_adapters(tmp_path):
    root = tmp_path / "loras"
    save(root / "cat" / "a.safetensors", tensors_of("diffusers", factors(0)))
    save(root / "b.safetensors", tensors_of("diffusers", factors(1)))
    _refused(tmp_path, root, "1 adapters lie in <label>/ folders and 1 do not", "'b.safetensors'")


def test_duplicate_ids_in_the_labels(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        diffusers_folder(root / split / "a1", factors(0))
    (root / "labels.csv").write_text("file,y\na1,1\n")
    _refused(tmp_path, root, "names 'a1', which fits 2 adapters", "train/a1", "test/a1", "key them by their path")


def test_two_rows_naming_one_adapter(tmp_path):
    root = tmp_path / "flat"
    for i in range(2):
        save(root / f"m{i}.safetensors", tensors_of("diffusers", factors(i)))
    (root / "labels.csv").write_text("file,y\nm0,1\nm1,2\nm0.safetensors,3\n")
    _refused(tmp_path, root, "rows 2 and 4", "both name adapter 'm0.safetensors'")


@pytest.mark.parametrize("case, fragments", [
    ("peft-without-config", ("adapter_model.safetensors but no adapter_config.json",)),
    ("two-adapter-files", ("one adapter or several",)),
    ("outside-split-folders", ("split folders", "adapters outside them", "'stray.safetensors'")),
    ("no-labels", ("no labels CSV, JSON or JSONL file and no <label>/ folders",)),
    ("split-column-unknown", ("--split-column 'fold' is not a labels column",)),
    ("bad-json", ("labels JSON", "not valid JSON")),
])
def test_layout_errors(tmp_path, case, fragments):
    root = tmp_path / "loras"
    diffusers_folder(root / "train" / "a0", factors(0)) if case == "outside-split-folders" else diffusers_folder(root / "a0", factors(0))
    options = ()
    if case == "peft-without-config":
        save(root / "p" / "adapter_model.safetensors", tensors_of("peft", factors(1)))
    elif case == "two-adapter-files":
        save(root / "a0" / "adapter_model.safetensors", tensors_of("peft", factors(1)))
    elif case == "outside-split-folders":
        save(root / "stray.safetensors", tensors_of("diffusers", factors(1)))
    elif case == "split-column-unknown":
        options = ("--split-column", "fold")
    elif case == "bad-json":
        (root / "labels.json").write_text("{not json")
    if case not in ("no-labels", "bad-json"):
        (root / "labels.csv").write_text("file,y\na0,1\np,2\n" if case == "peft-without-config" else "file,y\na0,1\n")
    _refused(tmp_path, root, *fragments, options=options)


def test_checkpoints_inside_an_adapter_folder_are_not_adapters(tmp_path):
    """A diffusers training output: the final weights, plus checkpoint-N/ folders with their own copies."""
    root = tmp_path / "outputs"
    for i in range(2):
        diffusers_folder(root / f"run{i}", factors(i))
        diffusers_folder(root / f"run{i}" / "checkpoint-500", factors(i + 5))
    (root / "labels.csv").write_text("file,y\nrun0,1\nrun1,2\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert _ids(store) == ["run0", "run1"]
    np.testing.assert_array_equal(_stored_B(store, Q1), np.stack([factors(i)[Q1][1] for i in range(2)]))


def test_flat_folder_fingerprint_is_what_it_was(tmp_path):
    """A store made from a flat folder before this layout code must still resume: same fingerprint formula."""
    import hashlib

    from pipeline.sources import _digest

    root = tmp_path / "flat"
    for i in range(2):
        save(root / f"m{i}.safetensors", tensors_of("diffusers", factors(i)))
    (root / "labels.csv").write_text("file,y\nm0.safetensors,1\nm1.safetensors,2\n")
    files = sorted(root.glob("*.safetensors"))
    old = _digest({"kind": "safetensors", "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                   "csv": hashlib.sha256((root / "labels.csv").read_bytes()).hexdigest()})
    assert open_source(str(root)).fingerprint == old


def test_keys_helper_matches_the_real_kohya_names():
    assert keys("kohya", MODULES[0])[0] == "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k_lora_down.weight"
    assert safe_key("a b") == "a_b"


def test_a_peft_source_has_one_fingerprint_however_its_path_is_typed(tmp_path, monkeypatch):
    """The store records the source as an absolute path: `materialize --store S` alone must find the same
    fingerprint a relative --source gave (the peft configs were once fingerprinted by the path as typed)."""
    root = tmp_path / "pv"
    for i in range(2):
        peft_folder(root / f"a{i}", factors(i), r=4, lora_alpha=8)
    (root / "labels.csv").write_text("file,y\na0,0\na1,1\n")
    monkeypatch.chdir(tmp_path)
    assert open_source("pv").fingerprint == open_source(str(root)).fingerprint
