"""Stage 3: the batched ensemble against the original loop, metrics against sklearn, the store's runs, bad input."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from conftest import SMALL_TRAIN, assert_one_line_error, assert_same_arrays, run_cli
from pipeline import metrics, model
from pipeline.errors import PipelineError
from pipeline.model import Hyper, train_ensemble
from pipeline.train import Setup, TrainConfig, load_data, standard_scaler, train
from reference import original_run

# `pipeline.train` is the function (the package's public surface); this is the module.
train_mod = importlib.import_module("pipeline.train")

FAST = dict(hidden=32, epochs=12, patience=5, runs=2, quiet=True)  # small but real training


@pytest.fixture
def scratch(signal_store, tmp_path) -> Path:
    """A private copy of the signal store (without any runs) that a test may modify."""
    dst = tmp_path / "scratch.zarr"
    shutil.copytree(signal_store, dst, ignore=lambda folder, names: ["runs"] if Path(folder) == Path(signal_store) else [])
    return dst


def toy(n=150, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 0.7 * torch.nn.functional.one_hot(y, d).float()
    return x, y


def run_attrs(path, digest) -> dict[int, dict]:
    group = zarr.open_group(str(path), mode="r")[f"runs/{digest}"]
    return {int(k[4:]): group[k].attrs.asdict() for k in sorted(group.group_keys())}


# --- the maths ---------------------------------------------------------------------------------------


def test_standard_scaler_matches_sklearn():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)) * [1, 1e-3, 5, 0, 1, 1] + [0, 1, 2, 3, 1e6, 0]
    x[:, 5] = 7.0  # constant: left unscaled
    mean, scale = standard_scaler(x)
    ref = StandardScaler().fit(x)
    np.testing.assert_allclose(mean, ref.mean_)
    np.testing.assert_allclose(scale, ref.scale_)


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 60)
    y[y == 4] = 3  # class 4 absent from y_true; some runs never predict class 0
    preds = np.stack([rng.integers(0, 5, 60), np.where(y == 0, 1, y), y])
    got = metrics.classification(torch.as_tensor(y), torch.as_tensor(preds), 5)
    for r, p in enumerate(preds):
        assert got["accuracy"][r] == pytest.approx(accuracy_score(y, p))
        for name, fn in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
            assert got[name][r].item() == pytest.approx(fn(y, p, average="macro", zero_division=0)), name
        np.testing.assert_array_equal(got["confusion"][r].numpy(), confusion_matrix(y, p, labels=range(5)))


def test_regression_metrics_match_sklearn():
    from sklearn.metrics import mean_absolute_error, mean_absolute_percentage_error, mean_squared_error, r2_score

    rng = np.random.default_rng(2)
    y = rng.standard_normal(40)
    y[3] = 0.0  # MAPE's denominator: sklearn's max(|y|, eps)
    preds = np.stack([y + rng.standard_normal(40) * s for s in (0.1, 1.0, 3.0)])
    got = metrics.regression(torch.as_tensor(y), torch.as_tensor(preds))
    for r, p in enumerate(preds):
        assert got["r2"][r].item() == pytest.approx(r2_score(y, p))
        assert got["mae"][r].item() == pytest.approx(mean_absolute_error(y, p))
        assert got["rmse"][r].item() == pytest.approx(mean_squared_error(y, p) ** 0.5)
        assert got["mape"][r].item() == pytest.approx(mean_absolute_percentage_error(y, p))


def test_batched_ensemble_equals_the_original_loop():
    """Each run of the ensemble is the original nn.Sequential/DataLoader/Adam loop with that seed (CPU), dropout 0.

    Tolerance: train losses within 1e-5 (float rounding of batched vs single matmuls); validation
    accuracies, learning rates, best epochs and stopping epochs exactly equal. (With dropout the masks are
    the ensemble's hash, not torch's Bernoulli draws: tests/test_step.py gives the original loop those masks
    and asks the same; it also checks that a run alone and the same run among ten are equal bit for bit.)
    """
    x, y = toy()
    xv, yv = toy(40, seed=1)
    hp = Hyper(hidden=32, epochs=25, patience=6, plateau_patience=1, batch_size=32, dropout=0.0)  # plateau 1: LRs differ
    seeds = [42, 43, 44]
    ens = train_ensemble(x, y, xv, yv, seeds, hp, "classification", 4)
    lrs = set()
    for r, seed in enumerate(seeds):
        ref = original_run(x, y, xv, yv, xv, yv, seed, hp, 4)
        assert ens.best_epoch[r] == ref["best_epoch"]
        assert len(ens.curves["lr"][r]) == len(ref["curves"]["lr"])
        np.testing.assert_allclose(ens.curves["train_loss"][r], ref["curves"]["train_loss"], atol=1e-5)
        np.testing.assert_array_equal(ens.curves["val_score"][r], ref["curves"]["val_score"])
        np.testing.assert_array_equal(ens.curves["lr"][r], ref["curves"]["lr"])
        lrs.update(ens.curves["lr"][r])
        with torch.no_grad():
            acc = metrics.classification(yv, model.evaluate(ens.best, xv, 3).argmax(-1), 4)["accuracy"][r]
        assert acc.item() == pytest.approx(ref["test_best"])
    assert len(lrs) > 1  # the plateau schedule did act


def test_best_weights_are_copied_not_referenced():
    x, y = toy(100, seed=5)
    xv, yv = toy(30, seed=6)
    ens = train_ensemble(x, y, xv, yv, [1], Hyper(hidden=16, epochs=30, patience=30), "classification", 4)
    best_epoch = ens.best_epoch[0]
    assert best_epoch < 30  # else the test proves nothing
    with torch.no_grad():
        best_acc = (model.evaluate(ens.best, xv, 3).argmax(-1) == yv).double().mean().item()
    assert best_acc == ens.curves["val_score"][0][best_epoch - 1]
    assert not torch.equal(ens.best["w0"], ens.last["w0"])


# --- on a store --------------------------------------------------------------------------------------


def test_same_seed_same_metrics(signal_store):
    config = TrainConfig(store=str(signal_store), reps="dw_norms", force=True, **FAST)
    first = train(config).results[0]
    before = run_attrs(signal_store, first.config_hash)
    second = train(config).results[0]
    after = run_attrs(signal_store, second.config_hash)
    assert first.config_hash == second.config_hash
    assert [a["metrics"] for a in before.values()] == [a["metrics"] for a in after.values()]
    assert [a["best_epoch"] for a in before.values()] == [a["best_epoch"] for a in after.values()]


def test_trains_without_raw_and_learns_the_signal(signal_store):
    assert not (signal_store / "raw").exists()
    summary = train(TrainConfig(store=str(signal_store), reps="dw_norms", layers="all", hidden=128, epochs=60, patience=15,
                                runs=2, quiet=True))
    assert summary.results[0].test_score > 0.6  # chance is 0.1


def test_shuffled_labels_stay_near_chance(scratch):
    root = zarr.open_group(str(scratch), mode="r+")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        codes = root[f"labels/{split}/category_label"]
        codes[:] = rng.permutation(codes[:])
    result = train(TrainConfig(store=str(scratch), reps="dw_norms", hidden=64, epochs=20, patience=8, runs=3,
                               quiet=True)).results[0]
    assert result.test_score < 0.25


def test_run_layout_in_the_store(signal_store):
    result = train(TrainConfig(store=str(signal_store), reps="simple_stats", layers="visual", **FAST)).results[0]
    root = zarr.open_group(str(signal_store), mode="r")
    group = root[f"runs/{result.config_hash}"]
    config = group.attrs["config"]
    assert train_mod.config_hash(config) == result.config_hash
    assert "runs" not in config and config["seed"] == 42 and config["hidden"] == 32 and config["layer_set"] == "visual"
    assert group.attrs["feature_width"] == 64 * 5
    assert all("attn1" in name for name in group.attrs["layers"]["simple_stats"])
    for run in (0, 1):
        attrs = group[f"run-{run:03d}"].attrs
        assert attrs["complete"] and attrs["seed"] == 42 + run and 1 <= attrs["best_epoch"] <= attrs["epochs"]
        assert set(attrs["metrics"]) == {"train", "val", "test"}
        assert set(attrs["metrics"]["test"]) == {"accuracy", "precision", "recall", "f1"}
        ds = xr.open_zarr(str(signal_store), group=f"runs/{result.config_hash}/run-{run:03d}", consolidated=False)
        assert ds["val_score"].dims == ("epoch",) and ds.sizes["epoch"] == attrs["epochs"]
        assert ds["test_pred"].dims == ("test_model",) and ds.sizes["test_model"] == 81
        acc = float((ds["test_pred"].values == ds["test_true"].values).mean())
        assert acc == pytest.approx(attrs["metrics"]["test"]["accuracy"])
        assert int(ds["test_confusion"].values.sum()) == 81
        labels = zarr.open_group(str(signal_store), mode="r")["labels/test/category_label"][:]
        np.testing.assert_array_equal(labels[ds["test_index"].values], ds["test_true"].values)


def test_resume_skips_finished_runs(scratch, monkeypatch):
    calls = []
    real = model.train_ensemble

    def counting(*args, **kwargs):
        calls.append(len(args[4]))  # seeds
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "train_ensemble", counting)
    config = dict(store=str(scratch), reps="dw_norms", layers="all,text", **{**FAST, "runs": 2, "epochs": 4})
    first = train(TrainConfig(**config))
    assert (first.trained, first.skipped, calls) == (4, 0, [2, 2])
    again = train(TrainConfig(**config))
    assert (again.trained, again.skipped, calls) == (0, 4, [2, 2])
    more = train(TrainConfig(**{**config, "runs": 3}))  # same configuration hash: only run 2 is new
    assert (more.trained, more.skipped, calls) == (2, 4, [2, 2, 1, 1])
    assert [r.config_hash for r in more.results] == [r.config_hash for r in first.results]
    forced = train(TrainConfig(**{**config, "force": True}))
    assert (forced.trained, calls[-2:]) == (4, [2, 2])


def test_a_batch_killed_between_its_marks_is_redone_whole(trained_small, tmp_path):
    """A kill between the complete marks of one ensemble's runs leaves run 0 marked and run 1 not: the rerun
    trains both again, together, and writes what a clean run writes (test_sharing's notion of "done" relies on it)."""
    store = tmp_path / "store.zarr"
    shutil.copytree(trained_small, store)
    root = zarr.open_group(str(store), mode="r+")
    (digest,) = root["runs"].group_keys()
    assert run_attrs(store, digest)[0]["batch"] == [0, 1]
    root[f"runs/{digest}/run-001"].attrs.put({})  # as it was just before its mark
    (result,) = train(TrainConfig(store=str(store), **SMALL_TRAIN)).results
    assert (result.trained, result.skipped) == ([0, 1], [])
    assert all(a["complete"] and a["ensemble_size"] == 2 for a in run_attrs(store, digest).values())
    assert_same_arrays(store, trained_small)


def test_layer_sets_slice_and_concatenate(signal_store):
    root = zarr.open_group(str(signal_store), mode="r")
    layers = [layer["name"] for layer in root.attrs["layers"]]
    modules = [m["name"] for m in root.attrs["modules"]]
    data = load_data(root, str(signal_store), Setup(("simple_stats", "dw_norms"), r"attn2\.to_v"), "category_label")
    a = [i for i, name in enumerate(layers) if "attn2.to_v" in name]
    m = [i for i, name in enumerate(modules) if "attn2.to_v" in name]
    assert (len(a), len(m)) == (32, 16)
    raw = np.concatenate([root["features/train/simple_stats"][:][:, a].reshape(280, -1),
                          root["features/train/dw_norms"][:][:, m].reshape(280, -1)], axis=1)
    mean, scale = standard_scaler(raw)
    np.testing.assert_allclose(data.x["train"], (raw - mean) / scale, rtol=1e-5, atol=1e-5)
    assert data.layers["dw_norms"] == [modules[i] for i in m]
    text = load_data(root, str(signal_store), Setup(("dw_norms",), "text"), "category_label")
    assert text.layers["dw_norms"] == [name for name in modules if "attn2" in name]


def test_regression_on_a_float_label(scratch):
    root = zarr.open_group(str(scratch), mode="r+")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):  # a float target the planted class signal predicts: 10 x class code + noise
        values = 10.0 * root[f"labels/{split}/category_label"][:] + rng.standard_normal(root.attrs["splits"][split]["n"])
        root.create_array(f"labels/{split}/score", data=values, dimension_names=("model",))
    labels = root.attrs["labels"]
    root.attrs["labels"] = {**labels, "score": {"kind": "float", "column": "score"}}
    result = train(TrainConfig(store=str(scratch), reps="dw_norms", label="score", hidden=64, epochs=25, patience=10,
                               runs=2, quiet=True)).results[0]
    assert result.score == "r2"
    attrs = run_attrs(scratch, result.config_hash)[0]
    assert set(attrs["metrics"]["test"]) == {"r2", "mae", "rmse", "mape"}
    assert attrs["metrics"]["test"]["r2"] > 0.3
    ds = xr.open_zarr(str(scratch), group=f"runs/{result.config_hash}/run-000", consolidated=False)
    mae = float(np.abs(ds["test_pred"].values - ds["test_true"].values).mean())
    assert mae == pytest.approx(attrs["metrics"]["test"]["mae"], rel=1e-5)
    assert np.all(np.isfinite(ds["val_score"].values))


