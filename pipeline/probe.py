"""``--model probe``: learned probes of dW in the style of MVProbe (ICML 2026) and ProbeX (CVPR 2025), R runs at once.

The reference is AI-hew-math/MVProbe, probex.py (``ProbeXCore``, mode concat_all4_bigenc_proj4, which extends
eliahuhorwitz/ProbeX's ``ProbeXClassification`` by three more views), with the defaults of its
train_*_probex.py. For X = dW = s B A (out x in) and learned probe matrices U, four responses per module:

    xu = X U (out x p),  xtu = X^T U (in x p),  xxtu = X X^T U (out x p),  xtxu = X^T X U (in x p),

each computed from the factors, right to left (s B (A U), s^2 B (A A^T)(B^T U), ...), so the largest product is
(points x p) and dW is never formed; each is standardised per sample (mean and std over its points x p), projected
on the point side to width q by a learned map with ReLU (``proj_flat``: (p x q) per view), and the four views are
concatenated (4 p q numbers per module). MVProbe probes one layer; a layer set has many, each with its own probes
and projections, and their 4 p q features are averaged over the modules before MVProbe's encoder (Linear to
``--hidden``, its rep_dim) and head (Linear to the outputs): at ``--depth`` 1 with no nonlinearity between the
two, as in MVProbe; at depth d > 1 an MLP, d - 1 more Linear(hidden, hidden), a ReLU before each Linear after the
encoder). Averaging rather than
concatenating: with a linear encoder, concatenation is a sum over modules of per-module maps, and the per-module
probes and projections already give each module its own features; the encoder stays 4 p q x hidden whatever the
number of modules. p = q = 32 here (MVProbe's are 128, for one layer): every module of a layer set has its 4 p q
rectified features for every adapter of a minibatch (the activations of a step are R x batch x modules x 4 p q:
1.3G numbers with MVProbe's sizes, 10 runs, batches of 128 and SD's 64 modules; 84M with these), and the encoder
has 4,096 inputs rather than 65,536 (2.1M weights per run at hidden 512, not 33.5M).

The responses depend on dW only, so the outputs are invariant to (B G^-1, G A) for any invertible G (tested).
"""

from __future__ import annotations

import torch

from . import rawtrain
from .hyper import Hyper
from .rawdata import RawFactors

PROBES = 32  # p: probe vectors per view and module (MVProbe's n_probes: 128, on one layer)
PROJECTION = 32  # q: width of each view's projection (MVProbe's proj_dim: 128)
VIEWS = ("xu", "xxtu", "xtu", "xtxu")  # MVProbe's order; xu, xxtu have out points, xtu, xtxu in points
STD_EPS = 1e-8  # MVProbe's _standardize_per_sample


