"""``--model knn-vote`` (pipeline/knn_vote.py): DSiRe's classifier against tests/reference.py's direct numpy
implementation of dsire.py's steps, prediction for prediction, on small stores; its pieces against plain loops;
and the model through ``pipeline train`` and ``pipeline report`` beside the MLP and the linear probe."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import zarr

import pipeline
from conftest import materialize_to, open_store, run_cli, save_matrix_dataset
from pipeline import knn_vote, models
from pipeline.errors import PipelineError
from pipeline.rawdata import RawFactors
from pipeline.train import SPLITS, Setup, TrainConfig, load_data, train
from pipeline.train_plan import plan
from reference import dsire_predict, dsire_voters


ONE_MODULE = r"down_blocks\.0\.attentions\.0\..*attn1\.to_q"  # one 320 x 320 module of the synthetic data


def small_store(home: Path, rank: int) -> Path:
    """60 small adapters of 4 concepts, three modules of rank ``rank`` (the last one's rank varies, rank - 1 or
    rank, zero-padded, when rank > 1), their B scaled by the concept: each voter has ``rank`` values."""
    rng = np.random.default_rng(5)
    n, concepts = 60, ["cat", "dog", "fish", "ship"]
    label = [concepts[i % 4] for i in range(n)]
    columns = {}
    for m, (name, fan_in, fan_out) in enumerate([("unet.blk0.attn1.to_q", 8, 6), ("unet.blk0.attn1.to_v", 8, 6),
                                                 ("unet.blk1.attn2.to_q", 5, 7)]):
        ranks = [rank] * n if m < 2 or rank == 1 else [rank - 1 + i % 2 for i in range(n)]
        columns[f"{name}.lora.down.weight"] = [rng.standard_normal((r, fan_in)) for r in ranks]
        columns[f"{name}.lora.up.weight"] = [rng.standard_normal((fan_out, r)) * (1 + concepts.index(c) / 4)
                                             for r, c in zip(ranks, label)]
    source = save_matrix_dataset(home / "src", columns, extra={"concept": label},
                                 extra_features={"concept": datasets.Value("string")})
    store = home / f"rank{rank}.zarr"
    materialize_to(store, source)
    assert [m["rank"] for m in open_store(store).attrs["modules"]] == [rank] * 3
    return store


def _adapters(raw: RawFactors) -> list:
    """The reference's input: per adapter, per module (A (r, in), B (out, r)) as numpy."""
    return [[(a[i].numpy(), b[i].numpy()) for a, b in zip(raw.A, raw.B)] for i in range(len(raw))]


def _check_against_dsire(path, layer_set):
    data = load_data(zarr.open_group(str(path), mode="r"), str(path), Setup((models.RAW,), layer_set), None)
    x = {s: data.x[s].load() for s in SPLITS}  # RawSources: the factors left in the store, loaded here
    y = {s: torch.from_numpy(data.y[s]) for s in SPLITS}
    fitted = knn_vote.fit((x["train"], y["train"]), (x["val"], y["val"]), [0, 1], None, "classification",
                          len(data.classes))
    queries = [adapter for s in SPLITS for adapter in _adapters(x[s])]
    expected = dsire_predict(_adapters(x["train"]), data.y["train"].tolist(), queries)
    ties, start = 0, 0
    for split in SPLITS:
        best = fitted.predict(x[split], "best")
        assert best.shape == (2, len(y[split]), len(data.classes))
        assert torch.equal(best, fitted.predict(x[split], "last")) and torch.equal(best[0], best[1])
        assert best[0].argmax(-1).tolist() == expected[start:start + len(y[split])], split
        start += len(y[split])
        counts = np.sort(best[0].floor().numpy(), 1)
        ties += int((counts[:, -1] == counts[:, -2]).sum())  # decided by the tie rule
    return fitted, ties


@pytest.mark.parametrize("rank", [1, 3])  # 1: the zoo's case, each voter one value (|A|, |B|, |A| |B|)
def test_knn_vote_is_dsire_prediction_for_prediction(rank, tmp_path):
    fitted, ties = _check_against_dsire(small_store(tmp_path, rank), "all")
    assert ties > 0  # the tie rule decided some votes (9 voters, 4 classes)
    assert fitted.curves["train_score"][0].tolist() == [1.0]  # each training adapter is its own nearest neighbour


def test_voters_are_the_singular_values_of_a_b_and_ba():
    rng = np.random.default_rng(0)
    n, r, fan_in, fan_out = 5, 4, 9, 7
    a = rng.standard_normal((n, r, fan_in)).astype(np.float32)
    b = rng.standard_normal((n, fan_out, r)).astype(np.float32)
    a[0, 2:] = 0  # an adapter of true rank 2, zero-padded as the store keeps it
    b[0, :, 2:] = 0
    raw = RawFactors(["m0", "m1"], [torch.from_numpy(a), torch.from_numpy(a[::-1].copy())],
                     [torch.from_numpy(b), torch.from_numpy(b[::-1].copy())], [torch.ones(n)] * 2)
    values = knn_vote.voters(raw)
    assert len(values) == 6 and all(v.shape == (n, r) and v.dtype == torch.float64 for v in values)
    for i in range(n):
        ref = list(dsire_voters([(a[i], b[i]), (a[n - 1 - i], b[n - 1 - i])]).values())  # A0 B0 A1 B1 BA0 BA1
        got = [v[i].numpy() for v in values]
        for mine, theirs in zip(got, ref):
            np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-12 * np.abs(theirs).max())


