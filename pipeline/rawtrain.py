"""The training loop of the models that learn from the raw LoRA factors (glnet, probe): R runs at once, pure torch.

A network is a ``Net``: pure functions of a parameter dict whose tensors all have a run axis first, so one
step is one batched forward and backward for every run, yet each run has its own initialisation and its
own shuffling (a ``torch.Generator`` seeded with its seed). The loop is pipeline/model.py's protocol with
AdamW: decoupled weight decay as ``torch.optim.AdamW``, a learning rate per run, ReduceLROnPlateau on the
validation score, early stopping with a copy of the best weights; a run that stops leaves the ensemble
(its best and last weights are kept) and the loop ends when none is left.

A split is a resident ``rawdata.RawFactors`` or a streamed ``rawdata.RawSource`` (``rawdata.place`` decides).
An epoch reads a streamed split once: its blocks (row ranges aligned to the stored chunks), in an order
shuffled every epoch, gathered into buffers of at most ``buffer_bytes``; each run shuffles the rows of a
buffer with its own generator and takes its minibatches from them (block shuffling). A resident split is
one buffer, so there each run shuffles all rows, as the MLP does. The train score of an epoch is that of
its minibatches as they were predicted while training (accuracy, or R^2 from their residuals): the
networks have no dropout or batch statistics, and a second pass would read a streamed split twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import metrics
from .hyper import Hyper
from .model import CURVES, Runs, plateau_step  # the MLP's bookkeeping and schedule, shared
from .rawdata import RawFactors, RawSource

ADAMW_BETAS, ADAMW_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults
_EVAL_ELEMENTS = 1 << 25  # evaluate at most this many activations at once (128 MB)
# A training step's batch goes through in parts of at most this many activations (row_elements), their gradients
# summed: the step is the batch's; only its peak memory changes. (The backward keeps several tensors per
# activation: probe's batches of 128 SD-sized adapters would otherwise hold about 14 GB.)
_STEP_ELEMENTS = 1 << 26
_BLOCK_SEED = 0x5EED  # the block order's generator: (first seed, this), apart from every run's own


@dataclass(frozen=True)
class Net:
    """What the loop needs of a network; every tensor of its parameters has the run axis first.

    ``init(gens, shapes, hp, n_out)``: the parameters of run r drawn from ``gens[r]``, stacked, float32 on the CPU;
    ``shapes`` is (rank, in, out) per module. ``forward(params, x, consts, hp)``: outputs (R, b, n_out) for factors
    ``x`` whose tensors have the leading dims (R or 1, b). ``row_elements(shapes, hp)``: activations per adapter and
    run (bounds an evaluation chunk). ``prepare(factors)``: constants fitted on the train split, from one pass over
    its buffers (an iterator of ``RawFactors``); None: none.
    """

    init: Callable
    forward: Callable
    row_elements: Callable
    prepare: Callable | None = None


def shapes_of(x: RawFactors | RawSource) -> list[tuple[int, int, int]]:
    """(rank, in, out) of every module of a split."""
    if isinstance(x, RawSource):
        return [(m["rank"], m["in"], m["out"]) for m in x.entries]
    return [(a.shape[1], a.shape[2], b.shape[1]) for a, b in zip(x.A, x.B)]


def device_of(x: RawFactors | RawSource) -> torch.device:
    return torch.device(x.device) if isinstance(x, RawSource) else x.A[0].device


def buffers(x: RawFactors | RawSource, gen: np.random.Generator | None = None):
    """(factors, positions) for every row of a split: a resident one whole, a streamed one buffer by buffer, its
    blocks in stored order or, with ``gen``, in a shuffled order. Positions index the split's targets."""
    if isinstance(x, RawFactors):
        yield x, np.arange(len(x))
        return
    blocks = x.blocks()
    if gen is not None:
        blocks = [blocks[i] for i in gen.permutation(len(blocks))]
    most = max(1, x.buffer_bytes // x.row_bytes)  # kept rows a buffer holds (at least one block)
    group, rows = [], 0
    for start, stop in blocks:
        n = int(np.searchsorted(x.keep, stop) - np.searchsorted(x.keep, start))
        if group and rows + n > most:
            yield x.read(group)
            group, rows = [], 0
        group.append((start, stop))
        rows += n
    if group:
        yield x.read(group)


def _lead(x: RawFactors) -> RawFactors:
    """The factors with a leading axis of 1: shared by every run."""
    return RawFactors(x.modules, [a[None] for a in x.A], [b[None] for b in x.B], [s[None] for s in x.scale])


def runs_matmul(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each run's map ``w`` (R, m, n) applied to its rows' ``x`` (R or 1, b, n, k): (R, b, m, k), as one bmm.
    A broadcast ``w[:, None] @ x`` copies w once per row first (b x m x n numbers: on SD-sized modules more
    memory traffic than the product itself); this copies only x, laid out as (R, n, b k)."""
    runs, b, n, k = w.shape[0], x.shape[1], x.shape[2], x.shape[3]
    y = w @ x.expand(runs, -1, -1, -1).transpose(1, 2).reshape(runs, n, b * k)
    return y.reshape(runs, -1, b, k).transpose(1, 2)


def matmul_runs(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` (R or 1, b, k, n) times each run's ``w`` (R, n, m): (R, b, k, m), as one bmm (without the copy
    of w per row that a broadcast ``x @ w[:, None]`` makes)."""
    runs, b, k, n = w.shape[0], x.shape[1], x.shape[2], x.shape[3]
    return (x.expand(runs, -1, -1, -1).reshape(runs, b * k, n) @ w).reshape(runs, b, k, -1)


def evaluate(net: Net, params: dict, x: RawFactors | RawSource, consts: dict, hp: Hyper, n_out: int) -> torch.Tensor:
    """Outputs (R, n, n_out) of every run for a split, in the order of its targets, in bounded chunks."""
    runs = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    rows = max(1, _EVAL_ELEMENTS // (runs * max(1, net.row_elements(shapes_of(x), hp))))
    out = torch.empty(runs, len(x), n_out, device=device)
    with torch.no_grad():
        for factors, positions in buffers(x):
            positions = torch.as_tensor(positions, device=device)
            for i in range(0, len(positions), rows):
                out[:, positions[i:i + rows]] = net.forward(params, _lead(factors.rows(slice(i, i + rows))), consts, hp)
    return out


# --- the optimiser -----------------------------------------------------------------------------------


@dataclass
class AdamW:
    """AdamW's moments (shaped like the parameters, run axis first) and the step count all runs share."""

    exp_avg: dict
    exp_avg_sq: dict
    step: int = 0

    @classmethod
    def of(cls, params: dict) -> "AdamW":
        return cls({k: torch.zeros_like(v) for k, v in params.items()}, {k: torch.zeros_like(v) for k, v in params.items()})

    def keep(self, index: torch.Tensor) -> None:
        for moments in (self.exp_avg, self.exp_avg_sq):
            for k in moments:
                moments[k] = moments[k][index].contiguous()


def adamw_step(params: dict, grads: list, adam: AdamW, lr: np.ndarray, weight_decay: float) -> None:
    """One ``torch.optim.AdamW`` step of every run in place, with run r's learning rate ``lr[r]`` (numpy (R,)).

    torch's fused kernel (``AdamW(fused=True)``'s: one memory pass; the elementwise formula took ten times as long
    on the CPU, most of a GL-net step) once per distinct learning rate: on the whole tensors when every run has the
    same one (the usual case), else on each group's per-run rows."""
    adam.step += 1
    first = next(iter(params.values()))
    step = torch.tensor(float(adam.step), device=first.device)
    keys = list(params)
    groups = [(float(lr[0]), slice(None))] if np.all(lr == lr[0]) else \
        [(float(rate), np.flatnonzero(lr == rate)) for rate in np.unique(lr)]
    with torch.no_grad():
        for rate, rows in groups:
            def pick(tensors):
                return list(tensors) if isinstance(rows, slice) else [t[r] for t in tensors for r in rows]
            p = pick(params[k] for k in keys)
            torch._fused_adamw_(p, pick(grads), pick(adam.exp_avg[k] for k in keys), pick(adam.exp_avg_sq[k] for k in keys),
                                [], [step] * len(p), lr=rate, beta1=ADAMW_BETAS[0], beta2=ADAMW_BETAS[1],
                                weight_decay=weight_decay, eps=ADAMW_EPS, amsgrad=False, maximize=False)


# --- the loop ----------------------------------------------------------------------------------------


def _train_epoch(net: Net, params: dict, adam: AdamW, x, y: torch.Tensor, consts: dict, hp: Hyper, task: str,
                 runs: Runs, gens: list, block_gen: np.random.Generator, sst: float) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the train split for the active runs; their mean train loss and train score (A,)."""
    device = next(iter(params.values())).device
    active = runs.active
    loss_sum = torch.zeros(len(active), dtype=torch.float64, device=device)
    score_sum = torch.zeros(len(active), dtype=torch.float64, device=device)
    seen = 0
    micro = max(1, _STEP_ELEMENTS // (len(active) * max(1, net.row_elements(shapes_of(x), hp))))
    for factors, positions in buffers(x, block_gen):
        y_buffer = y[torch.as_tensor(positions, device=device)]
        order = torch.stack([torch.randperm(len(positions), generator=gens[r]) for r in active]).to(device)
        for start in range(0, len(positions), hp.batch_size):
            index = order[:, start:start + hp.batch_size]
            grads = None
            for part in index.split(micro, dim=1):  # the whole batch at once unless its activations would not fit
                yb = y_buffer[part]
                out = net.forward(params, factors.rows(part), consts, hp)
                loss = metrics.loss(out, yb, task)  # (A,): each run's mean over the part
                weight = part.shape[1] / index.shape[1]
                g = torch.autograd.grad((loss * weight).sum() if weight != 1 else loss.sum(), list(params.values()))
                grads = g if grads is None else [total.add_(x) for total, x in zip(grads, g)]
                with torch.no_grad():
                    seen += part.shape[1]
                    loss_sum += loss.detach().to(torch.float64) * part.shape[1]
                    if task == "classification":
                        score_sum += (out.argmax(-1) == yb).sum(1).to(torch.float64)
                    else:
                        score_sum += ((out[..., 0] - yb) ** 2).sum(1).to(torch.float64)
            adamw_step(params, grads, adam, runs.lr[active], hp.weight_decay)
    loss, score = (loss_sum / seen).cpu().numpy(), score_sum.cpu().numpy()
    return loss, score / seen if task == "classification" else 1 - score / sst


def fit(net: Net, train: tuple, val: tuple, seeds: list[int], hp: Hyper, task: str, n_out: int, on_epoch=None):
    """Train one run per seed, together, on the device of the train split; a ``models.Fitted``.

    train, val: (factors, targets): a ``RawFactors`` or ``RawSource`` and (n,) class codes or standardised floats
    on the device. ``on_epoch(epoch, active)`` after each epoch with the number of runs still training."""
    from .models import Fitted

    started = time.perf_counter()
    (x_train, y_train), (x_val, y_val) = train, val
    device = device_of(x_train)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    params = {k: v.to(device).requires_grad_() for k, v in net.init(gens, shapes_of(x_train), hp, n_out).items()}
    consts = net.prepare(f for f, _ in buffers(x_train)) if net.prepare else {}
    best = {k: v.detach().clone() for k, v in params.items()}
    last = {k: v.detach().clone() for k, v in params.items()}
    adam = AdamW.of(params)
    runs = Runs.start(len(seeds), hp.lr)
    block_gen = np.random.default_rng([seeds[0], _BLOCK_SEED])
    sst = float(((y_train - y_train.mean()) ** 2).sum()) if task == "regression" else 1.0
    for epoch in range(1, hp.epochs + 1):
        active = runs.active
        train_loss, train_score = _train_epoch(net, params, adam, x_train, y_train, consts, hp, task, runs, gens, block_gen, sst)
        with torch.no_grad():
            out = evaluate(net, params, x_val, consts, hp, n_out)
            val_loss = metrics.loss(out, y_val[None].expand(len(active), -1), task).cpu().numpy()
            val_score = metrics.score(out, y_val, task).cpu().numpy()
        for pos, r in enumerate(active):
            for name, value in zip(CURVES, (train_loss[pos], train_score[pos], val_loss[pos], val_score[pos], runs.lr[r])):
                runs.curves[name][r].append(float(value))
        plateau_step(runs, val_score, hp)
        improved = val_score > runs.best_score[active]  # strictly; NaN never is
        if improved.any():
            where, ids = torch.as_tensor(np.flatnonzero(improved), device=device), torch.as_tensor(active[improved], device=device)
            for k, v in params.items():
                best[k][ids] = v.detach()[where]
        runs.best_epoch[active[improved]] = epoch
        runs.best_score[active] = np.where(improved, val_score, runs.best_score[active])
        runs.bad_epochs[active] = np.where(improved, 0, runs.bad_epochs[active] + 1)
        stop = (runs.bad_epochs[active] >= hp.patience) | (epoch == hp.epochs)
        if stop.any():
            where, ids = torch.as_tensor(np.flatnonzero(stop), device=device), torch.as_tensor(active[stop], device=device)
            keep = torch.as_tensor(np.flatnonzero(~stop), device=device)
            for k, v in params.items():
                last[k][ids] = v.detach()[where]
                params[k] = v.detach()[keep].contiguous().requires_grad_()
            adam.keep(keep)
            runs.active = active[~stop]
        if on_epoch is not None:
            on_epoch(epoch, len(runs.active))
        if len(runs.active) == 0:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    curves = {k: [np.asarray(c, dtype=np.float64) for c in v] for k, v in runs.curves.items()}
    weights = {"best": best, "last": last}

    def predict(x, which):
        return evaluate(net, weights[which], x, consts, hp, n_out)

    return Fitted(curves, runs.best_epoch, predict, time.perf_counter() - started, str(device))
