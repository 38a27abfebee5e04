"""``--model linear``: the converged linear probe, an L2-regularised logistic regression (ridge for regression),
full batch on the device, its regularisation chosen on the validation split; pure torch, no store.

Classification is scikit-learn's ``LogisticRegression(C=C)`` (lbfgs): for K >= 3 classes the multinomial loss,
for 2 the binary one (one weight vector, as scikit-learn fits it), minimising ``C * sum_i loss_i + ||W||^2 / 2``
with the intercept unpenalised. Regression is ``Ridge(alpha=1/C)``: ``||y - Xw - b||^2 + ||w||^2 / C``, b
unpenalised, solved in closed form. Both are fitted for every C of ``GRID`` at once (one batched problem) on
the training split; the C with the best validation score is kept (accuracy, ties to the lower validation
log-loss, then to the smaller C; regression: the lower validation MSE). Nothing is refitted on train + val:
the MLP never trains on the validation split either, so the two see the same rows.

The fit is deterministic, so every run of a configuration gets the same model (R copies). Its "curves" are
the regularisation path, one entry per C of the grid in increasing order (weakest regularisation last):
train and validation loss (mean cross-entropy, or MSE of the standardised targets, unpenalised) and score
(accuracy or R^2), and ``lr``, which holds that entry's C (the probe has no learning rate). ``best_epoch`` is
the chosen C's position (1-based); ``predict(x, "best")`` uses it, ``predict(x, "last")`` the last C's fit.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from .models import Fitted

GRID = tuple(float(c) for c in np.logspace(-4, 4, 10))  # C: scikit-learn LogisticRegressionCV's default (Cs=10)
TOL = 1e-10  # L-BFGS stops a problem when max |gradient| of its objective / n (preconditioned) is below this
MAX_ITER = 1000
HISTORY = 10  # L-BFGS correction pairs (scipy's maxcor, what scikit-learn's lbfgs uses)
ARMIJO = 1e-4
FTOL = 64 * float(np.finfo(np.float64).eps)  # scikit-learn's ftol for lbfgs
DTYPE = torch.float64  # the objective is resolved to TOL; float32 would stall near 1e-4


def lbfgs(objective, x: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER, history: int = HISTORY):
    """Minimise G independent smooth convex functions at once: x (G, m) -> (x, iterations).

    ``objective(x, rows)`` -> (f, grad) of the problems ``rows`` (indices into G) at x (len(rows), m): only the
    problems still moving are evaluated (the weakly regularised ones take many more iterations than the others,
    which would otherwise be recomputed and thrown away). Each problem has its own L-BFGS memory (the two-loop
    recursion, batched), its own step length (backtracking from 1 until Armijo's condition holds: enough for a convex
    function, whose curvature pairs s^T y are never negative) and its own stop (scipy's: max |grad| <= tol, or
    a relative decrease of f of at most FTOL); a problem that has stopped is frozen while the others go on.
    """
    f, g = objective(x, torch.arange(len(x), device=x.device))
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1 / s^T y), per problem
    active = g.abs().amax(1) > tol
    iterations = 0
    while iterations < max_iter and bool(active.any()):
        iterations += 1
        q = g.clone()
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * (s * q).sum(1)
            q -= a[:, None] * y
            alphas.append(a)
        if pairs:
            s, y, _ = pairs[-1]
            yy = (y * y).sum(1)
            q *= torch.where(yy > 0, (s * y).sum(1) / yy.clamp(min=torch.finfo(x.dtype).tiny), 1.0)[:, None]
        else:  # the first step: at most 1 / ||g||_1 long, as torch.optim.LBFGS starts
            q /= g.abs().sum(1).clamp(min=1.0)[:, None]
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            q += (a - rho * (y * q).sum(1))[:, None] * s
        d = torch.where(active[:, None], -q, 0.0)
        slope = (g * d).sum(1)
        uphill = active & (slope >= 0)  # never for a positive definite memory; then plain gradient descent
        d = torch.where(uphill[:, None], -g, d)
        slope = torch.where(uphill, -(g * g).sum(1), slope)
        step = torch.ones_like(f)
        pending = active.clone()
        new_x, new_f, new_g = x.clone(), f.clone(), g.clone()
        for _ in range(60):  # halvings: 2^-60 is below any step that changes a float64
            rows = pending.nonzero().squeeze(1)
            trial = x[rows] + step[rows, None] * d[rows]
            f_t, g_t = objective(trial, rows)
            ok = f_t <= f[rows] + ARMIJO * step[rows] * slope[rows]
            done = rows[ok]
            new_x[done], new_f[done], new_g[done] = trial[ok], f_t[ok], g_t[ok]
            pending[done] = False
            if not bool(pending.any()):
                break
            step = torch.where(pending, step / 2, step)
        s, y = new_x - x, new_g - g
        sy = (s * y).sum(1)
        curved = sy > 0
        pairs.append((torch.where(curved[:, None], s, 0.0), torch.where(curved[:, None], y, 0.0),
                      torch.where(curved, 1 / sy.clamp(min=torch.finfo(x.dtype).tiny), 0.0)))
        pairs = pairs[-history:]
        # scipy's L-BFGS-B stops (what scikit-learn's lbfgs runs): max |grad| <= tol, or a full step that decreased
        # f by at most FTOL relative (below it f is rounding noise, and Armijo's test with it; a step cut short by
        # the backtracking says nothing); or no step improved f at all
        small = (step == 1) & ((f - new_f) <= FTOL * torch.maximum(torch.maximum(f.abs(), new_f.abs()), torch.ones_like(f)))
        x, f, g = new_x, new_f, new_g
        active &= ~pending & ~small & (g.abs().amax(1) > tol)
    return x, iterations


def _with_intercept(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)


def row_space(x: torch.Tensor, dims: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, d) = U S V^T: V (d, k), an orthonormal basis of x's row space, and S (k,), k its numerical rank.

    From one eigendecomposition of the smaller Gram matrix (X X^T when d > n, else X^T X) of x's columns that
    are not all zero (a constant feature, standardised; they add nothing to the row space: rank-1 spectra are
    mostly such padding); directions whose singular value is below rounding (relative max(n, d) eps of the
    largest, on the squares) are dropped. LAPACK's syevd can fail to converge on a Gram matrix with very many
    repeated eigenvalues; then the SVD of x gives the same basis.
    """
    n, d = dims or x.shape
    used = x.abs().amax(0) > 0
    if not bool(used.any()):
        return x.new_zeros(x.shape[1], 0), x.new_zeros(0)
    if not bool(used.all()):
        v, s = row_space(x[:, used], (n, d))
        full = x.new_zeros(x.shape[1], v.shape[1])
        full[used] = v
        return full, s
    floor = max(n, d) * torch.finfo(x.dtype).eps
    try:
        lam, vectors = torch.linalg.eigh(x @ x.T if x.shape[1] > x.shape[0] else x.T @ x)
    except torch.linalg.LinAlgError:
        _, sv, vh = torch.linalg.svd(x, full_matrices=False)
        keep = sv ** 2 > sv[0] ** 2 * floor
        return vh[keep].T, sv[keep]
    keep = lam > lam[-1].clamp(min=0) * floor
    s = lam[keep].sqrt()
    return (x.T @ (vectors[:, keep] / s) if x.shape[1] > x.shape[0] else vectors[:, keep]), s


