"""The trainer: an MLP (or a linear model) for R runs at once, its Adam step and its loop; pure torch, no store.

Each weight has a leading run axis, so one step is a few batched matmuls for all runs, yet every run
has its own initialisation, shuffling, dropout masks, BatchNorm statistics, learning rate schedule
and early stopping. Runs that stop are dropped from the ensemble (their best and last weights are
kept), and the loop ends when all have stopped.

Run r of ``train_ensemble`` is, on the CPU and up to float rounding, the plain loop with
``torch.manual_seed(seeds[r])``: ``nn.Sequential`` of ``depth`` x (Linear, BatchNorm1d, ReLU, Dropout)
then Linear, a shuffled ``DataLoader``, ``torch.optim.Adam`` with L2 weight decay, ``ReduceLROnPlateau``
(mode max) on the validation score, early stopping with a copy of the best weights. That plain loop is
tests/reference.py's ``original_run``, and tests/test_train.py checks the equality. It holds because
each run draws from its own generator exactly what the plain loop draws from torch's global one, in
the same order: model init; per epoch the DataLoader's two seed draws then a randperm; a Bernoulli
mask per Dropout per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .hyper import Hyper

BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # torch.nn.BatchNorm1d defaults
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam defaults
PLATEAU_THRESHOLD = 1e-4  # ReduceLROnPlateau default (relative)
_EVAL_ELEMENTS = 1 << 25  # evaluate at most this many hidden activations at once (128 MB)
CURVES = ("train_loss", "train_score", "val_loss", "val_score", "lr")  # per run, one value per epoch trained


@dataclass
class Ensemble:
    """The outcome of training R runs together: per run curves, best epoch, best and last weights."""

    curves: dict[str, list[np.ndarray]]  # name -> per run (epochs_trained,) arrays
    best_epoch: np.ndarray  # (R,) 1-based
    best: dict  # state with the best-validation weights of every run (copied when they were best)
    last: dict  # state at each run's last epoch
    depth: int
    seconds: float = 0.0
    device: str = "cpu"


# --- the network -------------------------------------------------------------------------------------


def _init_state(seeds: list[int], n_in: int, n_out: int, hp: Hyper) -> tuple[dict, list[torch.Generator]]:
    """Per run, nn.Linear's init drawn from that run's generator in nn.Sequential's order; stacked on a run axis.

    Weights are (R, in, out); BatchNorm weight 1, bias 0, running mean 0, running var 1.
    """
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    sizes = [n_in] + [hp.hidden] * hp.depth + [n_out]
    per_run = []
    for g in gens:
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / fan_in ** 0.5  # kaiming_uniform_(a=sqrt(5)) and the bias rule of nn.Linear
            w = torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=g)
            b = torch.empty(fan_out).uniform_(-bound, bound, generator=g)
            layers.append((w.T.contiguous(), b))
        per_run.append(layers)
    state = {}
    for i in range(len(sizes) - 1):
        state[f"w{i}"] = torch.stack([run[i][0] for run in per_run])
        state[f"b{i}"] = torch.stack([run[i][1] for run in per_run])
        if i < hp.depth:
            state[f"gamma{i}"] = torch.ones(len(seeds), sizes[i + 1])
            state[f"beta{i}"] = torch.zeros(len(seeds), sizes[i + 1])
            state[f"mean{i}"] = torch.zeros(len(seeds), sizes[i + 1])
            state[f"var{i}"] = torch.ones(len(seeds), sizes[i + 1])
    return state, gens


def _is_param(key: str) -> bool:
    return not key.startswith(("mean", "var"))


def forward(state: dict, x: torch.Tensor, depth: int, train: bool = False, dropout: float = 0.0,
            noise_gens: list | None = None) -> torch.Tensor:
    """Outputs (R, b, out) of every run. x: (R, b, in), one batch per run, or (n, in) shared by all runs."""
    h = x
    for i in range(depth + 1):
        w, b = state[f"w{i}"], state[f"b{i}"]
        h = torch.baddbmm(b[:, None], h, w) if h.dim() == 3 else torch.matmul(h, w) + b[:, None]
        if i == depth:
            return h
        runs, rows, width = h.shape
        # BatchNorm1d per run: runs x channels become the channels of one batch_norm call, so each run
        # is normalised over its own batch, and its running stats (views of state) update in place.
        flat = h.transpose(0, 1).reshape(rows, runs * width)
        flat = F.batch_norm(flat, state[f"mean{i}"].view(-1), state[f"var{i}"].view(-1), state[f"gamma{i}"].reshape(-1),
                            state[f"beta{i}"].reshape(-1), training=train, momentum=BN_MOMENTUM, eps=BN_EPS)
        h = torch.relu(flat.view(rows, runs, width).transpose(0, 1))
        if train and dropout > 0:
            # F.dropout on the CPU is input * bernoulli_(1 - p) / (1 - p): the same draws, from each run's generator
            noise = torch.stack([torch.empty(rows, width, device=h.device).bernoulli_(1 - dropout, generator=g)
                                 for g in noise_gens])
            h = h * noise.div_(1 - dropout)
    return h


def evaluate(state: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """Eval-mode outputs (R, n, out) for a shared input (n, in), in row chunks that bound the memory:
    at most _EVAL_ELEMENTS activations of the widest layer at once, whatever n is."""
    runs = state["w0"].shape[0]
    widest = max(state[f"w{i}"].shape[-1] for i in range(depth + 1))
    rows = max(1, _EVAL_ELEMENTS // (runs * widest))
    with torch.no_grad():
        return torch.cat([forward(state, x[i:i + rows], depth) for i in range(0, len(x), rows)], dim=1)


def _loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Mean loss per run (R,): out (R, b, K or 1), y (R, b)."""
    runs, rows = y.shape
    if task == "classification":
        return F.cross_entropy(out.reshape(runs * rows, -1), y.reshape(-1), reduction="none").view(runs, rows).mean(1)
    return ((out[..., 0] - y) ** 2).mean(1)