def test_the_vote_is_counter_most_common():
    """Votes with many ties (6 voters, 3 labels): argmax of the scores is ``Counter(labels).most_common(1)``."""
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 3, (6, 500)))
    scores = knn_vote.vote_scores(labels, 4)
    expected = [Counter(labels[:, i].tolist()).most_common(1)[0][0] for i in range(labels.shape[1])]
    assert scores.argmax(-1).tolist() == expected
    assert (scores[:, 3] == 0).all()  # a label no voter gave


def test_nearest_is_the_first_of_equally_near_rows():
    rng = np.random.default_rng(0)
    train_rows = rng.integers(0, 3, (2, 30, 2)).astype(np.float64)  # few distinct rows: many exact ties
    queries = rng.integers(0, 3, (2, 20, 2)).astype(np.float64)
    got = knn_vote.nearest(torch.from_numpy(queries), torch.from_numpy(train_rows))
    for v in range(2):
        expected = [int(np.argmin(((train_rows[v] - q) ** 2).sum(1))) for q in queries[v]]
        assert got[v].tolist() == expected


def test_global_min_max_is_dsire_get_min_max():
    values = [torch.tensor([[3.0, 2.0]]), torch.tensor([[1500.0, 2000.0]])]
    assert knn_vote.min_max(values) == (2.0, 2000.0)
    assert knn_vote.min_max([torch.tensor([[1200.0]])]) == (1000.0, 1200.0)  # dsire.py starts from min 1000
    assert knn_vote.min_max([torch.tensor([[-0.5]])]) == (-0.5, 0.0)  # and from max 0


# --- through pipeline train, report and info -------------------------------------------------------------


def test_knn_vote_through_train(synth_store, tmp_path, monkeypatch):
    """The synthetic zoo's rank-1 factors, read by pipeline train: the stored test predictions are dsire.py's,
    and each split's voters are computed once (fit, the final metrics and "best"/"last" share them)."""
    path = tmp_path / "s.zarr"
    shutil.copytree(synth_store, path)
    config = TrainConfig(store=str(path), model="knn-vote", layers=ONE_MODULE, runs=3, quiet=True)
    planned = plan(config)
    computed, voters = [], knn_vote.voters
    monkeypatch.setattr(knn_vote, "voters", lambda raw: computed.append(len(raw)) or voters(raw))
    (result,) = train(config).results
    rows = zarr.open_group(str(path), mode="r")[f"runs/{result.config_hash}"].attrs["n"]
    assert sorted(computed) == sorted(rows[split] for split in ("train", "val", "test"))  # one call per split
    assert [p.config_hash for p in planned.configurations] == [result.config_hash]
    group = zarr.open_group(str(path), mode="r")[f"runs/{result.config_hash}"]
    runs = [group[k] for k in sorted(group.group_keys())]
    data = load_data(zarr.open_group(str(path), mode="r"), str(path), Setup((models.RAW,), ONE_MODULE), None)
    expected = dsire_predict(_adapters(data.x["train"].load()), data.y["train"].tolist(), _adapters(data.x["test"].load()))
    for run in runs:
        assert run["test_pred"][...].tolist() == expected
        assert run.attrs["metrics"]["test"] == runs[0].attrs["metrics"]["test"]
        assert run.attrs["last_epoch_metrics"]["test"]["accuracy"] == run.attrs["metrics"]["test"]["accuracy"]
        assert run.attrs["best_epoch"] == run.attrs["epochs"] == 1
    assert group.attrs["reps"] == [models.RAW] and group.attrs["config"]["lr"] == 0.0


def test_knn_vote_refuses_regression(synth_store):
    with pytest.raises(PipelineError, match="--model knn-vote does not do regression"):
        train(TrainConfig(store=str(synth_store), model="knn-vote", label="num_images", task="regression", quiet=True))


def test_report_and_info_show_mlp_linear_and_knn_vote_side_by_side(trained_small, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(trained_small, path)  # one MLP configuration (dw_norms) trained
    for model, reps in (("linear", "dw_norms"), ("knn-vote", "all")):
        assert run_cli("train", "--store", path, "--model", model, "--rep", reps, "--runs", 2, "--quiet").exit_code == 0
    out = tmp_path / "report"
    result = run_cli("report", "--store", path, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "results.csv")
    assert sorted(rows["model"]) == ["knn-vote", "linear", "mlp"]
    assert set(rows["variant"]) >= {"dw_norms · linear", "raw · knn-vote"}
    assert (out / "curves_category_label.png").exists()
    info = run_cli("info", "--store", path)
    assert info.exit_code == 0 and "raw · knn-vote" in info.output and "dw_norms · linear" in info.output
    runs = pipeline.load_runs(str(path))
    assert set(runs["model"]) == {"mlp", "linear", "knn-vote"} and len(runs) == 2 + 2 + 2