def test_an_integer_label_is_classified_or_regressed_as_asked(scratch):
    """LoRA-WiSE's label is an image count: DSiRe classifies the counts (--task classification, also what auto
    does for an integer label) and regresses them (--task regression: MAE, MAPE). The two are different
    configurations; --task auto hashes as the task it resolves to."""
    root = zarr.open_group(str(scratch), mode="r+")
    for split in ("train", "val", "test"):  # counts the planted class signal predicts: 1, 10 or 100 images
        codes = root[f"labels/{split}/category_label"][:]
        root.create_array(f"labels/{split}/images", data=(10 ** (codes % 3)).astype(np.int64), dimension_names=("model",))
    root.attrs["labels"] = {**root.attrs["labels"], "images": {"kind": "integer", "column": "images"}}
    common = dict(store=str(scratch), reps="dw_norms", label="images", hidden=64, epochs=25, patience=10, runs=2, quiet=True)
    auto = train(TrainConfig(**common)).results[0]
    classified = train(TrainConfig(**common, task="classification")).results[0]
    regressed = train(TrainConfig(**common, task="regression")).results[0]
    assert auto.config_hash == classified.config_hash != regressed.config_hash
    from pipeline.train_plan import plan  # the dry run names the same configurations

    assert [plan(TrainConfig(**common, task=t)).configurations[0].config_hash for t in ("auto", "regression")] == \
        [auto.config_hash, regressed.config_hash]
    assert (classified.score, regressed.score) == ("accuracy", "r2")
    group = zarr.open_group(str(scratch), mode="r")[f"runs/{classified.config_hash}"]
    assert group.attrs["classes"] == ["1", "10", "100"] and group.attrs["task"] == "classification"
    attrs = run_attrs(scratch, regressed.config_hash)[0]
    assert set(attrs["metrics"]["test"]) == {"r2", "mae", "rmse", "mape"}
    ds = xr.open_zarr(str(scratch), group=f"runs/{regressed.config_hash}/run-000", consolidated=False)
    true, pred = ds["test_true"].values, ds["test_pred"].values
    assert sorted(np.unique(true)) == [1, 10, 100]  # the counts themselves, not class codes
    assert np.mean(np.abs(pred - true) / np.abs(true)) == pytest.approx(attrs["metrics"]["test"]["mape"], rel=1e-5)
    # The report scores each against the labels as its trainer coded them: counts for the regression, classes else
    from pipeline.report import write_report

    rows = {r["config_hash"]: r for r in write_report(str(scratch), scratch.parent / "report").rows}
    runs = run_attrs(scratch, regressed.config_hash).values()
    assert rows[regressed.config_hash]["task"] == "regression"
    assert rows[regressed.config_hash]["test_mae_mean"] == pytest.approx(np.mean([r["metrics"]["test"]["mae"] for r in runs]))
    assert rows[classified.config_hash]["test_mean"] == pytest.approx(
        np.mean([r["metrics"]["test"]["accuracy"] for r in run_attrs(scratch, classified.config_hash).values()]))
    with pytest.raises(PipelineError, match="--task regression needs a numeric label, but 'category_label' is categorical"):
        train(TrainConfig(**{**common, "label": "category_label"}, task="regression"))
    with pytest.raises(PipelineError, match="unknown --task 'ordinal'"):
        TrainConfig(**common, task="ordinal")


