"""The model registry (pipeline/models.py) and the raw-factor path: a model that reads raw/ gets exactly the
stored factors of its layer set's labelled adapters, and its runs are written like the MLP's."""

from __future__ import annotations

import shutil
from dataclasses import fields

import numpy as np
import pytest
import torch

import pipeline
from conftest import assert_one_line_error, run_cli
from pipeline import models, views
from pipeline.errors import PipelineError
from pipeline.hyper import Hyper
from pipeline.train import TrainConfig, train

SEEN: dict = {}


def nearest_mean_fit(train_split, val_split, seeds, hp, task, n_out, on_epoch=None):
    """A raw-input test model: nearest class mean of the flattened scaled dW of every module."""
    x, y = train_split
    SEEN["train"] = x

    def flat(raw):
        return torch.cat([(s[:, None, None] * (b @ a)).flatten(1) for a, b, s in zip(raw.A, raw.B, raw.scale)], 1)

    means = torch.stack([flat(x)[y == k].mean(0) for k in range(n_out)])

    def predict(inputs, which):
        scores = -torch.cdist(flat(inputs), means)
        return scores[None].expand(len(seeds), -1, -1)

    runs = len(seeds)
    curves = {k: [np.zeros(1) for _ in range(runs)] for k in ("train_loss", "train_score", "val_loss", "val_score", "lr")}
    return models.Fitted(curves, np.ones(runs, dtype=int), predict)


def nearest_mean_cost(size, hp, epochs, runs):
    """Its distances: 3 FLOPs per number per adapter and class mean."""
    return 3 * size.width * size.n_out * sum(size.n.values())


@pytest.fixture
def nearest_mean(monkeypatch):
    model = models.Model("nearest-mean", 1, "raw", f"{__name__}:nearest_mean_fit", f"{__name__}:nearest_mean_cost",
                         "test model", fixed={})
    monkeypatch.setitem(models.REGISTRY, model.name, model)
    return model


def test_a_raw_model_reads_the_stored_factors_of_its_layer_set(synth_store, tmp_path, nearest_mean):
    store = tmp_path / "s.zarr"
    shutil.copytree(synth_store, store)
    summary = train(TrainConfig(store=str(store), model="nearest-mean", layers="visual", runs=2, quiet=True))
    (result,) = summary.results
    assert result.setup.reps == (models.RAW,) and len(result.trained) == 2
    raw = views.open_raw(str(store), "train")
    seen = SEEN["train"]
    assert seen.modules == [name for name in raw if "attn1" in name]
    for name, a, b, s in zip(seen.modules, seen.A, seen.B, seen.scale):
        np.testing.assert_array_equal(a.numpy(), raw[name]["A"].values[: len(a)])  # every row is labelled here
        np.testing.assert_array_equal(b.numpy(), raw[name]["B"].values[: len(b)])
        np.testing.assert_array_equal(s.numpy(), raw[name]["scale"].values[: len(s)])
    assert seen.width == sum(raw[n]["A"].shape[1] * (raw[n]["A"].shape[2] + raw[n]["B"].shape[1]) for n in seen.modules)
    runs = pipeline.load_runs(str(store))
    assert set(runs["model"]) == {"nearest-mean"} and set(runs["reps"]) == {models.RAW} and len(runs) == 2


def test_raw_is_only_for_raw_models(synth_store, nearest_mean):
    with pytest.raises(PipelineError, match="--rep raw"):
        train(TrainConfig(store=str(synth_store), model="nearest-mean", reps="dw_norms", quiet=True))
    with pytest.raises(PipelineError, match="only by the models that learn from the raw factors"):
        train(TrainConfig(store=str(synth_store), model="mlp", reps="raw", quiet=True))


def test_a_raw_model_refuses_a_store_without_complete_raw_groups(signal_store, nearest_mean):
    with pytest.raises(PipelineError, match="is not complete; run"):
        train(TrainConfig(store=str(signal_store), model="nearest-mean", quiet=True))


def test_fixed_hyper_parameters_are_not_options():
    linear = models.get("linear")
    assert linear.options() == () and models.get("knn-vote").options() == ()  # they take none of the MLP's
    assert linear.defaults()["depth"] == 0 and linear.defaults()["lr"] == 0 and models.get("mlp").defaults()["depth"] == 3
    assert models.get("mlp").options() == tuple(f.name for f in fields(Hyper))


def test_an_unknown_model_is_one_line():
    result = run_cli("train", "--model", "nope")
    assert_one_line_error(result, "nope")