def logistic_path(x: torch.Tensor, y: torch.Tensor, k: int, grid) -> torch.Tensor:
    """scikit-learn's L2 logistic regression for each C of ``grid``: x (n, d), y (n,) codes 0..k-1 (k >= 2).

    Returns (G, d + 1, k) (multinomial) or (G, d + 1, 1) (binary, k = 2), the intercept last along d + 1.
    Each problem is scaled by 1 / (C n) (scikit-learn scales by 1 / n too): mean loss + ||W||^2 / (2 C n).

    Solved in x's row space, where an L2-penalised W lies (a component outside it changes no logit and only
    adds penalty): W = V D beta, V from ``row_space``, so the problem has min(n, d) weights per class, and D the
    diagonal preconditioner 1 / sqrt(s^2 / (4 n) + 1 / (C n)), one over the root of the objective's curvature
    along each principal direction (a logistic loss curves at most 1/4): L-BFGS then sees a problem of
    condition near 1 where the features' own spectrum spans many decades. An exact change of variables.
    """
    n, _ = x.shape
    v, s = row_space(x)
    z = x @ v  # (n, r): U S
    r, width, grid_size = z.shape[1], 1 if k == 2 else k, len(grid)
    penalty = 1 / (torch.tensor(grid, dtype=x.dtype, device=x.device) * n)  # (G,)
    scale = torch.rsqrt(s[None] ** 2 / (4 * n) + penalty[:, None])[:, :, None]  # D (G, r, 1)
    target = y.to(x.dtype)[None, :, None] if k == 2 else F.one_hot(y, k).to(x.dtype)

    def objective(flat, rows):
        beta, diag, pen = flat.view(len(rows), r + 1, width), scale[rows], penalty[rows]
        w = diag * beta[:, :r]  # V^T W (G, r, width)
        logits = z @ w + beta[:, r:]  # (G, n, width); the intercept last, unscaled and unpenalised
        if k == 2:
            loss = F.softplus(logits).sub(target * logits).mean((1, 2))  # log(1 + e^z) - y z
            dz = (torch.sigmoid(logits) - target) / n
        else:
            loss = (torch.logsumexp(logits, -1) - (logits * target).sum(-1)).mean(1)
            dz = (torch.softmax(logits, -1) - target) / n
        grad = torch.cat([diag * (z.T @ dz + pen[:, None, None] * w), dz.sum(1, keepdim=True)], 1)
        return loss + 0.5 * pen * (w * w).sum((1, 2)), grad.reshape(len(rows), -1)

    flat, _ = lbfgs(objective, torch.zeros(grid_size, (r + 1) * width, dtype=x.dtype, device=x.device))
    beta = flat.view(grid_size, r + 1, width)
    return torch.cat([v @ (scale * beta[:, :r]), beta[:, r:]], 1)