def _uniform(gen: torch.Generator, shape: tuple, fan_in: int) -> torch.Tensor:
    """nn.Linear's initialisation of a weight or bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / fan_in ** 0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def init(gens: list[torch.Generator], shapes: list[tuple[int, int, int]], hp: Hyper, n_out: int) -> dict:
    """Per run, in MVProbe's order for each module: the four probe matrices (nn.Linear(p, d).weight, (d, p)), then
    the four projections (stored as they multiply, (points, q)); then the encoder, further layers and head."""
    p, q, h = PROBES, PROJECTION, hp.hidden
    per_run = []
    for g in gens:
        w = {}
        for m, (_, fan_in, fan_out) in enumerate(shapes):
            points = {"xu": fan_out, "xxtu": fan_out, "xtu": fan_in, "xtxu": fan_in}  # rows of each view's response
            probed = {"xu": fan_in, "xxtu": fan_out, "xtu": fan_out, "xtxu": fan_in}  # what each view's U multiplies
            for view in VIEWS:
                w[f"probe.{view}.{m}"] = _uniform(g, (probed[view], p), p)
            for view in VIEWS:
                w[f"proj.{view}.{m}"] = _uniform(g, (q, points[view]), points[view]).T.contiguous()
        sizes = [4 * p * q] + [h] * hp.depth + [n_out]
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            w[f"lin{i}.w"] = _uniform(g, (fan_out, fan_in), fan_in).T.contiguous()
            w[f"lin{i}.b"] = _uniform(g, (fan_out,), fan_in)
        per_run.append(w)
    return {k: torch.stack([w[k] for w in per_run]) for k in per_run[0]}


def responses(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, probes: dict) -> dict[str, torch.Tensor]:
    """The four views of X = s B A for factors A (R or 1, b, r, in), B (R or 1, b, out, r), s (R or 1, b), from
    right to left; probes ``{view: (R, d, p)}``. Each (R, b, points, p); nothing larger than (points x p) or
    (r x r) per adapter."""
    s = s[..., None, None]
    at, bt = a.mT, b.mT
    return {
        "xu": s * (b @ rawtrain.matmul_runs(a, probes["xu"])),
        "xxtu": s * s * (b @ ((a @ at) @ rawtrain.matmul_runs(bt, probes["xxtu"]))),
        "xtu": s * (at @ rawtrain.matmul_runs(bt, probes["xtu"])),
        "xtxu": s * s * (at @ ((bt @ b) @ rawtrain.matmul_runs(a, probes["xtxu"]))),
    }


def standardise(r: torch.Tensor) -> torch.Tensor:
    """MVProbe's per-sample standardisation over (points, p): (r - mean) / (std + 1e-8), std with Bessel's correction."""
    return (r - r.mean((-2, -1), keepdim=True)) / (r.std((-2, -1), keepdim=True) + STD_EPS)


def features(params: dict, x: RawFactors) -> torch.Tensor:
    """The probe features (R, b, 4 p q): per module the four standardised, projected, rectified views, averaged."""
    total = 0
    for m, (a, b, s) in enumerate(zip(x.A, x.B, x.scale)):
        views = responses(a, b, s, {view: params[f"probe.{view}.{m}"] for view in VIEWS})
        parts = [torch.relu(rawtrain.matmul_runs(standardise(views[view]).mT, params[f"proj.{view}.{m}"])).flatten(-2)
                 for view in VIEWS]
        total = total + torch.cat(parts, -1)
    return total / len(x.A)


def forward(params: dict, x: RawFactors, consts: dict, hp: Hyper) -> torch.Tensor:
    """Outputs (R, b, n_out) of every run; the factors' tensors have the leading dims (R or 1, b)."""
    z = features(params, x)
    for i in range(hp.depth + 1):
        if i > 0 and hp.depth > 1:  # depth 1: MVProbe's linear encoder straight into its linear head
            z = torch.relu(z)
        z = torch.baddbmm(params[f"lin{i}.b"][:, None], z, params[f"lin{i}.w"])
    return z


def row_elements(shapes: list[tuple[int, int, int]], hp: Hyper) -> int:
    """Activations per adapter and run: every view's response and projection, and the layers after them."""
    return sum(2 * (fan_in + fan_out) * PROBES + 4 * PROBES * PROJECTION for _, fan_in, fan_out in shapes) + 2 * hp.hidden


NET = rawtrain.Net(init, forward, row_elements)


def fit(train, val, seeds, hp, task, n_out, on_epoch=None):
    """pipeline/models.py's entry: the shared raw-factor loop (pipeline/rawtrain.py) with this network."""
    return rawtrain.fit(NET, train, val, seeds, hp, task, n_out, on_epoch)


def forward_flops(shapes: list[tuple[int, int, int]], hp: dict, n_out: int) -> int:
    """Matmul FLOPs of one run's forward pass on one adapter: per module the four views right to left (about
    8 p r (in + out), and the r x r Grams), their projections (4 p q (in + out)), then the layers after them."""
    p, q, h = PROBES, PROJECTION, hp["hidden"]
    modules = sum(8 * p * r * (fan_in + fan_out) + 2 * r * r * (fan_in + fan_out + 2 * p) + 4 * p * q * (fan_in + fan_out)
                  for r, fan_in, fan_out in shapes)
    return modules + 2 * (4 * p * q * h + (hp["depth"] - 1) * h * h + h * n_out)


def cost(size, hp: dict, epochs: float, runs: int) -> float:
    """pipeline/models.py's cost (``train --dry-run``)."""
    from .models import epoch_cost

    return epoch_cost(forward_flops(list(size.shapes), hp, size.n_out), size, epochs, runs)
