"""The trainer: an MLP (or a linear model) for R runs at once, its training step and its loop; pure torch, no store.

Each weight has a leading run axis, so one step is a few batched matmuls for all runs, yet every run has
its own initialisation, shuffling, dropout masks, BatchNorm statistics, learning rate schedule and early
stopping.

**The step** (``train_step``) runs the same device operations whatever the number of runs R and however
many learning rates they have, and reads nothing back to the host: on CUDA it is captured once as a CUDA
graph and replayed (``_Steps``; ``graphs=False`` or $PIPELINE_CUDA_GRAPHS=0 runs it eagerly), and
``torch.compile(fullgraph=True)`` traces it whole (``_Plan.traced``). How:

- Weights: one flat buffer per ensemble (``_Net.params``), a contiguous (R, padded) block per weight, each
  run's row padded to a multiple of _PAD elements; the network sees (R, in + 1, out) views of it (nn.Linear's
  weight, transposed, with its bias as the last row, against a column of ones appended to the input).
  Adam's moments share the layout. The views, and each run's rows of them, are made once per ensemble.
- Adam for all runs: torch's fused kernel (one memory pass, ``Adam(fused=True)``'s) once per learning rate
  the plateau schedule can give a run (``_Plan.levels``: lr, lr x factor, ..., a number fixed by the
  hyper-parameters), on the rows of the runs at it; a stopped run is in none (masked: its weights stay, its
  shapes too). Each run's update is then ``Adam(fused=True)``'s with its own learning rate. The step count is
  a device tensor. A CUDA graph cannot change its lists every epoch, so there (``_Plan.dense``) the kernel
  steps every block whole with the initial rate and each run moves by its rate (a device tensor) towards
  that step. The fused kernel does not trace on the CPU (its functionalisation fails): the traced step writes
  that update as elementwise operations (inductor fuses them) and takes torch.func.grad_and_value's gradient,
  the eager one torch.autograd.grad's.
- Dropout: one draw for every run and layer from a counter-based hash (pipeline/masks.py, int32 operations
  on the device): run r's mask at step s, layer l, element (i, j) is a function of (its seed, s, l, i, j)
  alone, whatever the ensemble.
- The host builds each epoch's shuffling and copies it once, and reads the epoch's numbers once, after its
  steps (early stopping, the plateau schedule, the curves).
- A stopped run: eagerly, the ensemble is compacted to the runs still training after any epoch where one
  stopped (a new shape costs nothing); with CUDA graphs stopped runs stay, masked, until at most half the
  ensemble trains, then it is compacted (``_compact_now``): at most log2(R) new shapes, each a new capture.

**How exact it is, on the CPU.** (1) Against the original: with dropout 0, run r of ``train_ensemble`` is,
up to float rounding, the plain loop with ``torch.manual_seed(seeds[r])``: ``nn.Sequential`` of ``depth`` x
(Linear, BatchNorm1d, ReLU, Dropout) then Linear, a shuffled ``DataLoader``, ``torch.optim.Adam`` with L2
weight decay, ``ReduceLROnPlateau`` (mode max) on the validation score, early stopping with a copy of the
best weights: tests/reference.py's ``original_run``, and tests/test_train.py finds the same validation
accuracies, learning rates and best epochs. Each run draws from its own generator what the plain loop draws
from torch's global one, in the same order: the init, then per epoch the DataLoader's two seed draws and a
randperm. With dropout > 0 the masks are the hash's, not torch's Bernoulli draws from the global generator
(one call per run and layer, which no single operation for every run can reproduce), so that comparison is
made with the plain loop given the same masks (``masks.mask``): tests/test_step.py asks the same equality.
(2) Against the ensemble: a run trained alone is bit for bit the run trained among others (curves, best
epoch, best and last weights), through lowered learning rates, masking and compaction (tests/test_step.py).
That needs every run's numbers computed the same way whatever R, which shapes the code: the bias inside the
matmul (the gradient of a broadcast bias is a sum whose blocking depends on R); BatchNorm's input layout
(``_batch_norm``); a regression output of two columns, the second zeros (a (b, k) @ (k, 1) bmm rounds
otherwise at R = 1); the padding to _PAD (the fused kernel treats a tensor's last elements, past its last
whole vector, with scalar code that rounds otherwise: padded, a run's row has none, whether the kernel takes
it alone or within its block, as CUDA graphs do). On CUDA neither equality is checked here.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from . import masks, metrics
from .hyper import Hyper

BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # torch.nn.BatchNorm1d defaults
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam defaults
PLATEAU_THRESHOLD = 1e-4  # ReduceLROnPlateau default (relative)
_EVAL_ELEMENTS = 1 << 25  # evaluate at most this many hidden activations at once (128 MB)
CURVES = ("train_loss", "train_score", "val_loss", "val_score", "lr")  # per run, one value per epoch trained
GRAPHS_ENV = "PIPELINE_CUDA_GRAPHS"  # "0": CUDA steps run eagerly instead of replaying a CUDA graph
_WARMUP = 3  # eager steps (on a side stream) before a CUDA graph is captured: cuBLAS and autograd set up there
_PAD = 64  # each run's row of a weight's block is padded to a multiple of this many elements (see the docstring)
_VECTOR = 16  # floats in the widest CPU vector torch's kernels use (AVX-512); see _batch_norm


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

    ``w{i}`` (R, in + 1, out) is nn.Linear's weight, transposed, with its bias as the last row (it multiplies
    a column of ones appended to the layer's input); BatchNorm weight 1, bias 0, running mean 0, running var 1.
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
            layers.append(torch.cat([w.T, b[None]]))
        per_run.append(layers)
    state = {}
    for i in range(len(sizes) - 1):
        state[f"w{i}"] = torch.stack([run[i] for run in per_run])
        if i < hp.depth:
            state[f"gamma{i}"] = torch.ones(len(seeds), sizes[i + 1])
            state[f"beta{i}"] = torch.zeros(len(seeds), sizes[i + 1])
            state[f"mean{i}"] = torch.zeros(len(seeds), sizes[i + 1])
            state[f"var{i}"] = torch.ones(len(seeds), sizes[i + 1])
    return state, gens


def _is_param(key: str) -> bool:
    return not key.startswith(("mean", "var"))


def _batch_norm(h: torch.Tensor, state: dict, i: int, train: bool, threads: int) -> torch.Tensor:
    """BatchNorm1d of every run at once: h (R, b, width) -> (R, b, width), runs x units the channels of one
    batch_norm call, so each run is normalised over its own batch and its running stats (views of the state)
    update in place (``train``).

    torch's CPU kernel for a (b, channels) input (vectorised over the channels) computes each channel's numbers
    the same way whatever the number of channels, R x width, when b is more than its thread count and width
    a multiple of the vector width (a run's channels then never fall in the scalar tail). Otherwise (a last,
    small batch; an odd width) the input goes in as (1, channels, b), whose kernel treats each channel alone
    (slower: a copy each way), so that a run's numbers never depend on R.
    """
    runs, rows, width = h.shape
    flat = [state[f"{k}{i}"].clone(memory_format=torch.contiguous_format).view(-1) for k in ("gamma", "beta")]
    stats = (state[f"mean{i}"].view(-1), state[f"var{i}"].view(-1), *flat)  # gamma, beta: copies (a block may be padded)
    if h.device.type == "cpu" and (rows <= threads or width % _VECTOR):
        t = F.batch_norm(h.transpose(1, 2).contiguous().view(1, runs * width, rows), *stats, training=train,
                         momentum=BN_MOMENTUM, eps=BN_EPS)
        return t.view(runs, width, rows).transpose(1, 2)
    # clone, not reshape: the same operations whatever R (the reshape of one run's batch would be a view)
    flat = h.transpose(0, 1).clone(memory_format=torch.contiguous_format).view(rows, runs * width)
    t = F.batch_norm(flat, *stats, training=train, momentum=BN_MOMENTUM, eps=BN_EPS)
    return t.view(rows, runs, width).transpose(0, 1)


def forward(state: dict, x: torch.Tensor, depth: int, train: bool = False, noise: list | None = None,
            threads: int | None = None) -> torch.Tensor:
    """Outputs (R, b, out) of every run. x: (R, b, in), one batch per run, or (n, in) shared by all runs.

    Each layer is one bmm of its input, with a column of ones appended (the bias), and w (R, in + 1, out):
    the bias's gradient is then part of the weight's, a bmm, whose rounding per run does not depend on R
    (the gradient of a broadcast bias is a sum, whose blocking does). ``train``: BatchNorm in training mode.
    ``noise``: per hidden layer the dropout multipliers (R, b, hidden), 0 or 1 / (1 - p). ``threads``: torch's
    CPU thread count (None: now; the step passes its plan's, since torch.compile cannot trace the question).
    """
    runs = state["w0"].shape[0]
    threads = torch.get_num_threads() if threads is None else threads
    h = x if x.dim() == 3 else x[None]
    for i in range(depth + 1):
        ones = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)  # (R or 1, b, in + 1)
        h = torch.bmm(ones if ones.shape[0] == runs else ones.expand(runs, -1, -1), state[f"w{i}"])
        if i == depth:
            return h
        h = torch.relu(_batch_norm(h, state, i, train, threads))
        if noise is not None:
            h = h * noise[i]
    return h


def evaluate(state: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """Eval-mode outputs (R, n, out) for a shared input (n, in), in row chunks that bound the memory:
    at most _EVAL_ELEMENTS activations of the widest layer at once, whatever n is."""
    runs = state["w0"].shape[0]
    widest = max(state[f"w{i}"].shape[-1] for i in range(depth + 1))
    rows = max(1, _EVAL_ELEMENTS // (runs * widest))
    with torch.no_grad():
        return torch.cat([forward(state, x[i:i + rows], depth) for i in range(0, len(x), rows)], dim=1)


# --- the ensemble's tensors: one flat buffer of weights, views per layer ------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where each weight of every run lies in a flat buffer: in ``names`` order, one (R, padded) block each,
    its run's row padded from prod(shape) to a multiple of _PAD elements (zeros, never read by the network)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # per run
    pad: bool = True

    @classmethod
    def of(cls, state: dict, names: list[str], pad: bool = True) -> "_Layout":
        return cls(tuple(names), tuple(tuple(state[k].shape[1:]) for k in names), pad)

    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def padded(self) -> list[int]:
        return [-(-n // _PAD) * _PAD if self.pad else n for n in self.sizes()]

    def blocks(self, flat: torch.Tensor, runs: int) -> dict[str, torch.Tensor]:
        """Each weight's block (R, padded) of ``flat``, contiguous; each run's row of it contiguous too."""
        parts = flat.split([runs * n for n in self.padded()]) if self.names else ()
        return {k: part.view(runs, n) for k, part, n in zip(self.names, parts, self.padded())}

    def views(self, flat: torch.Tensor, runs: int) -> dict[str, torch.Tensor]:
        """Each weight as the network sees it, (R, *shape), a view of ``flat``."""
        blocks = self.blocks(flat, runs)
        return {k: blocks[k][:, :n].view(runs, *s) for k, n, s in zip(self.names, self.sizes(), self.shapes)}

    def pack(self, state: dict, runs: int) -> torch.Tensor:
        """A flat buffer holding ``state``'s tensors (R, *shape) in this layout."""
        parts = [F.pad(state[k].reshape(runs, n), (0, p - n)).reshape(-1)
                 for k, n, p in zip(self.names, self.sizes(), self.padded())]
        return torch.cat(parts) if parts else torch.zeros(0)


@dataclass(frozen=True)
class _Plan:
    """What the step needs to know besides its tensors; fixed for a whole training."""

    params: _Layout  # the trained weights (w, gamma, beta)
    stats: _Layout  # BatchNorm's running statistics (mean, var), unpadded: batch_norm updates them in place
    depth: int
    hidden: int
    dropout: float
    lr: float  # the initial learning rate
    levels: tuple[float, ...]  # every learning rate a run can have: lr, lr x factor, ... (the plateau schedule's)
    weight_decay: float
    task: str
    threads: int  # torch's CPU threads when training started (_batch_norm's choice of layout)
    dense: bool = False  # Adam for fixed shapes (CUDA graphs): whole blocks, rates as a device tensor (see _adam)
    traced: bool = False  # for torch.compile: torch.func's gradient, Adam as elementwise ops (see train_step)


@dataclass
class _Net:
    """The ensemble on its device: every run-axis tensor has one row per member, in ``members`` order."""

    params: torch.Tensor  # flat, _Plan.params layout
    stats: torch.Tensor  # flat, _Plan.stats layout
    exp_avg: torch.Tensor  # Adam's moments, like params
    exp_avg_sq: torch.Tensor
    scratch: torch.Tensor  # like params where _Plan.dense (_adam), else empty
    step: torch.Tensor  # () int64: steps taken (Adam's bias correction, the dropout counter)
    rate: torch.Tensor  # (R,) float32: each member's learning rate / _Plan.lr: 1, lower once lowered, 0 once stopped
    groups: tuple  # per learning rate of _Plan.levels, the members at it (numpy); a stopped member is in none
    keys: torch.Tensor  # (R,) int32: each member's dropout key
    sums: torch.Tensor  # (2, R) float64: the epoch's train loss x rows and correct predictions
    members: np.ndarray  # (R,) the run (position in seeds) of each row
    views: "_Views | None" = None  # of these tensors (``with_views``)

    @property
    def runs(self) -> int:
        return len(self.members)

    def with_views(self, plan: _Plan) -> "_Net":
        self.views = _Views.of(self, plan)
        return self

    def set_lrs(self, plan: _Plan, lrs: np.ndarray) -> None:
        """Each member's learning rate, 0 for a stopped one (host numbers, once per epoch: one copy)."""
        self.rate.copy_(torch.as_tensor(np.asarray(lrs) / plan.lr, dtype=torch.float32))
        self.groups = tuple(np.flatnonzero(lrs == level) for level in plan.levels)
        if sum(map(len, self.groups)) != np.count_nonzero(lrs):
            raise RuntimeError(f"learning rates {sorted(set(lrs))} are not all on the schedule's {plan.levels}")

    def clone(self, plan: _Plan) -> "_Net":
        """An independent copy (every tensor cloned, its own views)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "views"}
        return _Net(**{k: v.clone() if isinstance(v, torch.Tensor) else copy.copy(v) for k, v in tensors.items()}).with_views(plan)

    def state(self, plan: _Plan) -> dict:
        """The network's weights and statistics, name -> (R, ...) views (what ``forward`` and ``evaluate`` take)."""
        return {**plan.params.views(self.params, self.runs), **plan.stats.views(self.stats, self.runs)}

    def select(self, plan: _Plan, rows: np.ndarray, lrs: np.ndarray) -> "_Net":
        """A smaller ensemble of these rows (the compaction): copies, in order, with these learning rates."""
        pos = torch.as_tensor(rows, device=self.params.device)

        def take(flat, layout):
            blocks = layout.blocks(flat, self.runs).values()
            return torch.cat([b.index_select(0, pos).reshape(-1) for b in blocks]) if layout.names else flat

        params = take(self.params, plan.params)
        net = _Net(params, take(self.stats, plan.stats), take(self.exp_avg, plan.params),
                   take(self.exp_avg_sq, plan.params), _scratch(params, plan, len(rows)), self.step.clone(),
                   self.rate[pos], (), self.keys[pos],
                   torch.zeros(2, len(rows), dtype=torch.float64, device=params.device), self.members[rows])
        net.set_lrs(plan, lrs)
        return net.with_views(plan)


@dataclass(frozen=True)
class _Views:
    """Views of an ensemble's flat buffers, name -> tensor, made once per ensemble: making them is a good part
    of a small step's time. (A traced step makes its own, see train_step.)"""

    params: dict  # (R, *shape): what the network sees
    blocks: dict  # (R, padded): what Adam updates
    exp_avg: dict
    exp_avg_sq: dict
    scratch: dict  # _Plan.dense: the copy of the blocks the fused kernel updates
    stats: dict  # (R, width)
    rows: tuple  # per member, its row of every block, of exp_avg's and of exp_avg_sq's: (p, m, v) lists (eager)

    @classmethod
    def of(cls, net: _Net, plan: _Plan) -> "_Views":
        runs, blocks = net.runs, plan.params.blocks
        p, m, v = blocks(net.params, runs), blocks(net.exp_avg, runs), blocks(net.exp_avg_sq, runs)
        per_level = not (plan.dense or plan.traced)
        rows = tuple(tuple([t[k][r] for k in plan.params.names] for t in (p, m, v)) for r in range(runs * per_level))
        scratch = blocks(net.scratch, runs) if plan.dense else {}
        return cls(plan.params.views(net.params, runs), p, m, v, scratch, plan.stats.views(net.stats, runs), rows)


def _scratch(params: torch.Tensor, plan: _Plan, runs: int) -> torch.Tensor:
    """Room for the copy of the weights that _adam steps where _Plan.dense."""
    return torch.empty_like(params) if plan.dense else params.new_empty(0)


def _levels(hp: Hyper) -> tuple[float, ...]:
    """Every learning rate ReduceLROnPlateau can give a run: lr, then x factor while that lowers it by more
    than the scheduler's eps (the very products plateau_step computes)."""
    levels = [float(hp.lr)]
    while levels[-1] - levels[-1] * hp.plateau_factor > 1e-8:
        levels.append(levels[-1] * hp.plateau_factor)
    return tuple(levels)


def _start(seeds: list[int], n_in: int, n_out: int, hp: Hyper, task: str, device, graphs: bool = False,
           traced: bool = False) -> tuple[_Net, _Plan, list[torch.Generator], dict]:
    """The initial ensemble on ``device``, its plan, each run's generator, and its state (R, ...) tensors."""
    init, gens = _init_state(seeds, n_in, n_out, hp)
    if n_out == 1:  # a second output column of zeros (never read, its gradient 0): no (b, in) @ (in, 1) bmm, whose
        init[f"w{hp.depth}"] = F.pad(init[f"w{hp.depth}"], (0, 1))  # rounding at R = 1 differs from R > 1
    state = {k: v.to(device) for k, v in init.items()}
    plan = _Plan(_Layout.of(state, [k for k in state if _is_param(k)]),
                 _Layout.of(state, [k for k in state if not _is_param(k)], pad=False), hp.depth, hp.hidden,
                 hp.dropout, hp.lr, _levels(hp), hp.weight_decay, task, torch.get_num_threads(), graphs, traced)
    runs = len(seeds)
    params = plan.params.pack(state, runs).to(device)
    net = _Net(params, plan.stats.pack(state, runs).to(device), torch.zeros_like(params), torch.zeros_like(params),
               _scratch(params, plan, runs), torch.zeros((), dtype=torch.int64, device=device),
               torch.ones(runs, dtype=torch.float32, device=device), (),
               torch.tensor(masks.keys(seeds), dtype=torch.int32, device=device),
               torch.zeros(2, runs, dtype=torch.float64, device=device), np.arange(runs))
    net.set_lrs(plan, np.full(runs, plan.lr))
    return net.with_views(plan), plan, gens, state


# --- the step ----------------------------------------------------------------------------------------


def _adam(net: _Net, plan: _Plan, views: _Views, grads: dict) -> None:
    """torch.optim.Adam (L2 weight decay added to the gradient) for every run, each with its own learning rate.

    Eagerly: torch's fused kernel (``Adam(fused=True)``'s, one memory pass) once per learning rate the plateau
    schedule can give (_Plan.levels, a fixed number), on the rows of the members at it: each run's update is
    ``Adam(fused=True)``'s with its learning rate, whatever the others'. A level with no member still gets its
    call (with an empty tensor: the kernel refuses an empty list), so the operators never depend on the rates,
    and a stopped member is in no level: its weights and moments do not move.
    ``plan.dense`` (CUDA graphs, whose shapes are fixed): the kernel with the initial learning rate lr on a copy
    of every block (scratch = p - lr u), then ``lerp(p, scratch, r)`` with each run's rate r = its lr / lr, a
    device tensor: p - r lr u, to the rounding of u (exactly p at r = 0). ``plan.traced``: the dense update
    as elementwise operations. All work on padded blocks (the padding's gradient is 0, so it stays 0).
    """
    runs, names = net.runs, plan.params.names
    grads = {k: F.pad(grads[k].reshape(runs, n), (0, p - n)) if p > n else grads[k].reshape(runs, n)
             for k, n, p in zip(names, plan.params.sizes(), plan.params.padded())}
    beta1, beta2 = ADAM_BETAS
    step = net.step.to(torch.float32)
    rate = net.rate.view(runs, 1)
    if plan.traced:
        correction1 = 1 - beta1 ** step
        correction2 = (1 - beta2 ** step).sqrt()
        for k in names:
            p, g, m, v = views.blocks[k], grads[k], views.exp_avg[k], views.exp_avg_sq[k]
            if plan.weight_decay:
                g = g.add(p, alpha=plan.weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.sub_(m / (v.sqrt() / correction2 + ADAM_EPS) * (rate * plan.lr / correction1))
        return
    options = dict(beta1=beta1, beta2=beta2, weight_decay=plan.weight_decay, eps=ADAM_EPS, amsgrad=False, maximize=False)
    if plan.dense:
        net.scratch.copy_(net.params)
        torch._fused_adam_([views.scratch[k] for k in names], [grads[k] for k in names],
                           [views.exp_avg[k] for k in names], [views.exp_avg_sq[k] for k in names], [],
                           [step] * len(names), lr=plan.lr, **options)
        for k in names:
            views.blocks[k].lerp_(views.scratch[k], rate)
        return
    grad_rows = [grads[k].unbind(0) for k in names]  # per block, every member's row
    empty = net.scratch  # a tensor with no element
    for level, members in zip(plan.levels, net.groups):
        p, g, m, v = [empty], [empty], [empty], [empty]
        for r in members:
            rp, rm, rv = views.rows[r]
            p += rp
            m += rm
            v += rv
            g += [rows[r] for rows in grad_rows]
        torch._fused_adam_(p, g, m, v, [], [step] * len(p), lr=level, **options)


def train_step(net: _Net, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, plan: _Plan) -> None:
    """One training step of every member on its batch: rows ``idx`` (R, b) of x (n, d) and y (n,).

    Forward, loss, backward, Adam, dropout, the epoch sums: device operations only, the same ones whatever
    R and the learning rates; nothing is read back to the host (so it can be captured and compiled).
    Eagerly the gradient is torch.autograd.grad's and Adam torch's fused kernel; ``plan.traced`` (what
    torch.compile(fullgraph=True) takes) uses torch.func.grad_and_value, which dynamo traces, and Adam as
    elementwise operations, since the fused kernel does not trace on the CPU.
    """
    runs, rows = idx.shape
    views = _Views.of(net, plan) if plan.traced else net.views  # dynamo traces tensors, not cached aliases of them
    net.step.add_(1)
    flat = idx.reshape(-1)
    xb = x.index_select(0, flat).view(runs, rows, x.shape[1])
    yb = y.index_select(0, flat).view(runs, rows)
    stats = views.stats
    noise = masks.noise(net.keys, net.step, plan.depth, rows, plan.hidden, plan.dropout) if plan.dropout > 0 else None

    def loss_of(params):
        out = forward({**params, **stats}, xb, plan.depth, train=True, noise=noise, threads=plan.threads)  # (R, rows, K)
        loss = metrics.loss(out, yb, plan.task)
        return loss.sum(), (loss.detach(), out.detach())

    if plan.traced:
        grads, (_, (loss, out)) = torch.func.grad_and_value(loss_of, has_aux=True)(views.params)
    else:
        leaves = {k: v.detach().requires_grad_() for k, v in views.params.items()}
        total, (loss, out) = loss_of(leaves)
        grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
    _adam(net, plan, views, grads)
    net.sums[0].add_(loss.to(torch.float64), alpha=rows)
    if plan.task == "classification":
        net.sums[1].add_((out.argmax(-1) == yb).sum(1).to(torch.float64))


def _graphs_wanted(device: torch.device, graphs: bool | None) -> bool:
    """CUDA graphs: on CUDA unless switched off (``graphs=False``, or $PIPELINE_CUDA_GRAPHS=0); never elsewhere."""
    if device.type != "cuda":
        return False
    return os.environ.get(GRAPHS_ENV, "1") != "0" if graphs is None else graphs


class _Steps:
    """``train_step`` for one shape of the ensemble: eager; or, with ``graphs`` (CUDA), the full-size batches
    replay one CUDA graph of it, captured after _WARMUP eager steps (real ones) with its batch indices in a
    static buffer. A last, smaller batch runs eagerly. A compaction makes a new _Steps (a new graph)."""

    def __init__(self, net: _Net, plan: _Plan, x: torch.Tensor, y: torch.Tensor, batch_size: int, graphs: bool):
        self.net, self.plan, self.x, self.y, self.batch_size, self.graphs = net, plan, x, y, batch_size, graphs
        self.warm, self.idx, self.graph = 0, None, None

    def __call__(self, idx: torch.Tensor) -> None:
        if not self.graphs or idx.shape[1] != self.batch_size:
            return train_step(self.net, idx, self.x, self.y, self.plan)
        if self.graph is None and self.warm < _WARMUP:  # warm-up on a side stream, as torch.cuda.graphs asks
            self.warm += 1
            side = torch.cuda.Stream(device=idx.device)
            side.wait_stream(torch.cuda.current_stream(idx.device))
            with torch.cuda.stream(side):
                train_step(self.net, idx, self.x, self.y, self.plan)
            torch.cuda.current_stream(idx.device).wait_stream(side)
            return
        if self.graph is None:  # capture records the step without running it: this batch is the first replay
            self.idx = idx.clone(memory_format=torch.contiguous_format)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                train_step(self.net, self.idx, self.x, self.y, self.plan)
        self.idx.copy_(idx)
        self.graph.replay()


def _train_epoch(steps: _Steps, order: torch.Tensor, batch_size: int) -> int:
    """One pass over each member's shuffled rows, order (R, n) on the device; returns the rows each run saw.
    Only slices of ``order`` and steps: no host read. A one-row batch is skipped (BatchNorm cannot train on it;
    the original would crash)."""
    seen = 0
    for start in range(0, order.shape[1], batch_size):
        idx = order[:, start:start + batch_size]
        if idx.shape[1] < 2:
            continue
        steps(idx)
        seen += idx.shape[1]
    return seen


# --- the loop ----------------------------------------------------------------------------------------


@dataclass
class Runs:
    """The loop's per-run bookkeeping, numpy arrays indexed by run (position in ``seeds``)."""

    active: np.ndarray  # the runs still training, in increasing order (as the ensemble's rows are)
    lr: np.ndarray
    best_score: np.ndarray
    best_epoch: np.ndarray  # 0 until a finite validation score was seen
    bad_epochs: np.ndarray  # epochs since the best one (early stopping)
    plateau_best: np.ndarray  # the scheduler's own best and bad-epoch count (reset when it lowers lr)
    plateau_bad: np.ndarray
    curves: dict[str, list[list[float]]]

    @classmethod
    def start(cls, runs: int, lr: float) -> "Runs":
        return cls(np.arange(runs), np.full(runs, lr), np.full(runs, -np.inf), np.zeros(runs, int), np.zeros(runs, int),
                   np.full(runs, -np.inf), np.zeros(runs, int), {k: [[] for _ in range(runs)] for k in CURVES})


def _epoch_order(gen: torch.Generator, n: int) -> torch.Tensor:
    """The permutation a shuffled DataLoader would use, drawing from ``gen`` as it draws from the global one."""
    torch.empty((), dtype=torch.int64).random_(generator=gen)  # _BaseDataLoaderIter's base seed
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())  # RandomSampler's seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _epoch_orders(gens: list, net: _Net, active: np.ndarray, n: int) -> torch.Tensor:
    """Each member's shuffled rows (R, n), built on the host: a stopped member (masked) gets 0..n-1, no draw."""
    training = set(active.tolist())
    return torch.stack([_epoch_order(gens[r], n) if r in training else torch.arange(n) for r in net.members])


def _epoch_numbers(net: _Net, plan: _Plan, seen: int, train: tuple, val: tuple) -> torch.Tensor:
    """(4, R) float64 on the device: train loss, train score, val loss, val score of every member.

    The train score is the batches' accuracy (classification) or R^2 on the whole train set in eval mode
    (regression: R^2 of the training batches is not meaningful)."""
    with torch.no_grad():
        state = net.state(plan)
        val_out = evaluate(state, val[0], plan.depth)
        val_loss = metrics.loss(val_out, val[1][None].expand(net.runs, -1), plan.task)
        val_score = metrics.score(val_out, val[1], plan.task)
        if plan.task == "regression":
            train_score = metrics.score(evaluate(state, train[0], plan.depth), train[1], plan.task)
        else:
            train_score = net.sums[1] / max(seen, 1)
        return torch.stack([net.sums[0] / max(seen, 1), train_score.to(torch.float64), val_loss.to(torch.float64),
                            val_score.to(torch.float64)])


def _record(runs: Runs, values: np.ndarray) -> None:
    """Append one epoch to the active runs' curves: values (4, A) = train loss, train score, val loss, val score."""
    for pos, r in enumerate(runs.active):
        for name, value in zip(CURVES, (*values[:, pos], runs.lr[r])):
            runs.curves[name][r].append(value)


def plateau_step(runs: Runs, scores: np.ndarray, hp: Hyper) -> None:
    """ReduceLROnPlateau(mode="max", threshold=1e-4 relative), stepped on the active runs' validation scores (A,)."""
    active = runs.active
    better = scores > runs.plateau_best[active] * (1 + PLATEAU_THRESHOLD)
    runs.plateau_best[active] = np.where(better, scores, runs.plateau_best[active])
    runs.plateau_bad[active] = np.where(better, 0, runs.plateau_bad[active] + 1)
    reduce = active[runs.plateau_bad[active] > hp.plateau_patience]
    smaller = runs.lr[reduce] * hp.plateau_factor
    runs.lr[reduce] = np.where(runs.lr[reduce] - smaller > 1e-8, smaller, runs.lr[reduce])  # the scheduler's eps
    runs.plateau_bad[reduce] = 0


def _copy_rows(into: dict, ids: np.ndarray, state: dict, rows: np.ndarray) -> None:
    """into[k][ids] = state[k][rows] for every tensor: runs ``ids`` of a full-size state from ensemble rows."""
    if len(ids):
        device = state["w0"].device
        ids, rows = torch.as_tensor(ids, device=device), torch.as_tensor(rows, device=device)
        for k, v in state.items():
            into[k].index_copy_(0, ids, v.index_select(0, rows))


def _early_stopping(runs: Runs, scores: np.ndarray, epoch: int, state: dict, rows: np.ndarray, best: dict,
                    hp: Hyper) -> np.ndarray:
    """Copy the weights of the runs whose validation score is strictly better (COPIED: the original kept a
    reference, so it evaluated the last weights); returns which active runs stop now (A,) bool.
    ``rows``: each active run's row in the ensemble."""
    active = runs.active
    improved = scores > runs.best_score[active]
    _copy_rows(best, active[improved], state, rows[improved])
    runs.best_epoch[active[improved]] = epoch
    runs.best_score[active] = np.where(improved, scores, runs.best_score[active])
    runs.bad_epochs[active] = np.where(improved, 0, runs.bad_epochs[active] + 1)
    return (runs.bad_epochs[active] >= hp.patience) | (epoch == hp.epochs)


def _compact_now(active: int, members: int, graphs: bool) -> bool:
    """Whether the ensemble is compacted to its ``active`` runs after an epoch. Eagerly: whenever a run has
    stopped (a masked run costs as much as a training one, and a new shape costs nothing). With CUDA graphs:
    once at most half of it is still training, since a new shape is a new capture (at most log2(R) of them)."""
    return 0 < active < members and (not graphs or active <= members // 2)


def train_ensemble(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                   seeds: list[int], hp: Hyper, task: str, n_out: int, on_epoch=None, *, graphs: bool | None = None
                   ) -> Ensemble:
    """Train one run per seed, together, on the device of x_train. x: (n, d) float32; y: (n,) codes or floats.
    ``on_epoch(epoch, active)``, if given, is called after each epoch with the number of runs still training.
    ``graphs``: replay the step as a CUDA graph (CUDA only; None: unless $PIPELINE_CUDA_GRAPHS is 0)."""
    started = time.perf_counter()
    device = x_train.device
    use_graphs = _graphs_wanted(device, graphs)
    net, plan, gens, state = _start(seeds, x_train.shape[1], n_out, hp, task, device, graphs=use_graphs)
    best = {k: v.clone() for k, v in state.items()}
    last = {k: v.clone() for k, v in state.items()}
    runs = Runs.start(len(seeds), hp.lr)
    steps = _Steps(net, plan, x_train, y_train, hp.batch_size, use_graphs)
    for epoch in range(1, hp.epochs + 1):
        order = _epoch_orders(gens, net, runs.active, len(x_train)).to(device)  # (R, n): one copy per epoch
        net.sums.zero_()
        seen = _train_epoch(steps, order, hp.batch_size)
        host = _epoch_numbers(net, plan, seen, (x_train, y_train), (x_val, y_val)).cpu().numpy()  # the epoch's one read
        rows = np.searchsorted(net.members, runs.active)  # each active run's row
        _record(runs, host[:, rows])
        scores = host[3, rows]
        plateau_step(runs, scores, hp)
        state = net.state(plan)
        stop = _early_stopping(runs, scores, epoch, state, rows, best, hp)
        _copy_rows(last, runs.active[stop], state, rows[stop])
        runs.active = runs.active[~stop]
        if on_epoch is not None:
            on_epoch(epoch, len(runs.active))
        if len(runs.active) == 0:
            break
        if _compact_now(len(runs.active), net.runs, use_graphs):
            net = net.select(plan, np.searchsorted(net.members, runs.active), runs.lr[runs.active])
            steps = _Steps(net, plan, x_train, y_train, hp.batch_size, use_graphs)
        else:  # a stopped run is masked: learning rate 0
            net.set_lrs(plan, np.where(np.isin(net.members, runs.active), runs.lr[net.members], 0.0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    curves = {k: [np.asarray(c, dtype=np.float64) for c in v] for k, v in runs.curves.items()}
    out = f"w{hp.depth}"
    best[out], last[out] = best[out][..., :n_out], last[out][..., :n_out]  # without _start's column of zeros
    return Ensemble(curves, runs.best_epoch, best, last, hp.depth, time.perf_counter() - started, str(device))


def time_steps(x_train: torch.Tensor, y_train: torch.Tensor, seeds: list[int], hp: Hyper, task: str, n_out: int,
               steps: int = 50, warmup: int = 5, graphs: bool | None = None) -> dict:
    """Time ``steps`` training steps of the real step (``train_ensemble``'s, CUDA graph included) after ``warmup``
    ones (and the graph's capture), on full-size batches of x_train's device.

    Returns ms_per_step, runs, device, graphs (whether a CUDA graph replayed the steps), steps, batch_size and
    host_syncs: on CUDA the timed steps run under ``torch.cuda.set_sync_debug_mode("error")``, so any host
    synchronisation raises and the 0 returned is a measurement; None elsewhere (tests/test_step.py counts the
    host reads of the CPU steps)."""
    device = x_train.device
    use_graphs = _graphs_wanted(device, graphs)
    net, plan, gens, _ = _start(seeds, x_train.shape[1], n_out, hp, task, device, graphs=use_graphs)
    stepper = _Steps(net, plan, x_train, y_train, hp.batch_size, use_graphs)
    order = _epoch_orders(gens, net, net.members, len(x_train)).to(device)
    size = min(hp.batch_size, len(x_train))
    batches = [order[:, i:i + size] for i in range(0, len(x_train) - size + 1, size)]
    for i in range(warmup + (_WARMUP + 1 if use_graphs else 0)):
        stepper(batches[i % len(batches)])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    started = time.perf_counter()
    try:
        for i in range(steps):
            stepper(batches[i % len(batches)])
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(mode)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {"ms_per_step": 1e3 * seconds / max(steps, 1), "runs": len(seeds), "device": str(device),
            "graphs": stepper.graph is not None, "steps": steps, "batch_size": size, "host_syncs": 0 if cuda else None}


def fit(train: tuple, val: tuple, seeds: list[int], hp: Hyper, task: str, n_out: int, on_epoch=None):
    """pipeline/models.py's entry for the MLP (and the MLP-trained linear model): ``train_ensemble`` on (x, y)
    pairs, predicting with the best or the last weights of every run."""
    from .models import Fitted

    ens = train_ensemble(train[0], train[1], val[0], val[1], seeds, hp, task, n_out, on_epoch=on_epoch)
    weights = {"best": ens.best, "last": ens.last}
    return Fitted(ens.curves, ens.best_epoch, lambda x, which: evaluate(weights[which], x, ens.depth), ens.seconds,
                  ens.device)


def parameters(width: int, n_out: int, hp: dict) -> int:
    """Weights of one run's network (its forward pass costs twice this in FLOPs per row)."""
    if hp["depth"] == 0:
        return width * n_out
    return width * hp["hidden"] + (hp["depth"] - 1) * hp["hidden"] ** 2 + hp["hidden"] * n_out


def cost(size, hp: dict, epochs: float, runs: int) -> float:
    """pipeline/models.py's cost (``train --dry-run``): matmul FLOPs, 2 per weight per row, per epoch."""
    from .models import epoch_cost

    return epoch_cost(2 * parameters(size.width, size.n_out, hp), size, epochs, runs)