def test_linear_model(signal_store):
    result = train(TrainConfig(store=str(signal_store), reps="dw_norms", model="linear", **FAST)).results[0]
    config = run_attrs(signal_store, result.config_hash)
    group = zarr.open_group(str(signal_store), mode="r")[f"runs/{result.config_hash}"]
    assert group.attrs["config"]["depth"] == 0 and group.attrs["config"]["dropout"] == 0
    assert len(config) == 2 and result.test_score > 0.3


# --- bad input: one line, exit code 2 ----------------------------------------------------------------


def test_cli_train_and_report(signal_store, tmp_path):
    result = run_cli("train", "--store", signal_store, "--rep", "simple_stats+dw_norms", "--layers", "visual",
                     "--runs", "2", "--epochs", "5", "--hidden", "16")
    assert result.exit_code == 0, result.output
    assert "simple_stats+dw_norms [visual]" in result.output and "2 runs trained" in result.output
    again = run_cli("train", "--store", signal_store, "--rep", "simple_stats+dw_norms", "--layers", "visual",
                    "--runs", "2", "--epochs", "5", "--hidden", "16")
    assert "up to date" in again.output and "0 runs trained, 2 skipped" in again.output
    report = run_cli("report", "--store", signal_store, "--out", tmp_path / "rep")
    assert report.exit_code == 0, report.output
    assert "| simple_stats+dw_norms · hidden=16, epochs=5 | 2 |" in report.output and "visual acc [95% CI]" in report.output
    assert (tmp_path / "rep" / "results.csv").is_file()


