"""The oracles the tests compare the pipeline with: plain loops written from the definitions, no batching.

- the original training loop (nn.Sequential, a shuffled DataLoader, torch.optim.Adam, ReduceLROnPlateau),
  which each run of pipeline/model.py's batched ensemble equals on the CPU (tests/test_train.py, and with
  the ensemble's dropout masks tests/test_step.py);
- one per-sample numpy function per representation, float64 (tests/test_representations.py; bench/features.py
  times them as the original's per-sample feature loop);
- DSiRe's classifier, dsire.py's steps one by one (``dsire_predict``; tests/test_knn_vote.py).
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import torch
from torch import nn


# --- the original training loop ----------------------------------------------------------------------


class _GivenDropout(nn.Module):
    """nn.Dropout whose masks are given: ``masks(step, layer, rows, width)`` -> multipliers (rows, width)."""

    def __init__(self, masks, layer: int, clock: list):
        super().__init__()
        self.masks, self.layer, self.clock = masks, layer, clock

    def forward(self, x):
        return x * self.masks(self.clock[0], self.layer, *x.shape) if self.training else x


def original_run(x_train, y_train, x_val, y_val, x_test, y_test, seed: int, hp, n_classes: int, device="cpu",
                 dropout_masks=None) -> dict:
    """One run of the original loop (classification): its curves, best epoch, and the test accuracy of its
    best-validation weights. ``hp`` is a pipeline.model.Hyper.

    The only departures from the original: a one-row last batch is skipped (BatchNorm would raise), and
    the best weights are deep-copied (the original kept a reference, so it evaluated the last weights).
    ``dropout_masks(step, layer, rows, width)``, if given, replaces nn.Dropout's Bernoulli draws (which then
    take nothing from torch's generator): step counts the optimizer steps from 1, layer the hidden layers from 0.
    """
    from sklearn.metrics import accuracy_score

    torch.manual_seed(seed)
    np.random.seed(seed)
    layers, width, clock = [], x_train.shape[1], [0]
    for layer in range(hp.depth):
        dropout = nn.Dropout(hp.dropout) if dropout_masks is None else _GivenDropout(dropout_masks, layer, clock)
        layers += [nn.Linear(width, hp.hidden), nn.BatchNorm1d(hp.hidden), nn.ReLU(), dropout]
        width = hp.hidden
    model = nn.Sequential(*layers, nn.Linear(width, n_classes)).to(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=hp.batch_size,
                                         shuffle=True)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=hp.plateau_factor,
                                                           patience=hp.plateau_patience)
    curves = {"train_loss": [], "train_score": [], "val_score": [], "lr": []}
    best, best_epoch, bad, best_copy = -np.inf, 0, 0, None
    for epoch in range(1, hp.epochs + 1):
        model.train()
        total, correct, seen = 0.0, 0, 0
        lr = optimizer.param_groups[0]["lr"]
        for xb, yb in loader:
            if len(yb) < 2:
                continue
            xb, yb = xb.to(device), yb.to(device)
            clock[0] += 1
            optimizer.zero_grad()
            out = model(xb)
            loss = criterion(out, yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
        model.eval()
        with torch.no_grad():
            val_acc = accuracy_score(y_val.numpy(), model(x_val.to(device)).argmax(1).cpu().numpy())
        scheduler.step(val_acc)
        for name, value in zip(curves, (total / seen, correct / seen, val_acc, lr)):
            curves[name].append(value)
        if val_acc > best:
            best, best_epoch, bad = val_acc, epoch, 0
            best_copy = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= hp.patience:
                break
    model.load_state_dict(best_copy)
    model.eval()
    with torch.no_grad():
        test_best = accuracy_score(y_test.numpy(), model(x_test.to(device)).argmax(1).cpu().numpy())
    return {"curves": curves, "best_epoch": best_epoch, "test_best": test_best}


# --- representations: plain per-sample numpy loops, float64, from the definitions --------------------


def _std(a):
    return a.std(ddof=1) if a.size > 1 else 0.0


def _skew_kurt(a):
    z = (a - a.mean()) / (_std(a) + 1e-8)
    return [(z ** 3).mean(), (z ** 4).mean()]


def _pad(v, k):
    v = np.asarray(v, dtype=np.float64)[:k]
    return np.concatenate([v, np.zeros(k - v.size)])


def _entropy(p):
    return -(p * np.log(p + 1e-8)).sum()


def ref_simple_stats(m):
    a = m.astype(np.float64).ravel()
    return [np.sqrt((a * a).sum()), a.mean(), _std(a), a.max(), a.min()]


def ref_rank_based(m):
    q = np.quantile(m.astype(np.float64).ravel(), [0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99])
    return [*q, q[5] - q[3], q[8] - q[0]]


def ref_stats(m):
    a = m.astype(np.float64).ravel()
    median = np.sort(a)[(a.size - 1) // 2]  # lower middle
    return [a.mean(), _std(a), median, a.min(), a.max(), *_skew_kurt(a)]


def ref_spectral(m):
    s = _pad(np.linalg.svd(m.astype(np.float64), compute_uv=False), 10)
    p = s / (s.sum() + 1e-8)
    gaps = [(s[i] - s[i + 1]) / (s[i] + 1e-8) for i in range(9)]
    return [*s, *p, *gaps, _entropy(p), s[0] / (s[9] + 1e-8), s.sum()]


def ref_matrix_norms(m):
    m = m.astype(np.float64)
    s = np.linalg.svd(m, compute_uv=False)
    fro = np.linalg.norm(m, "fro")
    cols, rows = np.abs(m).sum(0).max(), np.abs(m).sum(1).max()
    return [fro, s.sum(), s[0], cols, rows, s.sum() / (fro + 1e-8), s[0] / (fro + 1e-8)]


def ref_distribution(m):
    a = m.astype(np.float64).ravel()
    q = np.quantile(a, [0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95])
    mad = np.abs(a - a.mean()).mean()
    return [*q, q[4] - q[2], mad, _std(a) / (abs(a.mean()) + 1e-8), *_skew_kurt(a)]


def ref_frequency(m):
    mag = np.abs(np.fft.fft2(m.astype(np.float64))).ravel()
    top = _pad(np.sort(mag)[::-1], 10)
    return [*top, mag.mean(), mag.std(), mag.max(), (top ** 2).sum() / ((mag ** 2).sum() + 1e-8)]


def ref_info_theoretic(m):
    hist, _ = np.histogram(m.ravel(), bins=50)  # float32 input: numpy builds float32 edges, as we do
    p = hist / hist.sum()
    return [_entropy(p), _entropy(p) / np.log(50)]


def ref_ensemble(m):
    return [*ref_spectral(m), *ref_matrix_norms(m), *ref_distribution(m), *ref_frequency(m), *ref_info_theoretic(m)]


def _dense(A, B, s):
    return float(s) * (B.astype(np.float64) @ A.astype(np.float64))


def ref_dw_spectrum(A, B, s, params):
    return _pad(np.linalg.svd(_dense(A, B, s), compute_uv=False), params.k)


def ref_dw_norms(A, B, s, params):
    dw = _dense(A, B, s)
    sv = np.linalg.svd(dw, compute_uv=False)
    fro = np.linalg.norm(dw, "fro")
    p = sv / sv.sum()
    p = p[p > 0]
    return [fro, sv[0], sv.sum(), fro ** 2 / sv[0] ** 2, -(p * np.log(p)).sum()]


def ref_dw_stats(A, B, s, params):
    a = _dense(A, B, s).ravel()
    return [a.mean(), _std(a), *_skew_kurt(a)]


def ref_dw_quantiles(A, B, s, params):
    return np.quantile(_dense(A, B, s).ravel(), [0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99])


def ref_dw_probe(A, B, s, params):
    gen = torch.Generator().manual_seed(params.seed)
    x = torch.randn(params.count, A.shape[1], generator=gen).double().numpy()
    return np.linalg.norm(_dense(A, B, s) @ x.T, axis=0)


def ref_dw_canonical(A, B, s, params):
    dw = _dense(A, B, s)
    u, sv, vt = np.linalg.svd(dw, full_matrices=False)
    tol = sv[0] * max(dw.shape) * np.finfo(np.float32).eps
    out = []
    for j in range(params.k):
        if j >= sv.size or sv[j] <= tol:
            out += [0.0] * 10
            continue
        sign = np.sign(u[np.argmax(np.abs(u[:, j])), j])
        for c in (u[:, j] * sign * np.sqrt(sv[j]), vt[j] * sign * np.sqrt(sv[j])):
            out += [c.mean(), _std(c), c.min(), c.max(), np.abs(c).sum() / (np.sqrt(c.size) * np.linalg.norm(c))]
    return out


# --- DSiRe (MoSalama98/DSiRe, dsire.py) ------------------------------------------------------------------


def dsire_voters(factors: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """One adapter's voters as dsire.py builds them: ``svd`` of each factor (down A, then up B, per module), then
    of each product B @ A (``prepare_BA_matrix``), ``{**factors, **products}``; each kept to its top r (r = the
    rank: ``num_svd``). ``factors``: per module (A (r, in), B (out, r)). The product is the (out, in) matrix."""
    voters, products = {}, {}
    for m, (a, b) in enumerate(factors):
        r = a.shape[0]
        a, b = a.astype(np.float64), b.astype(np.float64)
        voters[f"{m}.down"] = _pad(np.linalg.svd(a, compute_uv=False), r)
        voters[f"{m}.up"] = _pad(np.linalg.svd(b, compute_uv=False), r)
        products[f"{m}"] = _pad(np.linalg.svd(b @ a, compute_uv=False), r)
    return {**voters, **products}


def dsire_predict(train: list, y_train: list, queries: list) -> list:
    """dsire.py's main loop on one split: ``train`` and ``queries`` lists of adapters (each a list of per-module
    (A, B)), ``y_train`` their labels; returns one label per query."""
    train_points = [dsire_voters(f) for f in train]
    query_points = [dsire_voters(f) for f in queries]
    min_val, max_val = 1000, 0  # get_min_max, over the training adapters only
    for point in train_points:
        for values in point.values():
            min_val = min(min_val, values.min())
            max_val = max(max_val, values.max())
    span = max_val - min_val if max_val > min_val else 1.0

    def normalize(point):  # normalize_data, every split with the training min and max
        return {key: (values - min_val) / span for key, values in point.items()}

    train_points = [normalize(p) for p in train_points]
    query_points = [normalize(p) for p in query_points]
    predictions = []
    for point in query_points:
        labels = []
        for key in point:  # classify_faiss: each layer's IndexFlatL2, k = 1
            distances = [float(((point[key] - t[key]) ** 2).sum()) for t in train_points]
            labels.append(y_train[int(np.argmin(distances))])  # the first of equally near ones
        predictions.append(Counter(labels).most_common(1)[0][0])
    return predictions


REFERENCES = {name[4:]: fn for name, fn in list(globals().items()) if name.startswith("ref_")}