def _score(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Accuracy or R^2 per run (R,) of outputs (R, n, K or 1) against y (n,)."""
    if task == "classification":
        return (out.argmax(-1) == y[None]).to(torch.float64).mean(1)
    return metrics.r2(y, out[..., 0])


# --- the optimiser -----------------------------------------------------------------------------------


@dataclass
class _Adam:
    """Adam's moments (each shaped like its parameter, run axis first) and the step count all runs share."""

    exp_avg: dict
    exp_avg_sq: dict
    step: int = 0

    @classmethod
    def of(cls, state: dict) -> "_Adam":
        return cls({k: torch.zeros_like(v) for k, v in state.items() if _is_param(k)},
                   {k: torch.zeros_like(v) for k, v in state.items() if _is_param(k)})


def _adam_step(state: dict, params: dict, grads, adam: _Adam, lr: np.ndarray, weight_decay: float) -> None:
    """torch.optim.Adam (L2 weight decay added to the gradient), with one learning rate per run: lr (A,) numpy.

    torch's fused Adam kernel (the one behind ``Adam(fused=True)``, on the CPU and CUDA): one pass over
    each parameter, its gradient and moments, where the unfused update makes about ten. With R runs
    batched, the parameters are R times larger than one model's and no longer sit in the CPU's cache,
    so the passes are what a step costs. Runs that share a learning rate are updated in one call
    (usually all of them); each run's slice of a parameter is a contiguous view.
    """
    beta1, beta2 = ADAM_BETAS
    keys = list(params)
    detached = [params[k].detach() for k in keys]
    grads = [g.contiguous() for g in grads]
    moments = ([adam.exp_avg[k] for k in keys], [adam.exp_avg_sq[k] for k in keys])
    for value in np.unique(lr):
        runs = np.flatnonzero(lr == value)
        if len(runs) == len(lr):
            groups = (detached, grads, *moments)
        else:
            groups = tuple([t[r] for t in tensors for r in runs] for tensors in (detached, grads, *moments))
        steps = [torch.tensor(float(adam.step), device=detached[0].device) for _ in groups[0]]
        torch._fused_adam_(*groups, [], steps, amsgrad=False, lr=float(value), beta1=beta1, beta2=beta2,
                           weight_decay=weight_decay, eps=ADAM_EPS, maximize=False)
    for key, param in zip(keys, detached):
        state[key] = param


# --- the loop ----------------------------------------------------------------------------------------


@dataclass
class _Runs:
    """The loop's per-run bookkeeping, numpy arrays indexed by run (position in ``seeds``)."""

    active: np.ndarray  # the runs still training, in ensemble order (the order of the run axis of the state)
    lr: np.ndarray
    best_score: np.ndarray
    best_epoch: np.ndarray  # 0 until a finite validation score was seen
    bad_epochs: np.ndarray  # epochs since the best one (early stopping)
    plateau_best: np.ndarray  # the scheduler's own best and bad-epoch count (reset when it lowers lr)
    plateau_bad: np.ndarray
    curves: dict[str, list[list[float]]]

    @classmethod
    def start(cls, runs: int, lr: float) -> "_Runs":
        return cls(np.arange(runs), np.full(runs, lr), np.full(runs, -np.inf), np.zeros(runs, int), np.zeros(runs, int),
                   np.full(runs, -np.inf), np.zeros(runs, int), {k: [[] for _ in range(runs)] for k in CURVES})


def _epoch_order(gen: torch.Generator, n: int) -> torch.Tensor:
    """The permutation a shuffled DataLoader would use, drawing from ``gen`` as it draws from the global one."""
    torch.empty((), dtype=torch.int64).random_(generator=gen)  # _BaseDataLoaderIter's base seed
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())  # RandomSampler's seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _train_epoch(state: dict, adam: _Adam, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, lr: np.ndarray,
                 noise_gens: list, hp: Hyper, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over each active run's shuffled batches (order (A, n)); mean train loss and score (A,) float64.

    The score is the batches' accuracy (classification; regression's is recomputed on the whole train set).
    """
    runs, n = order.shape
    loss_sum = torch.zeros(runs, dtype=torch.float64, device=x.device)
    score_sum = torch.zeros(runs, dtype=torch.float64, device=x.device)
    seen = 0
    for start in range(0, n, hp.batch_size):
        idx = order[:, start:start + hp.batch_size]
        if idx.shape[1] < 2:  # a one-row batch: BatchNorm cannot train on it (the original would crash)
            continue
        xb, yb = x[idx], y[idx]
        params = {k: v.requires_grad_() for k, v in state.items() if _is_param(k)}
        out = forward(state, xb, hp.depth, train=True, dropout=hp.dropout, noise_gens=noise_gens)
        loss = _loss(out, yb, task)
        grads = torch.autograd.grad(loss.sum(), list(params.values()))
        adam.step += 1
        with torch.no_grad():
            _adam_step(state, params, grads, adam, lr, hp.weight_decay)
            rows = idx.shape[1]
            seen += rows
            loss_sum += loss.detach().to(torch.float64) * rows
            if task == "classification":
                score_sum += (out.argmax(-1) == yb).sum(1).to(torch.float64)
    return loss_sum / max(seen, 1), score_sum / max(seen, 1)


def _record(runs: _Runs, values: np.ndarray) -> None:
    """Append one epoch to the active runs' curves: values (4, A) = train loss, train score, val loss, val score."""
    for pos, r in enumerate(runs.active):
        for name, value in zip(CURVES, (*values[:, pos], runs.lr[r])):
            runs.curves[name][r].append(value)