def ridge_path(x: torch.Tensor, y: torch.Tensor, grid) -> torch.Tensor:
    """scikit-learn's ``Ridge(alpha=1/C)`` for each C of ``grid``: x (n, d), y (n,) -> (G, d + 1, 1), intercept last.

    Centred, then one eigendecomposition for the whole grid: of X^T X (d <= n) or of X X^T (the dual, d > n).
    """
    alpha = 1 / torch.tensor(grid, dtype=x.dtype, device=x.device)
    x_mean, y_mean = x.mean(0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    if x.shape[1] <= x.shape[0]:
        lam, v = torch.linalg.eigh(xc.T @ xc)
        w = v @ ((v.T @ (xc.T @ yc))[None] / (lam[None] + alpha[:, None])).T  # (d, G)
    else:
        lam, u = torch.linalg.eigh(xc @ xc.T)
        w = xc.T @ (u @ ((u.T @ yc)[None] / (lam[None] + alpha[:, None])).T)
    b = y_mean - x_mean @ w  # (G,)
    return torch.cat([w.T, b[:, None]], 1)[..., None]


def scores(weights: torch.Tensor, x: torch.Tensor, classes: torch.Tensor | None, n_out: int) -> torch.Tensor:
    """Outputs (G, n, n_out) of the fits ``weights`` (G, d + 1, width) on x (n, d): class scores, a binary fit's
    as (0, z), and the lowest float for the classes it never saw (``classes``: the codes it was fitted on);
    regression (classes None): (G, n, 1)."""
    z = _with_intercept(x.to(weights.dtype)) @ weights
    if classes is None:
        return z
    if weights.shape[-1] == 1:
        z = torch.cat([torch.zeros_like(z), z], -1)
    out = torch.full((*z.shape[:2], n_out), torch.finfo(z.dtype).min, dtype=z.dtype, device=z.device)
    out[..., classes] = z
    return out


def _path_metrics(out: torch.Tensor, y: torch.Tensor, classes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, score) per grid point, each (G,): mean cross-entropy and accuracy, or (``classes`` None) MSE and
    R^2 of standardised targets. Rows of a class the fit never saw have no finite cross-entropy: the loss
    leaves them out (they count, as errors, in the accuracy)."""
    from .metrics import r2

    if classes is None:
        return ((out[..., 0] - y) ** 2).mean(1), r2(y, out[..., 0])
    accuracy = (out.argmax(-1) == y[None]).to(out.dtype).mean(1)
    seen = torch.isin(y, classes)
    if not bool(seen.any()):
        return out.new_zeros(len(out)), accuracy
    logp = torch.log_softmax(out[:, seen], -1).gather(-1, y[seen][None, :, None].expand(len(out), -1, 1))
    return -logp.mean((1, 2)), accuracy


def choose(val_loss: np.ndarray, val_score: np.ndarray, task: str) -> int:
    """Index of the chosen C: the best validation score, ties to the lower loss, then to the smaller C
    (regression: the lower MSE, which is the higher R^2)."""
    if task == "regression":
        return int(np.argmin(val_loss))
    order = np.lexsort((np.arange(len(val_score)), val_loss, -val_score))  # last key first
    return int(order[0])


def fit(train: tuple, val: tuple, seeds: list[int], hp, task: str, n_out: int, on_epoch=None) -> Fitted:
    """pipeline/models.py's entry for ``--model linear``: the grid's fits on train, C chosen on val."""
    started = time.perf_counter()
    x, y = train[0].to(DTYPE), train[1]
    device = x.device
    if task == "regression":
        classes = None
        weights = ridge_path(x, y.to(DTYPE), GRID)
    else:
        classes = torch.unique(y)  # the codes present in train, sorted (scikit-learn fits those only)
        codes = torch.searchsorted(classes, y)
        weights = logistic_path(x, codes, len(classes), GRID)
    curves, losses = {}, {}
    for split, (xs, ys) in (("train", train), ("val", val)):
        loss, score = _path_metrics(scores(weights, xs, classes, n_out), ys.to(DTYPE) if classes is None else ys, classes)
        curves[f"{split}_loss"], curves[f"{split}_score"] = loss.cpu().numpy(), score.cpu().numpy()
    best = choose(curves["val_loss"], curves["val_score"], task)
    curves["lr"] = np.asarray(GRID)
    runs = len(seeds)
    kept = {"best": weights[best:best + 1], "last": weights[-1:]}

    def predict(inputs: torch.Tensor, which: str) -> torch.Tensor:
        out = scores(kept[which], inputs, classes, n_out)
        return (out.to(torch.float32) if classes is None else out).expand(runs, -1, -1)

    if on_epoch is not None:
        on_epoch(len(GRID), 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_run = {name: [np.asarray(values, dtype=np.float64) for _ in range(runs)] for name, values in curves.items()}
    return Fitted(per_run, np.full(runs, best + 1), predict, time.perf_counter() - started, str(device))


LBFGS_EVALUATIONS = 300  # a typical count of loss evaluations for the whole C grid (at most about MAX_ITER per C)


def cost(size, hp: dict, epochs: float, runs: int) -> float:
    """pipeline/models.py's cost (``train --dry-run``): one fit for all runs, about 4 FLOPs per weight per training
    row per L-BFGS evaluation, for each C of the grid."""
    return len(GRID) * (size.width + 1) * size.n_out * 4 * size.n["train"] * LBFGS_EVALUATIONS
