"""Metrics on the device for many runs at once (the report's statistics are pipeline/stats.py's).

Classification metrics follow scikit-learn's definitions (tested against it): macro averages run
over the labels present in y_true or y_pred, and a precision/recall/F1 with a zero denominator is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """The training loss, mean per run (R,): cross-entropy or squared error of outputs out (R, b, K or 1), y (R, b)."""
    runs, rows = y.shape
    if task == "classification":
        return F.cross_entropy(out.reshape(runs * rows, -1), y.reshape(-1), reduction="none").view(runs, rows).mean(1)
    return ((out[..., 0] - y) ** 2).mean(1)


def score(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """The validation score per run (R,): accuracy or R^2 of outputs (R, n, K or 1) against y (n,)."""
    if task == "classification":
        return (out.argmax(-1) == y[None]).to(torch.float64).mean(1)
    return r2(y, out[..., 0])


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