def _plateau_step(runs: _Runs, scores: np.ndarray, hp: Hyper) -> None:
    """ReduceLROnPlateau(mode="max", threshold=1e-4 relative), stepped on the active runs' validation scores (A,)."""
    active = runs.active
    better = scores > runs.plateau_best[active] * (1 + PLATEAU_THRESHOLD)
    runs.plateau_best[active] = np.where(better, scores, runs.plateau_best[active])
    runs.plateau_bad[active] = np.where(better, 0, runs.plateau_bad[active] + 1)
    reduce = active[runs.plateau_bad[active] > hp.plateau_patience]
    smaller = runs.lr[reduce] * hp.plateau_factor
    runs.lr[reduce] = np.where(runs.lr[reduce] - smaller > 1e-8, smaller, runs.lr[reduce])  # the scheduler's eps
    runs.plateau_bad[reduce] = 0


def _early_stopping(runs: _Runs, scores: np.ndarray, epoch: int, state: dict, best: dict, hp: Hyper) -> np.ndarray:
    """Copy the weights of the runs whose validation score is strictly better (COPIED: the original kept a
    reference, so it evaluated the last weights); returns which active runs stop now (A,) bool."""
    active = runs.active
    improved = scores > runs.best_score[active]
    if improved.any():
        device = state["w0"].device
        pos = torch.as_tensor(np.flatnonzero(improved), device=device)
        ids = torch.as_tensor(active[improved], device=device)
        for k, v in state.items():
            best[k][ids] = v.detach()[pos]
    runs.best_epoch[active[improved]] = epoch
    runs.best_score[active] = np.where(improved, scores, runs.best_score[active])
    runs.bad_epochs[active] = np.where(improved, 0, runs.bad_epochs[active] + 1)
    return (runs.bad_epochs[active] >= hp.patience) | (epoch == hp.epochs)


