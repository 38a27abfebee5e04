"""``--model knn-vote``: DSiRe's classifier (Salama et al. 2024, ``MoSalama98/DSiRe``, ``dsire.py``) on the raw
LoRA factors; pure torch, no store.

dsire.py's steps, in its order:
- *voters*: per module, the singular values of A (down), of B (up) and of their product B A (``svd``,
  ``prepare_BA_matrix``), the top r of each, r the LoRA rank (``--rank`` is both ``svd_lowrank``'s q and
  ``num_svd``; here the module's stored rank, so a module whose rank varies has zeros after an adapter's own).
  Their order (the order of the votes): A then B of each module, in stored order, then B A of each module
  (dsire.py's ``{**svd of the factors, **svd of the products}``). The product is B A as stored, without the
  LoRA scale, as dsire.py forms it; a scale shared by all adapters changes no prediction (below).
- *scale*: one global min-max, (v - min) / (max - min), min and max over every value of every voter of the
  training split (``get_min_max``, which starts from min 1000 and max 0, kept), applied to every split. (A
  positive affine map of all values: each voter's nearest neighbours stay the same; it is kept to be exact.)
- *1-NN per voter*: each voter's nearest training adapter in L2 (faiss ``IndexFlatL2``, k = 1; of equally near
  ones, the first in training order) gives its label.
- *vote*: the most common label of the voters wins; a tie goes to the label that a voter gave first, in voter
  order (``Counter(labels).most_common(1)``).

Two departures, where dsire.py's own code cannot be what it describes: it forms B A as
``B.unsqueeze(1) @ A.unsqueeze(0)``, an (out, 1, in) stack whose "singular values" are the row norms of B A
(and whose faiss index then has the wrong width for any rank above 1); here B A is the (out, in) matrix. And
singular values are computed in float64 from r x r Gram matrices (``voters``), where ``svd_lowrank`` (float32)
is a randomised method, exact up to rounding only because q is the rank.

No training and no randomness: every run of a configuration is the same classifier, and "best" and "last" are
one. Its curves have one entry: train and validation accuracy of the vote (train: each adapter is its own
nearest neighbour), loss = 1 - accuracy (the 0-1 loss), lr 0.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .models import Fitted
from .rawdata import RawFactors, RawSource

DTYPE = torch.float64
START_MIN, START_MAX = 1000.0, 0.0  # dsire.py get_min_max's starting values
_ELEMENTS = 1 << 25  # differences held at once while searching neighbours (256 MB of float64)


def _singular_values(gram: torch.Tensor) -> torch.Tensor:
    """Singular values (n, r), descending, of the matrices whose Gram matrices (n, r, r) these are."""
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(-1)


def voters(raw: RawFactors | RawSource) -> list[torch.Tensor]:
    """Each voter's values (n, r), float64, in voter order: A and B of every module, then B A of every module.
    A split left in the store (a ``RawSource``: it did not fit --raw-memory) is loaded here.

    From the r x r Gram matrices, so no (out, in) product is formed: N = A A^T and M = B^T B hold the squared
    singular values of A and B, and N^1/2 M N^1/2 those of B A (B A A^T B^T has the nonzero eigenvalues of
    M N). Batched eigendecompositions of r x r matrices, not QRs or SVDs of the tall factors (on the CPU a
    batched QR of them took twice as long, per-matrix solver calls); float64, so the squares cost no precision
    that matters here (relative 1e-16 of the largest value, squared).
    """
    if isinstance(raw, RawSource):
        raw = raw.load()
    factors, products = [], []
    for a, b in zip(raw.A, raw.B):
        a, b = a.to(DTYPE), b.to(DTYPE)
        n_gram, m_gram = a @ a.transpose(1, 2), b.transpose(1, 2) @ b  # (n, r, r)
        lam, u = torch.linalg.eigh(n_gram)
        root = (u * lam.clamp(min=0).sqrt()[:, None, :]) @ u.transpose(1, 2)  # N^1/2
        factors += [lam.clamp(min=0).sqrt().flip(-1), _singular_values(m_gram)]
        products.append(_singular_values(root @ m_gram @ root))
    return factors + products


def min_max(values: list[torch.Tensor]) -> tuple[float, float]:
    """dsire.py's global scale: the least and largest value of every voter, from min 1000 and max 0."""
    low = min(START_MIN, *(float(v.min()) for v in values))
    high = max(START_MAX, *(float(v.max()) for v in values))
    return low, high