@pytest.mark.parametrize("args, fragments", [
    (("--rep", "matrix_norms"), ("'matrix_norms' is not computed yet", "pipeline features --store", "--rep matrix_norms")),
    (("--rep", "nope"), ("unknown representation 'nope'",)),
    (("--label", "colour"), ("unknown label 'colour'",)),
    (("--label", "rank"), ("only one class",)),
    (("--layers", "attn9"), ("'attn9' matches none",)),
    (("--layers", "attn[1"), ("not a valid regular expression",)),
    (("--epochs", "0"), ("--epochs 0 is out of range",)),
])
def test_bad_input_is_one_line(signal_store, args, fragments):
    result = run_cli("train", "--store", signal_store, "--rep", "dw_norms", "--quiet", *args)
    assert_one_line_error(result, *fragments)


def test_stale_and_partial_features_are_refused(scratch):
    features = zarr.open_group(str(scratch), mode="r+")["features/val/dw_norms"]
    features.attrs["spec_hash"] = "0" * 16
    assert_one_line_error(run_cli("train", "--store", scratch, "--rep", "dw_norms"), "'dw_norms' is stale", "split 'val'",
                          f"pipeline features --store {scratch} --rep dw_norms")
    features = zarr.open_group(str(scratch), mode="r+")["features/test/simple_stats"]
    features.attrs["complete"] = False
    assert_one_line_error(run_cli("train", "--store", scratch, "--rep", "simple_stats"), "only partly computed")