def _drop_stopped(runs: _Runs, stop: np.ndarray, state: dict, last: dict, adam: _Adam) -> None:
    """Keep the stopped runs' last weights and take them out of the ensemble (state and Adam moments)."""
    device = state["w0"].device
    pos = torch.as_tensor(np.flatnonzero(stop), device=device)
    ids = torch.as_tensor(runs.active[stop], device=device)
    keep = torch.as_tensor(np.flatnonzero(~stop), device=device)
    for k, v in state.items():
        last[k][ids] = v.detach()[pos]
    for d in (state, adam.exp_avg, adam.exp_avg_sq):
        for k in d:
            d[k] = d[k].detach()[keep].contiguous()
    runs.active = runs.active[~stop]


def train_ensemble(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                   seeds: list[int], hp: Hyper, task: str, n_out: int, on_epoch=None) -> Ensemble:
    """Train one run per seed, together, on the device of x_train. x: (n, d) float32; y: (n,) codes or floats.
    ``on_epoch(epoch, active)``, if given, is called after each epoch with the number of runs still training."""
    started = time.perf_counter()
    device = x_train.device
    init, gens = _init_state(seeds, x_train.shape[1], n_out, hp)
    state = {k: v.to(device) for k, v in init.items()}
    # CUDA dropout needs CUDA generators: reproducible there, but not the original's draws
    noise_gens = gens if device.type == "cpu" else [torch.Generator(device=device).manual_seed(s) for s in seeds]
    best = {k: v.clone() for k, v in state.items()}
    last = {k: v.clone() for k, v in state.items()}
    adam = _Adam.of(state)
    runs = _Runs.start(len(seeds), hp.lr)
    for epoch in range(1, hp.epochs + 1):
        active = runs.active
        order = torch.stack([_epoch_order(gens[r], len(x_train)) for r in active]).to(device)  # (A, n)
        train_loss, train_score = _train_epoch(state, adam, x_train, y_train, order, runs.lr[active],
                                               [noise_gens[r] for r in active], hp, task)
        with torch.no_grad():
            val_out = evaluate(state, x_val, hp.depth)
            val_loss = _loss(val_out, y_val[None].expand(len(active), -1), task)
            val_score = _score(val_out, y_val, task)
        host = torch.stack([train_loss, train_score, val_loss.to(torch.float64),
                            val_score.to(torch.float64)]).cpu().numpy()  # one device sync per epoch
        _record(runs, host)
        if task == "regression":  # R^2 of the training batches is not meaningful: report it on the whole train set
            with torch.no_grad():
                train_r2 = _score(evaluate(state, x_train, hp.depth), y_train, task).cpu().numpy()
            for pos, r in enumerate(active):
                runs.curves["train_score"][r][-1] = train_r2[pos]
        scores = host[3]
        _plateau_step(runs, scores, hp)
        stop = _early_stopping(runs, scores, epoch, state, best, hp)
        if stop.any():
            _drop_stopped(runs, stop, state, last, adam)
        if on_epoch is not None:
            on_epoch(epoch, len(runs.active))
        if len(runs.active) == 0:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    curves = {k: [np.asarray(c, dtype=np.float64) for c in v] for k, v in runs.curves.items()}
    return Ensemble(curves, runs.best_epoch, best, last, hp.depth, time.perf_counter() - started, str(device))


def fit(train: tuple, val: tuple, seeds: list[int], hp: Hyper, task: str, n_out: int, on_epoch=None):
    """pipeline/models.py's entry for the MLP (and the MLP-trained linear model): ``train_ensemble`` on (x, y)
    pairs, predicting with the best or the last weights of every run."""
    from .models import Fitted

    ens = train_ensemble(train[0], train[1], val[0], val[1], seeds, hp, task, n_out, on_epoch=on_epoch)
    weights = {"best": ens.best, "last": ens.last}
    return Fitted(ens.curves, ens.best_epoch, lambda x, which: evaluate(weights[which], x, ens.depth), ens.seconds,
                  ens.device)
