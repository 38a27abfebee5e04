"""The report's figures, sized for a paper: a column (3.4 in) or a page (7 in) wide, 6-8 pt text, PNG and PDF.

Each figure is a matplotlib ``Figure`` saved straight to its files (savefig picks the Agg or PDF canvas for
it): no pyplot, so a report neither switches the process's matplotlib backend nor leaves figures in
pyplot's registry. Every font size is given per element, never through rcParams.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from . import stats, store
from .errors import PipelineError

COLUMN, PAGE = 3.4, 7.0  # inches: one column and the text width of a two-column paper
WIDTHS = ("auto", "column", "page")
TEXT, SMALL = 7, 6  # points: labels, and ticks/legends/cell text
DPI = 300


def check_width(width: str) -> None:
    if width not in WIDTHS:
        raise PipelineError(f"--figure-width {width!r}: use auto, column (3.4 in) or page (7 in)")


def _inches(width: str, fits_column: bool) -> float:
    return {"column": COLUMN, "page": PAGE}.get(width, COLUMN if fits_column else PAGE)


def _save(fig: Figure, out: Path, stem: str) -> list[Path]:
    files = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(files[0], dpi=DPI)
    fig.savefig(files[1])
    return files


def bar_data(results) -> list[dict]:
    """The bars of the score figure, best variant first: one per configuration (variant x layer set) with its
    estimate and interval (classification: accuracy; regression: R², no interval)."""
    from .report import layer_sets, variants

    sets = layer_sets(results.scored)
    out = []
    for name, cells in variants(results):
        for ls in sets:
            if ls in cells:
                s = cells[ls]
                interval = s.accuracy
                out.append({"variant": name, "layer_set": ls, "config_hash": s.config.digest, "estimate": s.estimate,
                            "low": interval.low if interval else math.nan, "high": interval.high if interval else math.nan,
                            "few_runs": len(s.config.runs) < stats.FEW_RUNS})
    return out


def score_figure(results, width: str = "auto") -> Figure:
    """Horizontal bars, one group per variant (best on top), one bar per layer set, with the 95% interval, the
    majority-class baseline and chance as vertical lines."""
    from .report import layer_sets

    data = bar_data(results)
    names = list(dict.fromkeys(d["variant"] for d in data))
    sets = layer_sets(results.scored)
    longest = max(len(n) for n in names)
    fig = Figure(figsize=(_inches(width, longest <= 28 and len(data) <= 30),
                          max(1.8, 0.9 + len(names) * (0.11 * len(sets) + 0.06))), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(sets)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for j, ls in enumerate(sets):
        bars = [(names.index(d["variant"]), d) for d in data if d["layer_set"] == ls]
        ys = [i + (j - (len(sets) - 1) / 2) * height for i, _ in bars]
        est = np.array([d["estimate"] for _, d in bars])
        err = None
        if results.task == "classification":
            err = np.array([[e - d["low"] for e, (_, d) in zip(est, bars)], [d["high"] - e for e, (_, d) in zip(est, bars)]])
        ax.barh(ys, est, height, xerr=err, color=colors[j % len(colors)], label=ls,
                error_kw={"elinewidth": 0.6, "capsize": 1.5, "capthick": 0.6})
    if results.baseline:
        ax.axvline(results.baseline["accuracy"], color="black", lw=0.7, ls="--", label="majority class")
        ax.axvline(results.baseline["chance"], color="grey", lw=0.7, ls=":", label="chance")
    ax.set_yticks(range(len(names)), names, fontsize=SMALL)
    ax.set_ylim(len(names) - 0.5, -0.5)  # best on top
    if results.task == "classification":
        ax.set_xlim(0, 1)
        ax.set_xlabel("test accuracy (95% interval)", fontsize=TEXT)
    else:
        ax.set_xlabel("test R² (mean over runs)", fontsize=TEXT)
    ax.tick_params(axis="x", labelsize=SMALL)
    ax.legend(fontsize=SMALL, title="layers", title_fontsize=SMALL, loc="lower right", frameon=False)
    ax.set_title(results.label, fontsize=TEXT)
    return fig


def curves_figure(results, width: str = "auto") -> Figure:
    """Train and val score of every run of every configuration, best epoch marked: a grid of small panels."""
    configs = [s.config for s in results.scored]
    cols = min(4 if width != "column" else 2, len(configs))
    rows = -(-len(configs) // cols)
    inches = _inches(width, cols <= 2)
    fig = Figure(figsize=(inches, max(1.8, 0.4 + 1.25 * rows * (inches / PAGE if cols > 2 else 1))), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, config in zip(axes.flat, configs):
        for k, run in enumerate(config.runs):
            g = config.group[store.run_key(run["run"])]
            epochs = store.read_array(g, "epoch")
            ax.plot(epochs, store.read_array(g, "train_score"), color="tab:blue", alpha=0.5, lw=0.6, label="train" if k == 0 else None)
            ax.plot(epochs, store.read_array(g, "val_score"), color="tab:orange", alpha=0.7, lw=0.6, label="val" if k == 0 else None)
            ax.axvline(run["best_epoch"], color="tab:green", alpha=0.3, lw=0.5)
        ax.set_title(f"{config.variant} [{config.attrs['layer_set']}]", fontsize=SMALL - 1)
        ax.tick_params(labelsize=SMALL - 1)
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    axes.flat[0].set_ylabel(configs[0].runs[0]["score"], fontsize=SMALL)
    axes.flat[0].legend(fontsize=SMALL - 1, frameon=False)
    fig.supxlabel("epoch", fontsize=SMALL)
    return fig


def confusion_counts(scored) -> np.ndarray:
    """(K, K) counts over every run's test predictions: rows the true class, columns the predicted one."""
    k = len(scored.config.attrs["classes"])
    flat = scored.truth[None, :] * k + scored.predictions
    return np.bincount(flat.reshape(-1).astype(np.int64), minlength=k * k).reshape(k, k)


