"""``--model linear`` (pipeline/linear_probe.py): scikit-learn's LogisticRegression and Ridge at the same C, the C
that a direct scikit-learn search on the validation split chooses, and the probe through ``pipeline train``."""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import run_cli
from pipeline import linear_probe, models
from pipeline.model import CURVES
from pipeline.train import Setup, TrainConfig, load_data, train
from pipeline.train_plan import plan

sklearn_lm = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is the reference of the linear probe")

EXACT = dict(tol=1e-10, max_iter=100_000)  # scikit-learn converged as far as the probe is


def blobs(n, d, classes, seed=0, signal=1.0):
    """Standardised features with a class signal of ``signal`` per class direction, and their labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    x = rng.standard_normal((n, d)) + signal * np.eye(classes, d)[y] * 2
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32), y


def relative(a, b):
    return np.abs(np.asarray(a) - b).max() / np.abs(b).max()


@pytest.mark.parametrize("classes", [2, 4])
def test_logistic_path_is_scikit_learn_at_every_c(classes):
    x, y = blobs(120, 12, classes)
    weights = linear_probe.logistic_path(torch.from_numpy(x).double(), torch.from_numpy(y), classes, linear_probe.GRID)
    out = linear_probe.scores(weights, torch.from_numpy(x), torch.arange(classes), classes)
    for g, c in enumerate(linear_probe.GRID):
        ref = sklearn_lm.LogisticRegression(C=c, **EXACT).fit(x.astype(np.float64), y)
        coef, intercept = weights[g, :-1].numpy().T, weights[g, -1].numpy()
        assert coef.shape == ref.coef_.shape  # binary: one weight vector, as scikit-learn fits it
        assert relative(coef, ref.coef_) < 1e-3, c
        # scikit-learn stops on its relative decrease (scipy's ftol) first: at C = 1e-4 its intercept is off by ~3e-6
        # (its gradient there is ~7e-7, the probe's ~5e-10; measured)
        np.testing.assert_allclose(intercept, ref.intercept_, rtol=1e-3, atol=1e-5)
        np.testing.assert_array_equal(out[g].argmax(-1).numpy(), ref.predict(x.astype(np.float64)))


@pytest.mark.parametrize("n, d", [(80, 10), (15, 40)])  # X^T X, and the dual X X^T
def test_ridge_path_is_scikit_learn_at_every_alpha(n, d):
    x, _ = blobs(n, d, 3)
    y = x[:, 0] * 2 - x[:, 1] + np.random.default_rng(1).standard_normal(n)
    weights = linear_probe.ridge_path(torch.from_numpy(x).double(), torch.from_numpy(y), linear_probe.GRID)
    for g, c in enumerate(linear_probe.GRID):
        ref = sklearn_lm.Ridge(alpha=1 / c).fit(x.astype(np.float64), y)
        assert relative(weights[g, :-1, 0].numpy(), ref.coef_) < 1e-8
        assert weights[g, -1, 0].item() == pytest.approx(ref.intercept_, abs=1e-9)


def _sklearn_choice(x, y, xv, yv):
    """The direct search over the same grid: fit on train, best val accuracy, ties to the lower val log-loss."""
    from sklearn.metrics import log_loss

    rows = []
    for g, c in enumerate(linear_probe.GRID):
        ref = sklearn_lm.LogisticRegression(C=c, **EXACT).fit(x, y)
        rows.append((-ref.score(xv, yv), log_loss(yv, ref.predict_proba(xv), labels=ref.classes_), g))
    return min(rows)[2]


def _fit(x, y, xv, yv, task="classification", n_out=None, runs=3):
    tensor = (lambda v: torch.from_numpy(v)) if task == "classification" else (lambda v: torch.from_numpy(v).float())
    return linear_probe.fit((torch.from_numpy(x), tensor(y)), (torch.from_numpy(xv), tensor(yv)), list(range(runs)),
                            None, task, n_out or int(y.max()) + 1)


def test_the_c_chosen_on_val_is_a_direct_scikit_learn_search():
    x, y = blobs(300, 30, 5, signal=0.5)
    (xt, yt), (xv, yv), (xs, ys) = (x[:150], y[:150]), (x[150:220], y[150:220]), (x[220:], y[220:])
    fitted = _fit(xt, yt, xv, yv)
    chosen = int(fitted.best_epoch[0]) - 1
    assert chosen == _sklearn_choice(xt.astype(np.float64), yt, xv.astype(np.float64), yv)
    assert (fitted.best_epoch == chosen + 1).all() and len(fitted.best_epoch) == 3
    ref = sklearn_lm.LogisticRegression(C=linear_probe.GRID[chosen], **EXACT).fit(xt.astype(np.float64), yt)
    best = fitted.predict(torch.from_numpy(xs), "best")
    assert best.shape == (3, len(xs), 5) and torch.equal(best[0], best[2])  # deterministic: every run the same
    np.testing.assert_array_equal(best[0].argmax(-1).numpy(), ref.predict(xs.astype(np.float64)))
    last = sklearn_lm.LogisticRegression(C=linear_probe.GRID[-1], **EXACT).fit(xt.astype(np.float64), yt)
    np.testing.assert_array_equal(fitted.predict(torch.from_numpy(xs), "last")[0].argmax(-1).numpy(), last.predict(xs.astype(np.float64)))
    curves = {k: v[0] for k, v in fitted.curves.items()}
    assert set(curves) == set(CURVES) and all(len(v) == len(linear_probe.GRID) for v in curves.values())
    np.testing.assert_array_equal(curves["lr"], linear_probe.GRID)  # the path's C, in increasing order
    assert curves["val_score"][chosen] == pytest.approx(ref.score(xv.astype(np.float64), yv))
    assert curves["train_score"][chosen] == pytest.approx(ref.score(xt.astype(np.float64), yt))


def test_ridge_alpha_chosen_on_val_is_the_lowest_val_mse():
    x, _ = blobs(200, 25, 3)
    y = (x[:, :5].sum(1) + np.random.default_rng(2).standard_normal(200) * 2).astype(np.float32)
    fitted = _fit(x[:100], y[:100], x[100:150], y[100:150], task="regression")
    mse = [np.mean((sklearn_lm.Ridge(alpha=1 / c).fit(x[:100], y[:100]).predict(x[100:150]) - y[100:150]) ** 2)
           for c in linear_probe.GRID]
    chosen = int(fitted.best_epoch[0]) - 1
    assert chosen == int(np.argmin(mse))
    ref = sklearn_lm.Ridge(alpha=1 / linear_probe.GRID[chosen]).fit(x[:100].astype(np.float64), y[:100])
    out = fitted.predict(torch.from_numpy(x[150:]), "best")
    assert out.shape == (3, 50, 1)
    np.testing.assert_allclose(out[0, :, 0].numpy(), ref.predict(x[150:].astype(np.float64)), rtol=1e-4, atol=1e-5)


def test_sixty_training_adapters_of_three_classes_are_fitted():
    """The issue's case: 60 training adapters, 3 classes, a separable representation; the MLP-trained linear
    model stopped at a training accuracy of 0.49 there."""
    x, y = blobs(120, 40, 3, seed=3)
    assert sklearn_lm.LogisticRegression(C=1e4, **EXACT).fit(x[:60], y[:60]).score(x[:60], y[:60]) == 1.0  # separable
    fitted = _fit(x[:60], y[:60], x[60:90], y[60:90])
    train_accuracy = (fitted.predict(torch.from_numpy(x[:60]), "best")[0].argmax(-1).numpy() == y[:60]).mean()
    assert train_accuracy == 1.0


def test_a_class_absent_from_train_is_never_predicted():
    x, y = blobs(90, 8, 3)
    fitted = _fit(x[:60], y[:60] % 2, x[60:], y[60:], n_out=3)  # trained on classes 0 and 1 only; val has class 2
    out = fitted.predict(torch.from_numpy(x[60:]), "best")[0]
    assert set(out.argmax(-1).tolist()) <= {0, 1} and all(np.isfinite(v[0]).all() for v in fitted.curves.values())


# --- through pipeline train ------------------------------------------------------------------------------


@pytest.fixture
def scratch(signal_store, tmp_path) -> Path:
    dst = tmp_path / "scratch.zarr"
    shutil.copytree(signal_store, dst, ignore=lambda folder, names: ["runs"] if Path(folder) == Path(signal_store) else [])
    return dst


def _runs(path, digest):
    group = zarr.open_group(str(path), mode="r")[f"runs/{digest}"]
    return [group[k] for k in sorted(group.group_keys())]


def test_linear_through_train_is_scikit_learn_on_the_same_features(scratch):
    config = TrainConfig(store=str(scratch), reps="dw_norms", layers="visual", model="linear", runs=2, quiet=True)
    planned = plan(config)  # the dry run plans it too
    (result,) = train(config).results
    assert [p.config_hash for p in planned.configurations] == [result.config_hash] and planned.configurations[0].flops > 0
    runs = _runs(scratch, result.config_hash)
    chosen = runs[0].attrs["best_epoch"] - 1
    c = float(runs[0]["lr"][chosen])
    assert c == linear_probe.GRID[chosen]
    data = load_data(zarr.open_group(str(scratch), mode="r"), str(scratch), Setup(("dw_norms",), "visual"), None)
    x = {s: v.astype(np.float64) for s, v in data.x.items()}
    ref = sklearn_lm.LogisticRegression(C=c, **EXACT).fit(x["train"], data.y["train"])
    for run in runs:
        np.testing.assert_array_equal(run["test_pred"][...], ref.predict(x["test"]))
        assert run.attrs["metrics"]["train"]["accuracy"] == pytest.approx(ref.score(x["train"], data.y["train"]))
        assert run.attrs["epochs"] == len(linear_probe.GRID)
    # it takes none of the MLP's hyper-parameters: --lr or --epochs is the same configuration, and nothing to train
    again = train(replace(config, lr=0.5, epochs=3, weight_decay=0.1))
    assert again.results[0].config_hash == result.config_hash and again.trained == 0
    assert set(models.get("linear").fixed) == set(asdict(config.hyper()))
    dry = run_cli("train", "--store", scratch, "--rep", "dw_norms", "--layers", "visual", "--model", "linear", "--runs", 3,
                  "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "1 runs to train, 2 finished" in dry.output and "GFLOP" in dry.output


def test_linear_regression_through_train_is_ridge(scratch):
    config = TrainConfig(store=str(scratch), reps="dw_norms", label="num_images", task="regression", model="linear",
                         runs=1, quiet=True)
    (result,) = train(config).results
    (run,) = _runs(scratch, result.config_hash)
    c = float(run["lr"][run.attrs["best_epoch"] - 1])
    data = load_data(zarr.open_group(str(scratch), mode="r"), str(scratch), Setup(("dw_norms",), "all"), "num_images",
                     task="regression")
    mean, std = data.y_scale
    ref = sklearn_lm.Ridge(alpha=1 / c).fit(data.x["train"].astype(np.float64), (data.y["train"] - mean) / std)
    np.testing.assert_allclose(run["test_pred"][...], ref.predict(data.x["test"].astype(np.float64)) * std + mean,
                               rtol=1e-4, atol=1e-4 * std)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)], ids=["tall", "wide"])
@pytest.mark.parametrize("solver", ["eigh", "svd-fallback"])
def test_row_space_is_numpys_with_zero_columns_and_when_eigh_fails(shape, solver, monkeypatch):
    """The basis spans x's row space as numpy's SVD finds it (the same projector, the same singular values),
    with most columns all zero (rank-1 spectra, standardised), and when LAPACK's eigh fails to converge (as it
    did on 3,500 x 2,048 rank-1 spectra: here made to fail, since no small matrix reliably makes it)."""
    rng = np.random.default_rng(0)
    n, d = shape
    x = rng.standard_normal((n, 3)) @ rng.standard_normal((3, d))  # rank 3
    x[:, rng.permutation(d)[: d // 2]] = 0.0
    if solver == "svd-fallback":
        def fails(_):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        monkeypatch.setattr(torch.linalg, "eigh", fails)
    v, s = linear_probe.row_space(torch.from_numpy(x))
    u_np, s_np, vt_np = np.linalg.svd(x, full_matrices=False)
    k = int((s_np > s_np[0] * 1e-8).sum())
    assert k == 3 and v.shape == (d, 3)
    np.testing.assert_allclose(s.numpy()[np.argsort(-s.numpy())], s_np[:k], rtol=1e-10)
    np.testing.assert_allclose(v.numpy() @ v.numpy().T, vt_np[:k].T @ vt_np[:k], atol=1e-10)
    assert linear_probe.row_space(torch.zeros(n, d, dtype=torch.float64))[0].shape == (d, 0)
