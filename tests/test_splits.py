"""Split row indices: the original experiment's split remade exactly, or the source's own splits kept."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.splits import original_split, plan_splits


def _by_datasets(n: int, test_size=0.3, val_test_size=0.67, seed=42) -> dict[str, np.ndarray]:
    table = datasets.Dataset.from_dict({"i": np.arange(n), "x": np.arange(n) * 2.0})
    first = table.train_test_split(test_size=test_size, seed=seed)
    second = first["test"].train_test_split(test_size=val_test_size, seed=seed)
    return {"train": np.asarray(first["train"]["i"]), "val": np.asarray(second["train"]["i"]), "test": np.asarray(second["test"]["i"])}


@pytest.mark.parametrize("n", [11, 12, 40, 97, 1000])
def test_original_split_equals_datasets(n):
    made = original_split(n)
    expected = _by_datasets(n)
    assert list(made) == ["train", "val", "test"]
    for name in expected:
        assert made[name].dtype == np.int64
        np.testing.assert_array_equal(made[name], expected[name])
    every = np.concatenate(list(made.values()))
    np.testing.assert_array_equal(np.sort(every), np.arange(n))  # a partition


def test_original_split_options_are_passed():
    made = original_split(50, test_size=0.5, val_test_size=0.2, seed=3)
    for name, rows in _by_datasets(50, 0.5, 0.2, 3).items():
        np.testing.assert_array_equal(made[name], rows)
    assert not np.array_equal(made["train"], original_split(50)["train"])


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_ten_rows_or_fewer_use_every_row_everywhere(n):
    made = original_split(n)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(made[name], np.arange(n))
    made["train"][0] = 99  # independent arrays
    assert made["val"][0] == 0


def test_plan_splits_single_source_split():
    plans = plan_splits({"train": 40}, 0.3, 0.67, 42)
    assert [(p.name, p.source_split) for p in plans] == [("train", "train"), ("val", "train"), ("test", "train")]
    for p, (name, rows) in zip(plans, _by_datasets(40).items()):
        np.testing.assert_array_equal(p.rows, rows)


def test_plan_splits_keeps_source_splits_in_order():
    plans = plan_splits({"test": 3, "extra": 2, "validation": 4, "train": 5}, 0.3, 0.67, 42)
    assert [(p.name, p.source_split, p.rows.tolist()) for p in plans] == [
        ("train", "train", [0, 1, 2, 3, 4]), ("val", "validation", [0, 1, 2, 3]), ("test", "test", [0, 1, 2]), ("extra", "extra", [0, 1]),
    ]


@pytest.mark.parametrize("sizes, fragment", [
    ({}, "no splits"),
    ({"train": 0}, "has no rows"),
    ({"train": 5, "test": 0}, "'test' has no rows"),
])
def test_plan_splits_errors(sizes, fragment):
    with pytest.raises(PipelineError, match=fragment):
        plan_splits(sizes, 0.3, 0.67, 42)


def test_split_names_from_the_data_cannot_escape_the_store():
    plans = plan_splits({"../../evil": 3, "train": 5, "a/b": 2}, 0.3, 0.67, 42)
    assert {p.name for p in plans} == {"train", "_.._evil", "a_b"}
    assert {p.source_split for p in plans} == {"../../evil", "train", "a/b"}


# --- small and odd splits: said loudly, refused with --min-split (issue 15 §5) -----------------------


def _adapters(tmp_path, n: int, labels):
    from loras import MODULES, factors, save, tensors_of

    root = tmp_path / "loras"
    for i in range(n):
        save(root / f"m{i:02d}.safetensors", tensors_of("diffusers", factors(i % 4, modules=MODULES[:1])))
    (root / "labels.csv").write_text("file,label\n" + "".join(f"m{i:02d},{labels(i)}\n" for i in range(n)))
    return root


def test_sixteen_adapters_warn_of_a_one_row_split_and_missing_classes(tmp_path):
    from conftest import run_cli

    root = _adapters(tmp_path, 16, lambda i: "cat" if i % 2 else "dog")
    result = run_cli("materialize", "--source", root, "--store", tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert any("fewer than 10 adapters (val 1, test 4)" in w for w in warnings), result.output
    assert any("label 'label': class" in w and "has no adapter in split 'val'" in w for w in warnings), result.output
    quiet = run_cli("materialize", "--source", root, "--store", tmp_path / "q.zarr", "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_min_split_makes_it_an_error_with_nothing_written(tmp_path):
    from conftest import assert_one_line_error, run_cli

    root = _adapters(tmp_path, 16, lambda i: "cat" if i % 2 else "dog")
    store = tmp_path / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", root, "--store", store, "--min-split", "2", "--quiet"),
                          "val 1", "refused: --min-split 2")
    assert not store.exists()
    ok = run_cli("materialize", "--source", root, "--store", store, "--min-split", "1", "--test-size", "0.5", "--val-test-size", "0.67", "--quiet")
    assert ok.exit_code == 0, ok.output  # 8 / 2 / 6 with both classes everywhere
    assert_one_line_error(run_cli("materialize", "--source", root, "--store", tmp_path / "t.zarr", "--min-split", "0", "--quiet"),
                          "--min-split 0 is not a whole number")


def test_ten_rows_or_fewer_say_every_row_is_everywhere(tmp_path):
    from conftest import run_cli

    root = _adapters(tmp_path, 6, lambda i: "cat" if i % 2 else "dog")
    result = run_cli("materialize", "--source", root, "--store", tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    assert "warning: the source has 6 adapters (10 or fewer): every adapter is in train, val and test" in result.output


def test_a_name_per_adapter_is_not_a_class_label():
    from pipeline.splits import SplitPlan, split_warnings

    splits = [SplitPlan(n, "train", np.arange(20, dtype=np.int64)) for n in ("train", "val", "test")]
    assert split_warnings(splits, {}, None) == []
    notes = split_warnings(splits, {"label": {"train": {"a", "b"}, "val": {"a"}, "test": {"a", "b"}}}, None)
    assert notes == ["label 'label': class 'b' has no adapter in split 'val'; that split cannot score it"]
    with pytest.raises(PipelineError, match="refused: --min-split 30"):
        split_warnings(splits, {}, 30)
