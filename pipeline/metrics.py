"""Metrics on the device for many runs at once, and the small statistics the report needs.

Classification metrics follow scikit-learn's definitions (tested against it): macro averages run
over the labels present in y_true or y_pred, and a precision/recall/F1 with a zero denominator is 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def confusion(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """y_true (n,), y_pred (R, n) integer codes -> (R, K, K) counts, rows = true class, columns = predicted."""
    runs = y_pred.shape[0]
    offset = torch.arange(runs, device=y_pred.device)[:, None] * n_classes * n_classes
    flat = offset + y_true[None, :] * n_classes + y_pred
    return torch.bincount(flat.reshape(-1), minlength=runs * n_classes * n_classes).view(runs, n_classes, n_classes)


def classification(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
    """Accuracy, macro precision, recall and F1 per run: each (R,), plus the (R, K, K) confusion matrices."""
    cm = confusion(y_true, y_pred, n_classes).to(torch.float64)
    tp = torch.diagonal(cm, dim1=1, dim2=2)
    true_count, pred_count = cm.sum(2), cm.sum(1)
    present = (true_count + pred_count) > 0  # sklearn's unique_labels(y_true, y_pred)
    n_present = present.sum(1).clamp(min=1)

    def ratio(num, den):
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    precision = ratio(tp, pred_count)
    recall = ratio(tp, true_count)
    f1 = ratio(2 * tp, true_count + pred_count)
    return {
        "accuracy": tp.sum(1) / cm.sum((1, 2)).clamp(min=1),
        "precision": (precision * present).sum(1) / n_present,
        "recall": (recall * present).sum(1) / n_present,
        "f1": (f1 * present).sum(1) / n_present,
        "confusion": cm.to(torch.int64),
    }


def r2(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination per run: y_true (n,), y_pred (R, n) -> (R,). 0 when y_true is constant."""
    y = y_true.to(torch.float64)
    ss_res = ((y[None] - y_pred.to(torch.float64)) ** 2).sum(1)
    ss_tot = ((y - y.mean()) ** 2).sum()
    if ss_tot == 0:
        return torch.where(ss_res == 0, 1.0, 0.0).to(torch.float64)  # sklearn's convention for a constant target
    return 1 - ss_res / ss_tot


def regression(y_true: torch.Tensor, y_pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """R^2, MAE, RMSE and MAPE per run, each (R,). MAPE is scikit-learn's: mean |y - y_pred| / max(|y|, eps), a
    fraction (not %), eps the float64 machine epsilon (DSiRe reports it for its image-count regression)."""
    y = y_true.to(torch.float64)
    err = y_pred.to(torch.float64) - y[None]
    eps = torch.finfo(torch.float64).eps
    return {"r2": r2(y_true, y_pred), "mae": err.abs().mean(1), "rmse": err.pow(2).mean(1).sqrt(),
            "mape": (err.abs() / y.abs().clamp(min=eps)[None]).mean(1)}


# --- summaries over runs (the report) ---------------------------------------------------------------

# Two-sided 95% quantiles t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf(0.975, df), 6 decimals); the
# package does not depend on scipy, and beyond 30 the Cornish-Fisher series below is exact to ~1e-6.
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def summarize(values) -> dict[str, float]:
    """mean, sample std (ddof 1) and the half-width of the 95% t confidence interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "ci95": math.nan, "n": 0}
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    return {"mean": float(v.mean()), "std": std, "ci95": t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan, "n": n}