def test_nan_features_are_refused(scratch):
    array = zarr.open_group(str(scratch), mode="r+")["features/train/dw_norms"]
    values = array[:]
    values[3, 5, 1] = np.nan
    array[:] = values
    assert_one_line_error(run_cli("train", "--store", scratch, "--rep", "dw_norms"), "contain 1 NaN/Inf",
                          "split 'train'", "--force")


def test_empty_split_and_unlabelled_split_are_refused(scratch):
    root = zarr.open_group(str(scratch), mode="r+")
    codes = root["labels/val/category_label"]
    codes[:] = np.full(codes.shape, -1, dtype=np.int32)
    assert_one_line_error(run_cli("train", "--store", scratch, "--rep", "dw_norms"), "split 'val' has no rows with")
    splits = json.loads(json.dumps(root.attrs["splits"]))
    splits["test"]["n"] = 0
    root.attrs["splits"] = splits
    assert_one_line_error(run_cli("train", "--store", scratch, "--rep", "dw_norms"), "split 'test'", "has no rows")


def test_config_is_validated():
    with pytest.raises(PipelineError, match="--dropout"):
        TrainConfig(dropout=1.0)
    with pytest.raises(PipelineError, match="--model"):
        TrainConfig(model="svm")


def test_evaluation_memory_is_bounded_by_the_widest_layer_not_by_n(monkeypatch):
    """Outputs are computed in row chunks of at most _EVAL_ELEMENTS activations of the widest layer (the
    hidden one, not the output): the final metrics of a 50k-adapter store once took 2.8 GiB this way."""
    x, y = toy(n=150, d=20, classes=4)
    ens = train_ensemble(x[:100], y[:100], x[100:], y[100:], [0, 1, 2], Hyper(hidden=32, epochs=2), "classification", 4)
    whole = model.evaluate(ens.best, x, 3)
    monkeypatch.setattr(model, "_EVAL_ELEMENTS", 3 * 32 * 7)  # 7 rows of 3 runs x 32 hidden units at a time
    calls = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda state, xb, depth, **k: calls.append(len(xb)) or real(state, xb, depth, **k))
    chunked = model.evaluate(ens.best, x, 3)
    assert max(calls) == 7 and sum(calls) == 150
    torch.testing.assert_close(chunked, whole)