def stack(values: list[torch.Tensor], low: float, high: float) -> torch.Tensor:
    """The voters scaled, zero-padded to the widest and stacked: (V, n, r_max). Padding adds 0 to every distance."""
    span = high - low if high > low else 1.0  # all training values equal: dsire.py would divide by 0
    width = max(v.shape[1] for v in values)
    return torch.stack([torch.nn.functional.pad((v - low) / span, (0, width - v.shape[1])) for v in values])


def nearest(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Index (V, m) of each voter's nearest training row: queries (V, m, r), train (V, n, r); squared L2 from the
    differences (no |q|^2 + |t|^2 - 2 q.t rounding), the first of equally near rows. In row chunks."""
    voters_, n, r = train.shape
    rows = max(1, _ELEMENTS // max(1, voters_ * n * r))
    out = []
    for start in range(0, queries.shape[1], rows):
        q = queries[:, start:start + rows]
        d2 = (q[:, :, None, :] - train[:, None, :, :]).square().sum(-1)  # (V, rows, n)
        out.append(d2.argmin(-1))  # torch's argmin: the first minimal index
    return torch.cat(out, 1)


def vote_scores(labels: torch.Tensor, n_out: int) -> torch.Tensor:
    """(m, n_out) scores whose argmax is the vote: labels (V, m) -> votes per class plus a tie-break below 1,
    larger for the label a voter gave first ((V - first voter) / (V + 1); 0 for a label no voter gave)."""
    voters_, m = labels.shape
    hot = torch.nn.functional.one_hot(labels.T, n_out).to(DTYPE)  # (m, V, K)
    counts = hot.sum(1)
    position = torch.arange(voters_, device=labels.device, dtype=DTYPE)[None, :, None]
    first = torch.where(hot > 0, position, float(voters_)).amin(1)  # (m, K), V where absent
    return counts + torch.where(counts > 0, (voters_ - first) / (voters_ + 1), 0.0)


def fit(train: tuple, val: tuple, seeds: list[int], hp, task: str, n_out: int, on_epoch=None) -> Fitted:
    """pipeline/models.py's entry for ``--model knn-vote``: the training split's voters, scaled, and their labels."""
    started = time.perf_counter()
    x, y = train
    values = voters(x)
    low, high = min_max(values)
    reference = stack(values, low, high)
    runs = len(seeds)

    def classify(scaled: torch.Tensor) -> torch.Tensor:
        return vote_scores(y[nearest(scaled, reference)], n_out)

    # the splits fit has scaled already (train's voters are the reference): predicting them again after the fit
    # (train's final metrics) computes no voters, and reads no streamed split, a second time
    known = [(x, reference), (val[0], stack(voters(val[0]), low, high))]

    def predict(inputs: RawFactors | RawSource, which: str) -> torch.Tensor:
        scaled = next((s for split, s in known if inputs is split), None)
        return classify(stack(voters(inputs), low, high) if scaled is None else scaled)[None].expand(runs, -1, -1)

    curves = {}
    for split, (scaled, ys) in zip(("train", "val"), ((reference, y), (known[1][1], val[1]))):
        accuracy = float((classify(scaled).argmax(-1) == ys).to(DTYPE).mean())
        curves[f"{split}_score"], curves[f"{split}_loss"] = accuracy, 1.0 - accuracy
    curves["lr"] = 0.0
    if on_epoch is not None:
        on_epoch(1, 0)
    device = y.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_run = {name: [np.array([value], dtype=np.float64) for _ in range(runs)] for name, value in curves.items()}
    return Fitted(per_run, np.ones(runs, dtype=np.int64), predict, time.perf_counter() - started, str(device),
                  one_model=True)


def cost(size, hp: dict, epochs: float, runs: int) -> float:
    """pipeline/models.py's cost (``train --dry-run``): one fit for all runs, about 3 FLOPs per voter value (r
    singular values of each of A, B and B A per module) per pair of an adapter and a training adapter, for the
    train and val splits twice (the curves, then the metrics) and the test split twice (best, last)."""
    values = 3 * sum(rank for rank, _, _ in size.shapes)
    return 3 * values * size.n["train"] * 2 * (size.n["train"] + size.n["val"] + size.n["test"])
