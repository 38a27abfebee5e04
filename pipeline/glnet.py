"""``--model glnet``: LoL's GL-equivariant network (Putterman et al. 2024, arXiv 2410.04207), R runs at once.

The reference is moeputt/LoL, diffusion/models/models.py (``GLInvariantMLP``: ``EquivariantMLP`` then
``InvariantHead``), with the defaults of its diffusion scripts (run_imagenette.py, run_celeba.py). Per module,
U = B (out x r) and V = A^T (in x r): a GL(r) change of basis (B G^-1, G A) maps them to (U G^-1, V G^T).

- The first equivariant layer maps each to width h = ``--hidden`` on the row side, U <- W1 U (h x out) and
  V <- W2 V (h x in), so the r columns are only carried along; W1, W2 per module (``EquivariantLinear``).
- Each further layer (``--depth`` layers in all) first applies LoL's GL nonlinearity (``GLNonlin``: keep the
  rows of U whose row sum of U V^T is positive, and the rows of V whose column sum of U V^T is), then an h x h
  map per module on each side. Both steps commute with the change of basis.
- The invariant head (``InvariantHead``): per module the h x h product U V^T (= W1 dW W2^T after one layer),
  all modules' flattened and concatenated, then Linear -> LayerNorm -> ReLU -> Linear to the outputs.

So the outputs depend on the factors through dW = s B A only: invariant to (B G^-1, G A) for any invertible G
(tests/test_rawmodels.py). The scale s and one per-module constant enter as U = sign(s) c B, V = c A^T with
c = sqrt(|s| / rms), so that U V^T = dW / rms: rms is the root mean square entry of that module's dW over the
train split (one pass before the first epoch). LoL feeds the unscaled factors of modules of one size; here
modules whose dW differ in size by orders of magnitude would otherwise not weigh alike in the head.
Initialisation as LoL's (randn / sqrt(fan-in) for the equivariant maps, nn.Linear's and nn.LayerNorm's for
the head), drawn from each run's generator in LoL's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import rawtrain
from .hyper import Hyper
from .rawdata import RawFactors

HEAD = 128  # the head's hidden width: LoL's hidden_dim_inv, --hidden_dim of run_imagenette.py (default 128)
LN_EPS = 1e-5  # nn.LayerNorm's


def _uniform(gen: torch.Generator, shape: tuple, fan_in: int) -> torch.Tensor:
    """nn.Linear's initialisation of a weight or bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / fan_in ** 0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def init(gens: list[torch.Generator], shapes: list[tuple[int, int, int]], hp: Hyper, n_out: int) -> dict:
    """Per run, in LoL's order: W1, W2 of each module; each further layer's U maps, then V maps; the head.
    Weights are stored as they multiply: W1 (h, out), W2 (h, in), layers (h, h), head weights (in, out)."""
    h, modules, head = hp.hidden, len(shapes), HEAD
    per_run = []
    for g in gens:
        p = {}
        for m, (_, fan_in, fan_out) in enumerate(shapes):
            p[f"w1.{m}"] = torch.randn(h, fan_out, generator=g) / fan_out ** 0.5
            p[f"w2.{m}"] = torch.randn(h, fan_in, generator=g) / fan_in ** 0.5
        for k in range(1, hp.depth):
            for side in ("u", "v"):
                layer = torch.randn(modules, h, h, generator=g) / h ** 0.5
                for m in range(modules):
                    p[f"w{side}.{k}.{m}"] = layer[m]
        width = modules * h * h
        p["lin1.w"] = _uniform(g, (head, width), width).T.contiguous()
        p["lin1.b"] = _uniform(g, (head,), width)
        p["ln.w"], p["ln.b"] = torch.ones(head), torch.zeros(head)
        p["lin2.w"] = _uniform(g, (n_out, head), head).T.contiguous()
        p["lin2.b"] = _uniform(g, (n_out,), head)
        per_run.append(p)
    return {k: torch.stack([p[k] for p in per_run]) for k in per_run[0]}


