"""The public Python API: what `pipeline` exports, and the readers (open_features, open_raw, load_runs,
load_predictions) against the raw zarr arrays, on local, read-only, personal (--output), memory:// and S3 stores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import pipeline
from conftest import SMALL_TRAIN, file_snapshot, run_cli
from pipeline import representations
from pipeline.errors import PipelineError
from pipeline.features import FeaturesConfig, compute_features
from pipeline.train import TrainConfig, train
from test_readonly import shared  # noqa: F401 - the read-only copy of trained_small (a fixture)
from test_remote import s3  # noqa: F401 - the S3 server (a fixture; this module's own when it starts one)

ROOT = Path(__file__).resolve().parents[1]
TEAMMATE = {**SMALL_TRAIN, "lr": 1e-2}  # the same representation and layers as trained_small's run, another lr


@pytest.fixture(scope="module")
def api_store(trained_small, tmp_path_factory) -> Path:
    """trained_small plus simple_stats (a tensor representation) and a teammate's configuration of dw_norms."""
    path = tmp_path_factory.mktemp("api") / "api.zarr"
    shutil.copytree(trained_small, path)
    compute_features(FeaturesConfig(store=str(path), reps="simple_stats", quiet=True))
    train(TrainConfig(store=str(path), **TEAMMATE))
    return path


