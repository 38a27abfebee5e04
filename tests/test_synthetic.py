"""The built-in synthetic dataset: deterministic, SD-1.5 shaped, with the published statistics."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from pipeline.errors import PipelineError
from pipeline.synthetic import CLASS_MEMBERS, CLASSES, sd15_modules, write_synthetic


def _column(ds: datasets.Dataset, name: str, rows: int | None = None) -> np.ndarray:
    return np.asarray(ds.select_columns([name])[:rows][name], dtype=np.float32)


def _values(ds: datasets.Dataset, name: str) -> np.ndarray:
    """Every value of a matrix column, flat (statistics only need the values)."""
    return ds.data.column(name).combine_chunks().flatten().flatten().to_numpy()


def test_deterministic_for_a_seed(tmp_path, synth_ds):
    again = datasets.load_from_disk(str(write_synthetic(tmp_path / "again", n=40, rank=1, projections=("q", "v"), seed=0)))["train"]
    assert again.features == synth_ds.features
    assert again.data.table.equals(synth_ds.data.table)
    other = datasets.load_from_disk(str(write_synthetic(tmp_path / "other", n=40, rank=1, projections=("q", "v"), seed=1)))["train"]
    column = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"
    assert not np.array_equal(_column(other, column), _column(synth_ds, column))


def test_default_modules_shapes(synth_ds):
    modules = sd15_modules()
    assert len(modules) == 64
    assert sum(m.in_features + m.out_features for m in modules) == 99_648  # floats per adapter at rank 1
    total = 0
    for m in modules:
        down, up = _column(synth_ds, f"{m.name}.lora.down.weight", 2), _column(synth_ds, f"{m.name}.lora.up.weight", 2)
        assert down.shape == (2, 1, m.in_features) and up.shape == (2, m.out_features, 1)
        assert _values(synth_ds, f"{m.name}.lora.down.weight").size == 40 * m.in_features
        total += down[0].size + up[0].size
    assert total == 99_648
    assert set(synth_ds.column_names) == {f"{m.name}.lora.{r}.weight" for m in modules for r in ("down", "up")} | {
        "category_label", "category_name", "num_images", "rank"}
    assert synth_ds.features[f"{modules[0].name}.lora.down.weight"] == datasets.List(datasets.List(datasets.Value("float32")))
    assert set(synth_ds["rank"]) == {1}


def test_all_projections(tmp_path):
    modules = sd15_modules(("q", "k", "v", "out"))
    assert len(modules) == 128
    cross = [m for m in modules if ".attn2.to_k" in m.name or ".attn2.to_v" in m.name]
    assert len(cross) == 32 and all(m.in_features == 768 for m in cross)
    assert all(m.in_features == m.out_features for m in modules if m not in cross)
    assert {m.name.rsplit(".", 1)[-1] for m in modules} == {"to_q", "to_k", "to_v", "0"}

    result = run_cli("synth", "--out", tmp_path / "all", "--n", 2, "--modules", "q,k,v,out", "--quiet")
    assert result.exit_code == 0, result.output
    ds = datasets.load_from_disk(str(tmp_path / "all"))["train"]
    assert len(ds.column_names) == 2 * 128 + 4
    k = "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"
    assert _column(ds, f"{k}.lora.down.weight").shape == (2, 1, 768)
    assert _column(ds, f"{k}.lora.up.weight").shape == (2, 320, 1)


def test_statistics_and_classes(tmp_path):
    ds = datasets.load_from_disk(str(write_synthetic(tmp_path / "r4", n=80, rank=4, projections=("q",), seed=3)))["train"]
    downs, ups = [], []
    for m in sd15_modules(("q",)):
        downs.append(_values(ds, f"{m.name}.lora.down.weight"))
        ups.append(_values(ds, f"{m.name}.lora.up.weight"))
    down_std, up_std = np.concatenate(downs).std(), np.concatenate(ups).std()
    assert abs(down_std - 1 / 4) < 0.01, down_std  # A stays near its random init: std ~ 1/r
    assert 0.7e-3 < up_std < 1.5e-3, up_std  # B: std ~ 1e-3
    labels = np.asarray(ds["category_label"])
    assert sorted(set(labels)) == sorted(CLASSES) and len(CLASSES) == 10
    assert ds.features["category_label"] == datasets.Value("string")
    for label, name in zip(labels, ds["category_name"]):
        assert name in CLASS_MEMBERS[label]
    assert set(ds["rank"]) == {4}
    assert 4 <= min(ds["num_images"]) and max(ds["num_images"]) <= 16


def test_refuses_existing_output_and_bad_arguments(tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(PipelineError, match="already exists"):
        write_synthetic(tmp_path / "there", n=2)
    with pytest.raises(PipelineError, match="at least 1"):
        write_synthetic(tmp_path / "zero", n=0)
    assert not (tmp_path / "zero").exists()
    assert_one_line_error(run_cli("synth", "--out", tmp_path / "x", "--n", 2, "--modules", "q,z", "--quiet"), "unknown projection", "z")
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


def test_shards_in_save_to_disk_layout_equal_one_file(tmp_path, monkeypatch):
    """Written straight as save_to_disk shards: several shards hold the same rows as one file."""
    import pipeline.loraws as loraws

    one = datasets.load_from_disk(str(write_synthetic(tmp_path / "one", n=300, projections=("q",), seed=2)))["train"]
    monkeypatch.setattr(loraws, "SHARD_BYTES", 1)  # one _BATCH per shard
    many = datasets.load_from_disk(str(write_synthetic(tmp_path / "many", n=300, projections=("q",), seed=2)))["train"]
    assert [f["filename"].rsplit("/", 1)[1] for f in many.cache_files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert many.features == one.features and many.data.equals(one.data)
    assert not list(tmp_path.glob(".*partial*"))


def test_mapped_table_is_the_dataset_table(tmp_path, monkeypatch):
    """arrowio.mapped_table reopens the files as one table, equal to the dataset's own, and falls back when it must."""
    import pipeline.loraws as loraws
    from pipeline.arrowio import mapped_table

    monkeypatch.setattr(loraws, "SHARD_BYTES", 1)
    ds = datasets.load_from_disk(str(write_synthetic(tmp_path / "s", n=300, projections=("q",), seed=2)))["train"]
    fresh = mapped_table(ds)
    assert fresh is not ds.data and fresh.equals(ds.data.table)
    in_memory = datasets.Dataset.from_dict({"x": [[[1.0]], [[2.0]]]})
    assert mapped_table(in_memory) is in_memory.data
    selected = ds.select([5, 3])
    assert mapped_table(selected) is selected.data


def test_builtin_dataset_is_made_once_under_the_builtin_home_and_prints_nothing(tmp_path, monkeypatch, capsys):
    from pipeline import synthetic

    monkeypatch.setattr(synthetic, "BUILTIN", {**synthetic.BUILTIN, "n": 6})
    monkeypatch.setenv("PIPELINE_BUILTIN_HOME", str(tmp_path / "home"))
    said = []
    path = synthetic.builtin_dataset(on_generate=lambda where, n: said.append((where, n)))
    assert path.parent == tmp_path / "home" and said == [(path, 6)]
    assert datasets.load_from_disk(str(path))["train"].num_rows == 6
    assert synthetic.builtin_dataset(on_generate=lambda where, n: said.append((where, n))) == path and len(said) == 1
    assert synthetic.builtin_dataset(tmp_path / "elsewhere") == tmp_path / "elsewhere" / path.name
    assert capsys.readouterr() == ("", "")  # library code is silent: the CLI says what it does