def gl_nonlinearity(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoL's GLNonlin on (..., h, r) pairs: rows of U kept where the row sums of U V^T are > 0, rows of V where
    its column sums are, computed without U V^T (row sums = U (V^T 1), column sums = V (U^T 1))."""
    rows = u @ v.sum(-2).unsqueeze(-1)  # (..., h, 1)
    columns = v @ u.sum(-2).unsqueeze(-1)
    return u * (rows > 0), v * (columns > 0)


def forward(params: dict, x: RawFactors, consts: dict, hp: Hyper) -> torch.Tensor:
    """Outputs (R, b, n_out) of every run; the factors' tensors have the leading dims (R or 1, b)."""
    products = []
    for m, (a, b, s) in enumerate(zip(x.A, x.B, x.scale)):
        c = (s.abs() / consts["rms"][m]).sqrt()[..., None, None]  # (R|1, b, 1, 1)
        u = rawtrain.runs_matmul(params[f"w1.{m}"], b) * (c * torch.sign(s)[..., None, None])  # (R, b, h, r)
        v = rawtrain.runs_matmul(params[f"w2.{m}"], a.transpose(-1, -2)) * c
        for k in range(1, hp.depth):
            u, v = gl_nonlinearity(u, v)
            u, v = rawtrain.runs_matmul(params[f"wu.{k}.{m}"], u), rawtrain.runs_matmul(params[f"wv.{k}.{m}"], v)
        products.append((u @ v.transpose(-1, -2)).flatten(-2))  # (R, b, h * h)
    z = torch.cat(products, -1)
    z = torch.baddbmm(params["lin1.b"][:, None], z, params["lin1.w"])
    z = F.layer_norm(z, z.shape[-1:], eps=LN_EPS) * params["ln.w"][:, None] + params["ln.b"][:, None]
    return torch.baddbmm(params["lin2.b"][:, None], torch.relu(z), params["lin2.w"])


def prepare(train) -> dict:
    """rms per module (L,): the root mean square entry of dW = s B A over the train split's buffers, from the r x r
    products (||B A||_F^2 = sum of (B^T B) * (A A^T)); 1 for a module whose dW is 0 everywhere."""
    total, n = None, 0
    for f in train:
        sq = torch.stack([s.double() ** 2 * ((b.double().mT @ b.double()) * (a.double() @ a.double().mT)).sum((-1, -2))
                          / (a.shape[-1] * b.shape[-2]) for a, b, s in zip(f.A, f.B, f.scale)], 1)  # (n, L)
        total = sq.sum(0) if total is None else total + sq.sum(0)
        n += sq.shape[0]
    rms = (total / n).sqrt().float()
    return {"rms": torch.where(rms > 0, rms, torch.ones_like(rms))}


def row_elements(shapes: list[tuple[int, int, int]], hp: Hyper) -> int:
    """Activations per adapter and run: the U, V of each module and their products, and the head."""
    return sum(2 * hp.hidden * r + hp.hidden * hp.hidden for r, _, _ in shapes) + 2 * HEAD


NET = rawtrain.Net(init, forward, row_elements, prepare)


def fit(train, val, seeds, hp, task, n_out, on_epoch=None):
    """pipeline/models.py's entry: the shared raw-factor loop (pipeline/rawtrain.py) with this network."""
    return rawtrain.fit(NET, train, val, seeds, hp, task, n_out, on_epoch)


def forward_flops(shapes: list[tuple[int, int, int]], hp: dict, n_out: int) -> int:
    """Matmul FLOPs of one run's forward pass on one adapter: W1 B and W2 A^T, each further layer's GL nonlinearity
    (its row and column sums) and two h x h maps, the h x h product per module, and the head."""
    h, depth = hp["hidden"], hp["depth"]
    modules = sum(2 * h * r * (fan_in + fan_out) + (depth - 1) * 4 * h * r * (h + 1) + 2 * h * h * r
                  for r, fan_in, fan_out in shapes)
    return modules + 2 * HEAD * (len(shapes) * h * h + n_out)


def cost(size, hp: dict, epochs: float, runs: int) -> float:
    """pipeline/models.py's cost (``train --dry-run``)."""
    from .models import epoch_cost

    return epoch_cost(forward_flops(list(size.shapes), hp, size.n_out), size, epochs, runs)