def open_root(path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r")


# --- the package's surface ------------------------------------------------------------------------------


def test_the_package_exports_the_stages_and_readers():
    stages = {"materialize": "MaterializeConfig", "compute_features": "FeaturesConfig", "train": "TrainConfig"}
    for function, config in stages.items():
        assert callable(getattr(pipeline, function)) and isinstance(getattr(pipeline, config), type)
    for name in ("write_report", "open_features", "open_raw", "load_runs", "load_predictions"):
        assert callable(getattr(pipeline, name)), name
    assert set(pipeline.__all__) <= set(dir(pipeline))
    # the functions, although their submodules are imported (this module imports pipeline.train)
    assert pipeline.train is train and pipeline.materialize.__module__ == "pipeline.materialize"
    with pytest.raises(AttributeError):
        pipeline.nothing_here  # noqa: B018


def test_importing_pipeline_is_cheap():
    """No torch, datasets, xarray, dask or zarr until a name that needs them is used; the submodule import
    does not turn the stage function into a module."""
    script = ("import sys; import pipeline; heavy = [m for m in ('torch', 'datasets', 'xarray', 'dask', 'zarr') if m in sys.modules]; "
              "assert not heavy, heavy; from pipeline.train import TrainConfig; assert callable(pipeline.train), pipeline.train; "
              "assert pipeline.TrainConfig is TrainConfig")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


# --- feature names: one definition beside each representation -------------------------------------------

SHAPES = {"tensor": [(1, 16), (4, 24), (40, 4), (2, 3), (12, 16)], "module": [(1, 16, 24), (4, 24, 40), (8, 12, 12)]}
VARIANTS = [("dw_spectrum", {"k": 3}), ("dw_probe", {"count": 5, "seed": 1}), ("dw_canonical", {"k": 2})]


def _inputs(rep, shape, n=3):
    g = torch.Generator().manual_seed(0)
    if rep.kind == "tensor":
        return (torch.randn(n, *shape, generator=g),)
    r, fan_in, fan_out = shape
    return torch.randn(n, r, fan_in, generator=g), 1e-2 * torch.randn(n, fan_out, r, generator=g), torch.ones(n)


@pytest.mark.parametrize("name", list(representations.REGISTRY))
def test_feature_names_match_every_output(name):
    base = representations.get(name)
    variants = [base] + [representations.from_spec({**base.spec(), "configuration": c}) for n, c in VARIANTS if n == name]
    for rep in variants:
        names = rep.feature_names()
        assert len(names) == rep.width == len(set(names)) and all(isinstance(n, str) and n for n in names)
        for shape in SHAPES[rep.kind]:
            assert rep(*_inputs(rep, shape)).shape == (3, len(names)), (rep.spec(), shape)


def test_feature_names_say_what_each_column_is():
    x = torch.randn(4, 6, 9, generator=torch.Generator().manual_seed(3))
    column = lambda rep, feature: rep(x)[:, rep.feature_names().index(feature)]  # noqa: E731
    simple, spectral = representations.get("simple_stats"), representations.get("spectral")
    assert simple.feature_names() == ["l2", "mean", "std", "max", "min"]
    torch.testing.assert_close(column(simple, "l2"), torch.linalg.vector_norm(x.flatten(1), dim=1))
    torch.testing.assert_close(column(simple, "max"), x.flatten(1).amax(1))
    singular = torch.linalg.svdvals(x)
    torch.testing.assert_close(column(spectral, "s0"), singular[:, 0])
    torch.testing.assert_close(column(spectral, "sum"), singular.sum(1))
    torch.testing.assert_close(column(spectral, "gap0"), (singular[:, 0] - singular[:, 1]) / (singular[:, 0] + 1e-8))
    torch.testing.assert_close(column(representations.get("rank_based"), "q50"), x.flatten(1).quantile(0.5, dim=1))
    ensemble = representations.get("ensemble")  # its names are its parts', prefixed: the same numbers
    for part in representations.ENSEMBLE_PARTS:
        rep = representations.get(part)
        for feature in rep.feature_names():
            torch.testing.assert_close(column(ensemble, f"{part}.{feature}"), column(rep, feature))
    A, B, scale = _inputs(representations.get("dw_norms"), (4, 24, 40))
    dw = B @ A
    norms = representations.get("dw_norms")(A, B, scale)
    names = representations.get("dw_norms").feature_names()
    torch.testing.assert_close(norms[:, names.index("fro")], torch.linalg.matrix_norm(dw))
    torch.testing.assert_close(norms[:, names.index("spectral")], torch.linalg.matrix_norm(dw, ord=2))
    canonical = representations.get("dw_canonical")
    out, names = canonical(A, B, scale), canonical.feature_names()
    for j in range(canonical.params.k):  # component-major, u before v: min <= mean <= max per factor
        for side in "uv":
            lo, mean, hi = (out[:, names.index(f"{side}{j}_{stat}")] for stat in ("min", "mean", "max"))
            assert bool((lo <= mean + 1e-7).all() and (mean <= hi + 1e-7).all())


def test_registering_a_representation_without_feature_names_is_refused():
    unnamed = representations.Representation("unnamed", 1, "tensor", 5, "none", representations.NoParams(),
                                             representations.simple_stats)
    with pytest.raises(ValueError, match="names none"):
        representations.register(unnamed)
    with pytest.raises(ValueError, match="feature names"):
        representations.Representation("x", 1, "tensor", 5, "none", representations.NoParams(), representations.simple_stats,
                                       features=("a", "b"))
    assert "unnamed" not in representations.REGISTRY


# --- open_features ---------------------------------------------------------------------------------------


def test_open_features_labels_every_axis(api_store):
    root = open_root(api_store)
    ds = pipeline.open_features(str(api_store))  # split="train"
    assert set(ds.data_vars) == {"dw_norms", "simple_stats"}
    assert ds.dw_norms.dims == ("adapter", "module", "dw_norms_feature")
    assert ds.simple_stats.dims == ("adapter", "layer", "simple_stats_feature")
    assert list(ds.simple_stats_feature.values) == ["l2", "mean", "std", "max", "min"]
    assert list(ds.dw_norms_feature.values) == representations.get("dw_norms").feature_names()
    assert list(ds.module.values) == [m["name"] for m in root.attrs["modules"]]
    assert list(ds.layer.values) == [layer["name"] for layer in root.attrs["layers"]]
    assert list(ds.layer_role.values) == [layer["role"] for layer in root.attrs["layers"]]
    assert ds.dw_norms.attrs["axis"].startswith("module:") and ds.simple_stats.attrs["axis"].startswith("layer:")
    # the adapter id: the source row (this source has no id column, and its splits come from one source split)
    np.testing.assert_array_equal(ds.adapter.values, root["index/train/row"][:])
    assert ds.indexes["adapter"].is_unique and set(ds.split.values) == {"train"}
    # lazy, and the stored values
    assert isinstance(ds.dw_norms.data, type(ds.simple_stats.data)) and hasattr(ds.dw_norms.data, "dask")
    np.testing.assert_array_equal(ds.dw_norms.values, root["features/train/dw_norms"][:])
    np.testing.assert_array_equal(ds.simple_stats.sel(simple_stats_feature="l2").values,
                                  root["features/train/simple_stats"][:, :, 0])


def test_open_features_decodes_labels(api_store):
    root = open_root(api_store)
    ds = pipeline.open_features(str(api_store), "test")
    codes = root["labels/test/category_label"][:]
    classes = root.attrs["labels"]["category_label"]["classes"]
    label = ds.category_label
    assert list(label.values) == [classes[c] for c in codes]
    assert label.attrs["classes"] == classes and label.attrs["flag_values"] == list(range(len(classes)))
    assert label.attrs["flag_meanings"].split() == [c.replace(" ", "_") for c in classes]
    assert "Siamese_cat" in ds.category_name.attrs["flag_meanings"].split()  # a class name with a space: one CF word
    np.testing.assert_array_equal(ds.num_images.values, root["labels/test/num_images"][:])  # integer labels as they are
    # the codes back from the names, the pandas way
    import pandas as pd

    np.testing.assert_array_equal(pd.Categorical(label.values, categories=label.attrs["classes"]).codes, codes)


def test_open_features_of_several_splits(api_store):
    root = open_root(api_store)
    every = pipeline.open_features(str(api_store), "all", reps=["dw_norms"])
    assert list(every.data_vars) == ["dw_norms"] and "layer" not in every.dims
    sizes = {s: root.attrs["splits"][s]["n"] for s in ("train", "val", "test")}
    assert every.sizes["adapter"] == sum(sizes.values()) and every.indexes["adapter"].is_unique
    assert list(every.split.values) == [s for s, n in sizes.items() for _ in range(n)]
    np.testing.assert_array_equal(every.sel(adapter=every.split == "val").dw_norms.values, root["features/val/dw_norms"][:])
    two = pipeline.open_features(str(api_store), ["test", "train"], reps="simple_stats")
    assert list(dict.fromkeys(two.split.values)) == ["test", "train"]
    assert pipeline.open_features(str(api_store), "train,test").sizes["adapter"] == sizes["train"] + sizes["test"]
    labels_only = pipeline.open_features(str(api_store), "val", reps=[])
    assert not labels_only.data_vars and list(labels_only.category_label.values)


def test_open_features_refuses_what_is_not_there_in_one_line(api_store, tmp_path):
    with pytest.raises(PipelineError, match="no split 'nope'; it has train, val, test"):
        pipeline.open_features(str(api_store), "nope")
    with pytest.raises(PipelineError, match="unknown representation 'nope'"):
        pipeline.open_features(str(api_store), reps="nope")
    with pytest.raises(PipelineError, match=r"'spectral' is not complete in train.*pipeline features --store .* --rep spectral"):
        pipeline.open_features(str(api_store), reps="spectral")
    copy = tmp_path / "copy.zarr"
    shutil.copytree(api_store, copy)
    array = zarr.open_group(str(copy), mode="r+")["features/val/simple_stats"]
    array.attrs.put({**array.attrs.asdict(), "complete": False})  # being computed: left out, and said so
    ds = pipeline.open_features(str(copy), "all")
    assert "simple_stats" not in ds and "simple_stats: not complete in val" in ds.attrs["left_out"]
    with pytest.raises(PipelineError, match="'simple_stats' is not complete in val"):
        pipeline.open_features(str(copy), "all", reps="simple_stats")
    (copy / "features/test/dw_norms/c/0/0/0").unlink()
    with pytest.raises(PipelineError, match="features/test/dw_norms/c/0/0/0 .*missing.*pipeline verify"):
        pipeline.open_features(str(copy), "test")


def test_open_features_ids_are_the_sources_names_when_it_has_them(tmp_path):
    from conftest import lora_rows, materialize_to, save_matrix_dataset

    n = 12
    columns = lora_rows(n)
    extra = {"file": [f"adapter-{i:02d}.safetensors" for i in range(n)], "kind": ["a", "b"] * (n // 2)}
    import datasets

    source = save_matrix_dataset(tmp_path / "src", columns, extra=extra,
                                 extra_features={"file": datasets.Value("string"), "kind": datasets.Value("string")})
    path = tmp_path / "named.zarr"
    materialize_to(path, source)
    compute_features(FeaturesConfig(store=str(path), reps="dw_norms", quiet=True))
    ds = pipeline.open_features(str(path), "all")
    root = open_root(path)
    assert sorted(ds.adapter.values) == extra["file"]
    np.testing.assert_array_equal(ds.sel(adapter=ds.split == "train").adapter.values, root["index/train/model_id"][:])
    assert ds.sel(adapter="adapter-03.safetensors").row.item() == 3
    assert ds.sel(adapter="adapter-03.safetensors").kind.item() == "b"


# --- open_raw ----------------------------------------------------------------------------------------------


def test_open_raw_gives_the_factors_lazily(api_store):
    root = open_root(api_store)
    raw = pipeline.open_raw(str(api_store), "val")
    assert list(raw) == [m["name"] for m in root.attrs["modules"]]
    module = root.attrs["modules"][0]
    one = raw[module["name"]]
    assert one.A.dims == ("adapter", "rank", "in") and one.B.dims == ("adapter", "out", "rank") and hasattr(one.A.data, "dask")
    np.testing.assert_array_equal(one.A.values, root[f"raw/val/{module['key']}/A"][:])
    np.testing.assert_array_equal(one.B.values, root[f"raw/val/{module['key']}/B"][:])
    np.testing.assert_array_equal(one.adapter.values, root["index/val/row"][:])
    assert (one.scale.values == 1).all() and (one.true_rank.values == module["rank"]).all()
    # the user's own representation from the factors equals the stored one
    dw = one.scale.values[:, None, None] * (one.B.values @ one.A.values)
    stored = pipeline.open_features(str(api_store), "val", reps="dw_norms").dw_norms
    np.testing.assert_allclose(np.linalg.norm(dw, axis=(1, 2)),
                               stored.sel(module=module["name"], dw_norms_feature="fro").values, rtol=1e-5)
    everything = pipeline.open_raw(str(api_store), "all")[module["name"]]
    assert everything.sizes["adapter"] == sum(s["n"] for s in root.attrs["splits"].values())


# --- load_runs and load_predictions --------------------------------------------------------------------------


def test_load_runs_keeps_every_configuration_apart(api_store):
    runs = pipeline.load_runs(str(api_store))
    root = open_root(api_store)
    digests = sorted(root["runs"].group_keys())
    assert len(runs) == 4 and sorted(runs.config_hash.unique()) == digests  # 2 configurations x 2 runs
    assert set(runs.groupby("config_hash").lr.first()) == {1e-3, 1e-2}  # same rep and layers: told apart by lr
    for column in ("reps", "layer_set", "label", "model", "seed", "hidden", "depth", "dropout", "weight_decay",
                   "batch_size", "epochs", "patience", "trained_by", "trained_at", "test_accuracy", "val_f1",
                   "train_accuracy", "last_epoch_test_accuracy", "best_epoch", "epochs_run", "seconds", "layers_hash"):
        assert column in runs.columns, column
    assert str(runs.trained_at.dtype).startswith("datetime64") and runs.trained_by.str.contains("@").all()
    for row in runs.itertuples():
        mark = root[f"runs/{row.config_hash}/run-{row.run:03d}"].attrs
        assert row.test_accuracy == mark["metrics"]["test"]["accuracy"] and row.val_f1 == mark["metrics"]["val"]["f1"]
        assert row.seed == mark["seed"] == row.base_seed + row.run and row.trained_by == mark["by"]
    assert (runs.store == str(api_store)).all()


def test_load_runs_reads_only_finished_runs(api_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(api_store, copy)
    assert len(pipeline.load_runs(str(copy))) == 4
    digest = sorted(zarr.open_group(str(copy))["runs"].group_keys())[0]
    group = zarr.open_group(str(copy), mode="r+")[f"runs/{digest}/run-001"]
    group.attrs.put({**group.attrs.asdict(), "complete": False})
    runs = pipeline.load_runs(str(copy))
    assert len(runs) == 3 and not ((runs.config_hash == digest) & (runs.run == 1)).any()
    shutil.rmtree(copy / "runs")
    assert pipeline.load_runs(str(copy)).empty and pipeline.load_predictions(str(copy)).empty


def test_load_predictions_are_the_stored_ones_with_their_labels(api_store):
    runs = pipeline.load_runs(str(api_store))
    digest = runs.config_hash.iloc[0]
    predictions = pipeline.load_predictions(str(api_store), config=digest[:6])  # a prefix is enough
    root = open_root(api_store)
    n_test = root.attrs["splits"]["test"]["n"]
    assert len(predictions) == 2 * n_test and set(predictions.config_hash) == {digest}
    # accuracy from the predictions = the stored metric, run by run
    for run, group in predictions.groupby("run"):
        assert np.isclose(group.correct.mean(), runs[(runs.config_hash == digest) & (runs.run == run)].test_accuracy.item())
    # the true labels are the store's, and the adapter ids join with open_features
    test = pipeline.open_features(str(api_store), "test", reps=[])
    one = predictions[predictions.run == 0]
    np.testing.assert_array_equal(test.sel(adapter=one.adapter.values).category_label.values, one.true.values)
    classes = root.attrs["labels"]["category_label"]["classes"]
    assert list(one.pred) == [classes[c] for c in root[f"runs/{digest}/run-000/test_pred"][:]]
    assert len(pipeline.load_predictions(str(api_store), runs=1)) == 2 * n_test  # run 1 of both configurations
    assert len(pipeline.load_predictions(str(api_store))) == 4 * n_test
    with pytest.raises(PipelineError, match="config 'ffff' matches no finished run"):
        pipeline.load_predictions(str(api_store), config="ffff")
    with pytest.raises(PipelineError, match="matches 2 configurations"):
        pipeline.load_predictions(str(api_store), config="")


# --- every kind of store ----------------------------------------------------------------------------------------


def _read_everything(location: str) -> dict:
    return {"features": pipeline.open_features(location, "all").load(), "raw": pipeline.open_raw(location, "test"),
            "runs": pipeline.load_runs(location), "predictions": pipeline.load_predictions(location)}


def test_readers_on_a_read_only_store_write_nothing(shared):  # noqa: F811
    before = file_snapshot(shared)
    found = _read_everything(str(shared))
    assert "dw_norms" in found["features"] and len(found["runs"]) == 2 and len(found["predictions"]) == 2 * 9
    next(iter(found["raw"].values())).A.values  # noqa: B018 - the lazy reads too
    assert file_snapshot(shared) == before


def test_a_personal_store_shows_its_own_and_its_bases_features_and_runs(shared, tmp_path):  # noqa: F811
    before = file_snapshot(shared)
    mine = tmp_path / "mine.zarr"
    assert run_cli("features", "--store", shared, "--output", mine, "--rep", "simple_stats", "--quiet").exit_code == 0
    train(TrainConfig(store=str(shared), output=str(mine), **TEAMMATE))
    ds = pipeline.open_features(str(mine), "all")
    assert set(ds.data_vars) == {"dw_norms", "simple_stats"}
    assert ds.dw_norms.attrs["store"] == str(shared) and ds.simple_stats.attrs["store"] == str(mine)
    np.testing.assert_array_equal(ds.sel(adapter=ds.split == "train").dw_norms.values,
                                  open_root(shared)["features/train/dw_norms"][:])
    assert ds.attrs["base"] == str(shared)
    runs = pipeline.load_runs(str(mine))
    assert len(runs) == 4 and sorted(runs.store.unique()) == sorted([str(shared), str(mine)])
    assert set(runs[runs.store == str(mine)].lr) == {1e-2} and set(runs[runs.store == str(shared)].lr) == {1e-3}
    assert len(pipeline.load_predictions(str(mine))) == 4 * 9
    raw = pipeline.open_raw(str(mine), "val")  # mine has no raw/: read from the base
    module = open_root(shared).attrs["modules"][0]
    np.testing.assert_array_equal(raw[module["name"]].A.values, open_root(shared)[f"raw/val/{module['key']}/A"][:])
    assert file_snapshot(shared) == before


def _same(found: dict, reference: dict) -> None:
    xr.testing.assert_identical(found["features"].drop_attrs(deep=True), reference["features"].drop_attrs(deep=True))
    for name, module in reference["raw"].items():
        np.testing.assert_array_equal(found["raw"][name].A.values, module.A.values)
    columns = [c for c in reference["runs"].columns if c != "store"]
    assert found["runs"][columns].equals(reference["runs"][columns])
    assert found["predictions"].equals(reference["predictions"])


def _upload(local: Path, fs, target: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe(f"{target}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_readers_on_a_memory_url(api_store):
    import fsspec

    url = f"memory://api-{os.getpid()}/team.zarr"
    _upload(api_store, fsspec.filesystem("memory"), url)
    _same(_read_everything(url), _read_everything(str(api_store)))


@pytest.fixture
def bucket(s3):  # noqa: F811
    """The S3 bucket; afterwards fsspec forgets its S3 filesystems, which hold this server's endpoint: when the
    fixture started a server of its own, test_remote's fixture starts another, at another port."""
    import s3fs

    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


def test_readers_on_s3(bucket, api_store):
    import s3fs

    _upload(api_store, s3fs.S3FileSystem(use_listings_cache=False), f"s3://{bucket}/api/team.zarr")
    _same(_read_everything(f"s3://{bucket}/api/team.zarr"), _read_everything(str(api_store)))