def confusion_figure(scored, cells: str = "counts", width: str = "auto") -> Figure:
    """The confusion matrix of one configuration over its runs, coloured by the row's share, with counts (summed
    over runs) or rates (row-normalised) written in the cells (up to 30 classes; beyond, the colours alone)."""
    classes = scored.config.attrs["classes"]
    counts = confusion_counts(scored)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(classes)
    inches = _inches(width, k <= 12)
    fig = Figure(figsize=(inches, inches * 0.9), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    font = max(3.5, min(SMALL, 60 * inches / PAGE / max(k, 1)))
    if k <= 30:
        for i in range(k):
            for j in range(k):
                text = f"{counts[i, j]:d}" if cells == "counts" else f"{share[i, j]:.2f}".lstrip("0")
                if counts[i, j] or cells == "counts":
                    ax.text(j, i, text, ha="center", va="center", fontsize=font,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=60, ha="right", rotation_mode="anchor", fontsize=SMALL)
    ax.set_yticks(range(k), classes, fontsize=SMALL)
    ax.set_xlabel("predicted", fontsize=TEXT)
    ax.set_ylabel("true", fontsize=TEXT)
    what = "counts summed over" if cells == "counts" else "row rates over"
    ax.set_title(f"{scored.config.variant} [{scored.config.attrs['layer_set']}], {what} {len(scored.config.runs)} runs",
                 fontsize=SMALL)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=SMALL)
    return fig


def draw_label(results, out: Path, confusion: str, width: str) -> list[Path]:
    """Every figure of one label, as PNG and PDF: scores, learning curves, and the confusion matrix of the best
    configuration chosen (narrow it with --where to draw another)."""
    from .report import _slug

    stem = _slug(results.label)
    files = _save(score_figure(results, width), out, f"test_{stem}")
    files += _save(curves_figure(results, width), out, f"curves_{stem}")
    if results.task == "classification":
        best = max(results.scored, key=lambda s: s.estimate) if results.best is None else \
            next(s for s in results.scored if s.config.digest == results.best)
        files += _save(confusion_figure(best, confusion, width), out, f"confusion_{stem}")
    return files
