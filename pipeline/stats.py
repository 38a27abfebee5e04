"""The report's statistics: intervals over test adapters and training seeds, paired comparisons, baselines.

Every score of a configuration is a mean over a crossed design: R runs (training seeds) x n test adapters.
The estimand is the expected score of the configuration on new test adapters from the same distribution,
trained with new seeds. Its variance is estimated from the two-way random-effects ANOVA of the R x n
cells (method of moments), its degrees of freedom by Satterthwaite, and the interval is a Wilson-type
interval with an effective sample size, so it stays inside [0, 1] and keeps a width when the runs tie.
docs/statistics.md states the model, the assumptions and the coverage measured in tests/test_stats.py.

Pure numpy, no randomness (a rerun gives the same numbers); the low-level functions are batched over
leading axes so the coverage simulation runs thousands of repetitions at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95
FEW_RUNS = 3  # fewer runs than this: the seed variance rests on R - 1 < 2 degrees of freedom, say so


# --- Student's t without scipy ---------------------------------------------------------------------

_lgamma = np.vectorize(math.lgamma, otypes=[float])


def _betainc(a, b, x, y):
    """Regularised incomplete beta I_x(a, b), elementwise, given x and y = 1 - x (passed apart so that
    a tiny 1 - x keeps its digits). Lentz's continued fraction (Numerical Recipes 6.4), on the side of
    the symmetry I_x(a, b) = 1 - I_y(b, a) where it converges fast."""
    a, b, x, y = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(a, b, x, y))
    swap = x > (a + 1) / (a + b + 2)
    a, b, x, y = np.where(swap, b, a), np.where(swap, a, b), np.where(swap, y, x), np.where(swap, x, y)
    with np.errstate(divide="ignore"):
        front = np.exp(_lgamma(a + b) - _lgamma(a) - _lgamma(b) + a * np.log(x) + b * np.log(y)) / a
    tiny = 1e-300

    def guard(v):
        return np.where(np.abs(v) < tiny, tiny, v)

    c, d = np.ones_like(x), 1 / guard(1 - (a + b) * x / (a + 1))
    h = d.copy()
    for m in range(1, 1000):
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d, c = 1 / guard(1 + num * d), guard(1 + num / c)
        h *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d, c = 1 / guard(1 + num * d), guard(1 + num / c)
        h *= d * c
        if np.all(np.abs(d * c - 1) < 1e-15):
            break
    value = np.clip(front * h, 0.0, 1.0)
    return np.where(swap, 1 - value, value)


def t_sf(t, df):
    """P(T > t) for Student's t with ``df`` (real, > 0; inf is the normal) degrees of freedom, elementwise.

    For t >= 0, P(T > t) = I_{df / (df + t^2)}(df / 2, 1 / 2) / 2; the lower tail by symmetry."""
    t, df = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(t, df))
    normal = np.vectorize(lambda v: NormalDist().cdf(-v), otypes=[float])
    finite = np.isfinite(df)
    d = np.where(finite, df, 1.0)
    t2 = t * t
    upper = 0.5 * _betainc(d / 2, 0.5, d / (d + t2), t2 / (d + t2))
    upper = np.where(t >= 0, upper, 1 - upper)
    return np.where(finite, upper, normal(t)) if not finite.all() else upper


def _t_pdf(t, df):
    return np.exp(_lgamma((df + 1) / 2) - _lgamma(df / 2) - 0.5 * np.log(df * math.pi)
                  - (df + 1) / 2 * np.log1p(t * t / df))


def t_quantile(p: float, df):
    """The ``p`` quantile of Student's t with ``df`` (real, >= 1 or inf) degrees of freedom, elementwise.

    Start from the Cornish-Fisher series in 1/df (exact to ~1e-6 beyond 30 df), then Newton steps on
    t_sf: the t cdf is concave above 0, so the steps climb to the root from below without overshooting."""
    if not 0 < p < 1:
        raise ValueError(f"quantile level {p} is not strictly between 0 and 1")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    scalar = np.ndim(df) == 0
    df = np.atleast_1d(np.asarray(df, dtype=np.float64))
    z = NormalDist().inv_cdf(p)
    with np.errstate(divide="ignore"):
        g = 1 / df
    t = (z + (z ** 3 + z) / 4 * g + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96 * g ** 2
         + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384 * g ** 3)
    refine = np.isfinite(df) & (df < 1e4)
    if p > 0.5 and refine.any():
        x, d = t[refine], df[refine]
        for _ in range(200):
            step = ((1 - p) - t_sf(x, d)) / _t_pdf(x, d)  # F(x) - p = (1 - p) - sf(x)
            x = x - step
            if np.all(np.abs(step) <= 1e-13 * np.abs(x)):
                break
        t[refine] = x
    return float(t[0]) if scalar else t


# --- the crossed design: runs x test adapters --------------------------------------------------------


@dataclass(frozen=True)
class Crossed:
    """Batched variance of a (weighted sum of) grand mean(s) over runs x adapters: each field (...,)."""

    estimate: np.ndarray
    var: np.ndarray  # estimated Var(estimate): adapter + run
    df: np.ndarray  # Satterthwaite degrees of freedom of ``var``
    adapter: np.ndarray  # sigma^2_adapter / n + sigma^2_residual / (n R), i.e. s^2(adapter means) / n
    run: np.ndarray  # sigma^2_run / R, the positive part of (MS_run - MS_residual) / (n R)


def _mean_squares(z):
    """z (..., R, n) -> grand (...,), adapter means (..., n), MS_run (...,), MS_residual (...,): the
    two-way ANOVA without replication. MS_run and MS_residual are NaN for R = 1."""
    runs, n = z.shape[-2:]
    grand = z.mean((-2, -1))
    rows, cols = z.mean(-2), z.mean(-1)
    if runs < 2 or n < 2:
        nan = np.full(grand.shape, np.nan)
        return grand, rows, nan, nan
    ms_run = n * ((cols - grand[..., None]) ** 2).sum(-1) / (runs - 1)
    resid = z - rows[..., None, :] - cols[..., :, None] + grand[..., None, None]
    ms_res = (resid ** 2).sum((-2, -1)) / ((n - 1) * (runs - 1))
    return grand, rows, ms_run, ms_res


def crossed_variance(*groups, weights=None) -> Crossed:
    """Variance of sum_k w_k mean(z_k) for groups z_k (..., R_k, n) that share the n test adapters (column
    i is the same adapter in every group) and have independent runs.

    Model: z_k[r, i] = mu_k + a_k[i] + b_k[r] + e_k[r, i] (adapters, runs and residual random; a_k may be
    correlated across groups, b_k and e_k are not). With MS_run, MS_res of the two-way ANOVA of each group,
        Var = s^2(sum_k w_k abar_k[i]) / n + sum_k w_k^2 max(0, MS_run,k - MS_res,k) / (n R_k),
    where abar_k[i] is adapter i's mean over group k's runs: the first term estimates
    sum var(a)/n + sigma^2_res,k / (n R_k) without bias, the second sigma^2_run,k / R_k (its positive part:
    a variance is not negative). One group of R = 1: only the first term (the seeds are not estimable).
    Runs shared by seed are one group: pass z_a - z_b. Degrees of freedom: Satterthwaite's
    (sum v_j)^2 / sum v_j^2 / df_j over the mean-square terms v_j, at least 1.
    """
    weights = [1.0] * len(groups) if weights is None else weights
    n = groups[0].shape[-1]
    combined, run, terms = 0.0, 0.0, []
    for w, z in zip(weights, groups):
        z = np.asarray(z, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        runs = z.shape[-2]
        _, rows, ms_run, ms_res = _mean_squares(z)
        combined = combined + w[..., None] * rows
        if runs > 1 and n > 1:
            positive = ms_run > ms_res
            scale = w ** 2 / (n * runs)
            run = run + np.where(positive, scale * (ms_run - ms_res), 0.0)
            terms += [(np.where(positive, scale * ms_run, 0.0), runs - 1),
                      (np.where(positive, scale * ms_res, 0.0), (n - 1) * (runs - 1))]
    estimate = combined.mean(-1)
    adapter = combined.var(-1, ddof=1) / n if n > 1 else np.full(np.shape(estimate), np.nan)
    terms.append((adapter, max(n - 1, 1)))
    var = adapter + run
    denominator = sum(v ** 2 / d for v, d in terms)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denominator > 0, var ** 2 / denominator, max(n - 1, 1))
    return Crossed(estimate, var, np.maximum(df, 1.0), adapter, np.asarray(run + 0.0 * estimate))


def wilson(p, n_eff, q):
    """Wilson's score interval for a proportion p from n_eff observations with quantile q: the theta with
    (p - theta)^2 <= q^2 theta (1 - theta) / n_eff. Always inside [0, 1]; elementwise."""
    p, n_eff, q = (np.asarray(v, dtype=np.float64) for v in (p, n_eff, q))
    k = q ** 2 / n_eff
    centre = (p + k / 2) / (1 + k)
    half = q * np.sqrt(p * (1 - p) / n_eff + k / (4 * n_eff)) / (1 + k)
    # exact at the ends (p = 0 gives low = 0, p = 1 high = 1), which rounding would otherwise miss by 1e-16
    return np.where(p == 0, 0.0, np.clip(centre - half, 0.0, 1.0)), np.where(p == 1, 1.0, np.clip(centre + half, 0.0, 1.0))


def bounded_interval(crossed: Crossed, runs: int, n: int, level: float = LEVEL):
    """(low, high) for a score in [0, 1]: Wilson's interval with the effective sample size
    n_eff = p (1 - p) / Var (the design effect's sample size, capped at the R n cells) and the t quantile
    of the Satterthwaite df in place of z (Korn and Graubard's construction for survey proportions).
    Var = 0 (all cells equal, e.g. every run right on every adapter) falls back to n_eff = n adapters."""
    p, var = crossed.estimate, crossed.var
    usable = (var > 0) & (p > 0) & (p < 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = np.where(usable, np.minimum(p * (1 - p) / np.where(usable, var, 1.0), runs * n), max(n, 1))
    df = np.where(usable, crossed.df, max(n - 1, 1))
    return wilson(p, n_eff, t_quantile(0.5 + level / 2, df))


# --- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A score with its interval: ``estimate`` (mean over runs and adapters), ``low``/``high`` (the
    ``level`` interval), ``se`` (estimated standard error), ``df`` (its degrees of freedom), the design
    (``n_adapters``, ``n_runs``), ``few_runs`` (fewer than 3 runs) and ``warning`` ('' or why to doubt it)."""

    estimate: float
    low: float
    high: float
    se: float
    df: float
    n_adapters: int
    n_runs: int
    level: float
    few_runs: bool
    warning: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Configuration a minus configuration b on the same test adapters: ``difference`` of expected
    accuracies with ``low``/``high``, ``se``, ``df`` and the two-sided ``p_value`` of the t test of no
    difference (``p_adjusted``: Holm's, when several comparisons are made at once, else equal to it);
    ``paired``: runs paired by seed; McNemar's exact test on the majority votes: ``mcnemar_b`` (adapters
    a right, b wrong), ``mcnemar_c`` (a wrong, b right) and ``mcnemar_p``; ``level``, and ``few_runs`` and
    ``warning`` as in ``Interval`` for the smaller run count."""

    difference: float
    low: float
    high: float
    se: float
    df: float
    p_value: float
    p_adjusted: float
    paired: bool
    n_adapters: int
    runs_a: int
    runs_b: int
    mcnemar_b: int
    mcnemar_c: int
    mcnemar_p: float
    level: float
    few_runs: bool
    warning: str

    def as_dict(self) -> dict:
        return asdict(self)


def _warning(runs: int, n: int) -> str:
    if n < 2:
        return f"{n} test adapter(s): the test-set variance is not estimable, the interval is a bare Wilson bound"
    if runs == 1:
        return "1 run: the interval covers the test-set sampling only, not the variation between seeds"
    if runs < FEW_RUNS:
        return f"fewer than {FEW_RUNS} runs: the seed variance rests on {runs - 1} degree of freedom, the interval is approximate"
    return ""


def _interval(crossed: Crossed, low, high, runs: int, n: int, level: float) -> Interval:
    return Interval(float(crossed.estimate), float(low), float(high), float(np.sqrt(crossed.var)), float(crossed.df),
                    n, runs, level, runs < FEW_RUNS, _warning(runs, n))


def _codes(y_true, y_pred):
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_pred.ndim == 1:
        y_pred = y_pred[None]
    if y_true.ndim != 1 or y_pred.ndim != 2 or y_pred.shape[1] != y_true.shape[0]:
        raise ValueError(f"y_true (n,) and y_pred (R, n) expected, got {y_true.shape} and {y_pred.shape}")
    return y_true, y_pred


def _empty(runs: int, level: float) -> Interval:
    return Interval(math.nan, math.nan, math.nan, math.nan, math.nan, 0, runs, level, runs < FEW_RUNS, "no test adapter")


def proportion(correct, level: float = LEVEL) -> Interval:
    """Interval for the expected share of 1s of a (R, n) 0/1 array of runs x test adapters."""
    correct = np.asarray(correct, dtype=np.float64)
    runs, n = correct.shape
    if n == 0:
        return _empty(runs, level)
    crossed = crossed_variance(correct)
    low, high = bounded_interval(crossed, runs, n, level)
    return _interval(crossed, low, high, runs, n, level)


def accuracy(y_true, y_pred, level: float = LEVEL) -> Interval:
    """Expected accuracy over new test adapters and new seeds: y_true (n,), y_pred (R, n) integer codes.

    estimate = mean over the R n cells of [y_pred[r, i] == y_true[i]] (the mean of the runs' accuracies);
    interval: ``bounded_interval`` of the crossed design."""
    y_true, y_pred = _codes(y_true, y_pred)
    return proportion(y_pred == y_true[None], level)


def f1_pseudo_values(y_true, y_pred, n_classes: int):
    """Linearised macro F1: y_true (..., n), y_pred (..., R, n) -> z (..., R, n) with mean_i z[r, i] equal
    to run r's macro F1 (scikit-learn's: over the classes in y_true or y_pred, 0 for a class with no
    true and no predicted adapter) and z[r, i] - F1_r its influence: with per-run shares tp_k, t_k, p_k
    (true positives, true, predicted), F1_k = 2 tp_k / (t_k + p_k) and
        psi[r, i] = (1 / K_present) sum_k (2 [y_i = k = yhat_ri] - F1_k ([y_i = k] + [yhat_ri = k])) / (t_k + p_k)."""
    classes = np.arange(n_classes)
    truth = (np.asarray(y_true)[..., None, :, None] == classes).astype(np.float64)  # (..., 1, n, K)
    pred = (np.asarray(y_pred)[..., None] == classes).astype(np.float64)  # (..., R, n, K)
    hit = truth * pred
    t, p, tp = truth.mean(-2), pred.mean(-2), hit.mean(-2)  # (..., R, K)
    denominator = t + p
    present = denominator > 0
    safe = np.where(present, denominator, 1.0)
    f1 = np.where(present, 2 * tp / safe, 0.0)
    count = present.sum(-1, keepdims=True)
    macro = f1.sum(-1, keepdims=True) / count  # (..., R, 1)
    influence = ((2 * hit - f1[..., None, :] * (truth + pred)) * (present / safe)[..., None, :]).sum(-1) / count
    return macro + influence


def macro_f1(y_true, y_pred, n_classes: int | None = None, level: float = LEVEL) -> Interval:
    """Expected macro F1 over new test adapters and seeds: the mean of the runs' macro F1 with the crossed
    variance of its linearisation (``f1_pseudo_values``, the delta method) and the same bounded interval.
    The finite-test-set F1 is biased for the population F1 by O(1/n); the interval ignores that."""
    y_true, y_pred = _codes(y_true, y_pred)
    runs, n = y_pred.shape
    if n == 0:
        return _empty(runs, level)
    k = int(max(y_true.max(), y_pred.max())) + 1 if n_classes is None else n_classes
    crossed = crossed_variance(f1_pseudo_values(y_true, y_pred, k))
    low, high = bounded_interval(crossed, runs, n, level)
    return _interval(crossed, low, high, runs, n, level)


def per_class_accuracy(y_true, y_pred, level: float = LEVEL) -> dict[int, Interval]:
    """Recall of each class present in y_true: the accuracy interval on that class's test adapters only."""
    y_true, y_pred = _codes(y_true, y_pred)
    return {int(k): accuracy(y_true[y_true == k], y_pred[:, y_true == k], level) for k in np.unique(y_true)}


# --- comparisons -----------------------------------------------------------------------------------------


def seed_order(seeds_a: Sequence[int] | None, seeds_b: Sequence[int] | None) -> np.ndarray | None:
    """Positions in b of a's seeds when both runs sets have exactly the same distinct seeds, else None
    (the runs are then treated as independent)."""
    if seeds_a is None or seeds_b is None:
        return None
    a, b = [int(s) for s in seeds_a], [int(s) for s in seeds_b]
    if len(set(a)) != len(a) or sorted(a) != sorted(b):
        return None
    where = {s: i for i, s in enumerate(b)}
    return np.array([where[s] for s in a], dtype=np.int64)


def difference(correct_a, correct_b, paired: bool, level: float = LEVEL):
    """Batched mean(correct_a) - mean(correct_b) for 0/1 arrays (..., R_a, n), (..., R_b, n) on the same
    adapters -> (estimate, low, high, Crossed). Paired (same seeds, in the same order): the crossed
    variance of the cell differences; else two groups with independent runs. A t interval, clipped to
    [-1, 1]. Var = 0 (every adapter's runs differ by the same amount, e.g. identical predictions): the
    square-and-add (MOVER, Newcombe) interval of the shares of adapters where a beats b and b beats a,
    each with Wilson's bounds over the n adapters, so the width stays positive."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    crossed = crossed_variance(a - b) if paired else crossed_variance(a, b, weights=[1.0, -1.0])
    d = crossed.estimate
    half = t_quantile(0.5 + level / 2, crossed.df) * np.sqrt(crossed.var)
    low, high = np.maximum(d - half, -1.0), np.minimum(d + half, 1.0)
    if np.any(crossed.var == 0):
        n = a.shape[-1]
        gap = a.mean(-2) - b.mean(-2)
        up, down = np.maximum(gap, 0).mean(-1), np.maximum(-gap, 0).mean(-1)
        q = t_quantile(0.5 + level / 2, max(n - 1, 1))
        (up_low, up_high), (down_low, down_high) = wilson(up, n, q), wilson(down, n, q)
        low = np.where(crossed.var == 0, d - np.hypot(up - up_low, down_high - down), low)
        high = np.where(crossed.var == 0, d + np.hypot(up_high - up, down - down_low), high)
    return d, low, high, crossed


def t_test_p(crossed: Crossed, n: int):
    """Two-sided p of estimate = 0: 2 P(T_df > |estimate| / se). When se = 0 every one of the n adapters
    differs by the same amount: 1 if that is 0, else the exact sign test's 2^(1 - n)."""
    se = np.sqrt(crossed.var)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.abs(crossed.estimate) / np.where(se > 0, se, 1.0)
    p = np.minimum(2 * t_sf(stat, crossed.df), 1.0)
    return np.where(se > 0, p, np.where(crossed.estimate == 0, 1.0, min(1.0, 2.0 ** (1 - n))))


def majority_vote(y_pred, n_classes: int | None = None) -> np.ndarray:
    """(R, n) codes -> (n,) the class most runs predict for each adapter; a tie goes to the lowest code."""
    y_pred = np.asarray(y_pred)
    k = int(y_pred.max()) + 1 if n_classes is None else n_classes
    counts = (y_pred[..., None] == np.arange(k)).sum(-3)  # (n, K)
    return counts.argmax(-1)


def mcnemar_exact(correct_a, correct_b) -> tuple[int, int, float]:
    """McNemar's exact test on paired 0/1 outcomes (n,): b = #(a right, b wrong), c = #(a wrong, b right);
    under no difference b ~ Binomial(b + c, 1/2), p = min(1, 2 P(X <= min(b, c))) (exact, integer sums)."""
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    m = b + c
    if m == 0 or b == c:
        return b, c, 1.0
    tail = sum(math.comb(m, j) for j in range(min(b, c) + 1))
    return b, c, min(1.0, 2 * tail / 2 ** m)


def compare(y_true, pred_a, pred_b, seeds_a: Sequence[int] | None = None, seeds_b: Sequence[int] | None = None,
            level: float = LEVEL) -> Comparison:
    """Accuracy of configuration a minus configuration b on the same test adapters: pred_a (R_a, n),
    pred_b (R_b, n). Runs are paired when both seed lists hold the same seeds (b's runs reordered to a's),
    independent otherwise. Plus McNemar's exact test on the two majority votes."""
    y_true, pred_a = _codes(y_true, pred_a)
    _, pred_b = _codes(y_true, pred_b)
    order = seed_order(seeds_a, seeds_b)
    if order is not None:
        pred_b = pred_b[order]
    right_a, right_b = pred_a == y_true[None], pred_b == y_true[None]
    estimate, low, high, crossed = difference(right_a, right_b, order is not None, level)
    p = float(t_test_p(crossed, len(y_true)))
    k = int(max(y_true.max(), pred_a.max(), pred_b.max())) + 1
    b, c, p_mcnemar = mcnemar_exact(majority_vote(pred_a, k) == y_true, majority_vote(pred_b, k) == y_true)
    runs = min(len(pred_a), len(pred_b))
    return Comparison(float(estimate), float(low), float(high), float(np.sqrt(crossed.var)), float(crossed.df), p, p,
                      order is not None, len(y_true), len(pred_a), len(pred_b), b, c, p_mcnemar, level,
                      runs < FEW_RUNS, _warning(runs, len(y_true)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the j-th smallest of m p-values becomes max_{i<=j} min(1, (m - i + 1) p_(i))."""
    order = np.argsort(p_values, kind="stable")
    m, running, out = len(p_values), 0.0, [0.0] * len(p_values)
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        out[index] = running
    return out


def compare_to_best(y_true, predictions: Mapping[str, np.ndarray], seeds: Mapping[str, Sequence[int]] | None = None,
                    level: float = LEVEL) -> tuple[str, dict[str, Comparison]]:
    """The configuration with the highest mean accuracy (the first on a tie) and each other one compared
    with it (``compare(best, other)``: a positive difference favours the best), Holm-adjusted over the
    comparisons. The best is chosen on the same test set, so its lead is optimistic (docs/statistics.md)."""
    y_true = np.asarray(y_true)
    means = {name: float((np.asarray(p).reshape(-1, len(y_true)) == y_true).mean()) for name, p in predictions.items()}
    best = max(means, key=lambda name: means[name])
    seeds = seeds or {}
    out = {name: compare(y_true, predictions[best], pred, seeds.get(best), seeds.get(name), level)
           for name, pred in predictions.items() if name != best}
    adjusted = holm([c.p_value for c in out.values()])
    return best, {name: replace(c, p_adjusted=p) for (name, c), p in zip(out.items(), adjusted)}


# --- baselines and ratios ---------------------------------------------------------------------------------


def majority_baseline(y_train, y_test, n_classes: int | None = None, level: float = LEVEL) -> dict[str, float]:
    """Predict the training split's most frequent class (lowest code on a tie) for every test adapter:
    ``majority_class``, its test ``accuracy`` with Wilson's ``low``/``high`` over the n test adapters (a
    fixed predictor: only the test set varies), and ``chance`` = 1 / K (K = n_classes, default the codes seen)."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    k = int(max(y_train.max(), y_test.max())) + 1 if n_classes is None else n_classes
    majority = int(np.bincount(y_train, minlength=k).argmax())
    share = float((y_test == majority).mean())
    low, high = wilson(share, len(y_test), NormalDist().inv_cdf(0.5 + level / 2))
    return {"majority_class": majority, "accuracy": share, "low": float(low), "high": float(high), "chance": 1 / k,
            "n_adapters": len(y_test)}


def ratio(correct_num, correct_den, paired: bool, level: float = LEVEL):
    """Batched mean(correct_num) / mean(correct_den) on the same adapters -> (estimate, low, high, Crossed).
    Delta method: Var(rho) ~ Var(mean_num - rho mean_den) / mean_den^2 (crossed variance of that linear
    combination, paired or not as in ``difference``); the t interval on the log scale, rho exp(+-q se / rho),
    which stays above 0. Var = 0 or rho = 0: the ratio of the two means' Wilson bounds over the n adapters,
    [low_num / high_den, high_num / low_den]. NaN when the denominator's mean is 0."""
    num, den = np.asarray(correct_num, dtype=np.float64), np.asarray(correct_den, dtype=np.float64)
    m_num, m_den = num.mean((-2, -1)), den.mean((-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(m_den > 0, m_num / m_den, np.nan)
        w_num, w_den = 1 / m_den, -rho / m_den
        if paired:
            crossed = crossed_variance(w_num[..., None, None] * num + w_den[..., None, None] * den)
        else:
            crossed = crossed_variance(num, den, weights=[w_num, w_den])
        crossed = replace(crossed, estimate=rho)
        usable = (crossed.var > 0) & (rho > 0)
        spread = t_quantile(0.5 + level / 2, crossed.df) * np.sqrt(crossed.var) / np.where(usable, rho, 1.0)
        n = num.shape[-1]
        q = t_quantile(0.5 + level / 2, max(n - 1, 1))
        (num_low, num_high), (den_low, den_high) = wilson(m_num, n, q), wilson(m_den, n, q)
        low = np.where(usable, rho * np.exp(-spread), num_low / den_high)
        high = np.where(usable, rho * np.exp(spread), num_high / den_low)
    return rho, low, high, crossed


def retention(y_true, pred_part, pred_all, seeds_part: Sequence[int] | None = None,
              seeds_all: Sequence[int] | None = None, level: float = LEVEL) -> Interval:
    """Accuracy retained when a configuration sees part of the layers (e.g. visual) instead of all:
    expected accuracy(part) / expected accuracy(all) on the same test adapters, with ``ratio``'s interval
    (runs paired by seed as in ``compare``). ``n_runs`` is the smaller run count."""
    y_true, pred_part = _codes(y_true, pred_part)
    _, pred_all = _codes(y_true, pred_all)
    order = seed_order(seeds_part, seeds_all)
    if order is not None:
        pred_all = pred_all[order]
    rho, low, high, crossed = ratio(pred_part == y_true[None], pred_all == y_true[None], order is not None, level)
    runs, n = min(len(pred_part), len(pred_all)), len(y_true)
    return Interval(float(rho), float(low), float(high), float(np.sqrt(crossed.var)), float(crossed.df), n, runs, level,
                    runs < FEW_RUNS, _warning(runs, n))
