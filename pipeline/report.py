"""Tables and plots of the stored runs: results.md, results.csv and PNG figures, from the store alone.

One row per configuration (representations x layer set, for one label and model): test score mean,
sample std (ddof 1) and the half-width of the 95% t confidence interval over its finished runs, macro
F1, feature width, train time and run count. Only runs marked complete are read.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from matplotlib.figure import Figure

from . import metrics, store
from .commands import quoted
from .errors import PipelineError

COLUMNS = ("config_hash", "label", "task", "model", "reps", "layer_set", "feature_width", "runs", "score",
           "test_mean", "test_std", "test_ci95", "test_f1_mean", "test_f1_std", "test_precision_mean", "test_recall_mean",
           "test_mae_mean", "test_rmse_mean", "val_mean", "train_mean", "last_epoch_test_mean", "best_epoch_mean",
           "train_seconds")


@dataclass
class Config:
    """One configuration group of the store and its finished runs."""

    digest: str
    attrs: dict
    runs: list[dict]  # attrs of each complete run, in run order
    group: zarr.Group

    def values(self, split: str, key: str) -> list[float]:
        return [run["metrics"][split][key] for run in self.runs]


def default_out(path: str) -> Path:
    """<store>.report beside the store: stores/default.zarr -> stores/default.report; for a store
    at a URL, under stores/ here: s3://bucket/team/lora.zarr -> stores/lora.report."""
    if store.is_url(path):
        path = Path("stores") / str(path).rstrip("/").rsplit("/", 1)[-1]
    path = store.local_path(path)
    return path.with_name((path.name[:-5] if path.name.endswith(".zarr") else path.name) + ".report")


def collect(path: str) -> list[Config]:
    """Every configuration with at least one finished run, in a stable order."""
    root = store.open_root(path, validate=False)  # only runs/ is read: damaged root attrs do not matter here
    configs = []
    with store.damaged_metadata_is_one_line(path, f"{store.RUNS}/"):
        for digest, group in store.configurations(root):
            done = store.runs_of(group, complete=True)
            if done:
                configs.append(Config(digest, group.attrs.asdict(), [run.attrs.asdict() for run in done.values()], group))
    if not configs:
        raise PipelineError(f"store {path} has no finished runs; run {quoted('train', path)} first")
    return sorted(configs, key=lambda c: (c.attrs["label"], c.attrs["model"], "+".join(c.attrs["reps"]), c.attrs["layer_set"]))


def row(config: Config) -> dict:
    """The numbers of one configuration, as in results.csv."""
    a = config.attrs
    score = config.runs[0]["score"]
    test = metrics.summarize(config.values("test", score))
    out = {
        "config_hash": config.digest, "label": a["label"], "task": a["task"], "model": a["model"], "reps": "+".join(a["reps"]),
        "layer_set": a["layer_set"], "feature_width": a["feature_width"], "runs": len(config.runs), "score": score,
        "test_mean": test["mean"], "test_std": test["std"], "test_ci95": test["ci95"],
        "val_mean": float(np.mean(config.values("val", score))), "train_mean": float(np.mean(config.values("train", score))),
        "last_epoch_test_mean": float(np.mean([r["last_epoch_metrics"]["test"][score] for r in config.runs])),
        "best_epoch_mean": float(np.mean([r["best_epoch"] for r in config.runs])),
        "train_seconds": float(sum(r["seconds"] for r in config.runs)),
    }
    if a["task"] == "classification":
        f1 = metrics.summarize(config.values("test", "f1"))
        out.update(test_f1_mean=f1["mean"], test_f1_std=f1["std"],
                   test_precision_mean=float(np.mean(config.values("test", "precision"))),
                   test_recall_mean=float(np.mean(config.values("test", "recall"))))
    else:
        out.update(test_mae_mean=float(np.mean(config.values("test", "mae"))),
                   test_rmse_mean=float(np.mean(config.values("test", "rmse"))))
    return {k: out.get(k, "") for k in COLUMNS}


def _fmt(value, digits=3) -> str:
    return "-" if value == "" or value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """One table per (label, model): representation x layer set."""
    parts = []
    for (label, model, task), group in _groups(rows).items():
        score = "acc" if task == "classification" else "R^2"
        second = "macro F1" if task == "classification" else "MAE"
        parts.append(f"### {label} ({task}, {model})\n")
        parts.append(f"| representation | layers | width | runs | test {score} mean ± std | 95% CI | {second} | "
                     f"train {score} | best epoch | train time (s) |")
        parts.append("|---|---|---:|---:|---|---|---|---:|---:|---:|")
        for r in group:
            lo, hi = r["test_mean"] - r["test_ci95"], r["test_mean"] + r["test_ci95"]
            ci = "-" if math.isnan(r["test_ci95"]) else f"[{lo:.3f}, {hi:.3f}]"
            extra = (f"{_fmt(r['test_f1_mean'])} ± {_fmt(r['test_f1_std'])}" if task == "classification"
                     else _fmt(r["test_mae_mean"]))
            parts.append(f"| {r['reps']} | {r['layer_set']} | {r['feature_width']} | {r['runs']} | "
                         f"{_fmt(r['test_mean'])} ± {_fmt(r['test_std'])} | {ci} | {extra} | {_fmt(r['train_mean'])} | "
                         f"{r['best_epoch_mean']:.1f} | {r['train_seconds']:.1f} |")
        parts.append("")
    return "\n".join(parts)


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["model"], r["task"]), []).append(r)
    return groups


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# --- figures ---------------------------------------------------------------------------------------


# Each figure is a matplotlib Figure saved straight to PNG (savefig picks the Agg canvas for it): no pyplot, so a
# report neither switches the process's matplotlib backend nor leaves figures in pyplot's registry.


def _bar_chart(rows: list[dict], file: Path, chance: float | None) -> None:
    reps = list(dict.fromkeys(r["reps"] for r in rows))
    sets = list(dict.fromkeys(r["layer_set"] for r in rows))
    width = 0.8 / len(sets)
    fig = Figure(figsize=(max(6, 1.0 * len(reps) * max(1, len(sets)) ** 0.5 + 2), 4.5))
    ax = fig.subplots()
    for j, layer_set in enumerate(sets):
        cells = {r["reps"]: r for r in rows if r["layer_set"] == layer_set}
        xs = [i + (j - (len(sets) - 1) / 2) * width for i, rep in enumerate(reps) if rep in cells]
        means = [cells[rep]["test_mean"] for rep in reps if rep in cells]
        errors = [0 if math.isnan(cells[rep]["test_ci95"]) else cells[rep]["test_ci95"] for rep in reps if rep in cells]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=layer_set)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xticks(range(len(reps)), reps, rotation=30, ha="right")
    ax.set_ylabel(f"test {rows[0]['score']} (mean, 95% CI)")
    ax.legend(title="layers")
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def _learning_curves(configs: list[Config], file: Path) -> None:
    cols = min(4, len(configs))
    rows = -(-len(configs) // cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, config in zip(axes.flat, configs):
        for k, run in enumerate(config.runs):
            g = config.group[store.run_key(run["run"])]
            epochs = store.read_array(g, "epoch")
            ax.plot(epochs, store.read_array(g, "train_score"), color="tab:blue", alpha=0.4, lw=0.8, label="train" if k == 0 else None)
            ax.plot(epochs, store.read_array(g, "val_score"), color="tab:orange", alpha=0.6, lw=0.8, label="val" if k == 0 else None)
            ax.axvline(run["best_epoch"], color="tab:green", alpha=0.2, lw=0.6)
        ax.set_title(f"{'+'.join(config.attrs['reps'])} [{config.attrs['layer_set']}]", fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    axes.flat[0].set_ylabel(configs[0].runs[0]["score"])
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=100)


def _confusion(config: Config, file: Path) -> None:
    total = sum(store.read_array(config.group, f"{store.run_key(run['run'])}/test_confusion")
                for run in config.runs).astype(np.float64)
    share = total / np.maximum(total.sum(1, keepdims=True), 1)
    classes = config.attrs["classes"]
    size = max(4.0, 0.45 * len(classes) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{'+'.join(config.attrs['reps'])} [{config.attrs['layer_set']}], {len(config.runs)} runs", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(file, dpi=120)


@dataclass
class ReportSummary:
    out: Path
    rows: list[dict]
    table: str
    files: list[Path]


def write_report(path: str, out: str | Path | None = None) -> ReportSummary:
    """Read the store's runs; write results.md, results.csv and the figures into ``out``."""
    configs = collect(path)
    rows = [row(c) for c in configs]
    chosen = Path(out) if out else default_out(path)
    try:
        chosen.mkdir(parents=True, exist_ok=True)
        if not os.access(chosen, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        if out:
            raise PipelineError(f"cannot create report folder {chosen} ({exc.strerror}); choose another --out") from None
        chosen = Path("stores") / chosen.name  # beside a read-only shared store: here instead
        chosen.mkdir(parents=True, exist_ok=True)
    try:
        return _write_files(chosen, path, configs, rows)
    except OSError as exc:  # a full disk or a folder that vanished: one line, the store is only read
        raise PipelineError(f"cannot write the report to {chosen} ({exc.strerror or exc}); free space or choose "
                            "another --out, then rerun") from None


def _write_files(out: Path, path: str, configs: list[Config], rows: list[dict]) -> ReportSummary:
    """results.csv, the figures and results.md (last: it links the figures) into ``out``."""
    files = [out / "results.csv", out / "results.md"]
    with open(files[0], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    figures = []
    for (label, model, task), group_rows in _groups(rows).items():
        stem = _slug(f"{label}_{model}")
        group = [c for c in configs if (c.attrs["label"], c.attrs["model"], c.attrs["task"]) == (label, model, task)]
        chance = 1 / len(group[0].attrs["classes"]) if task == "classification" else None
        figures.append(out / f"test_{stem}.png")
        _bar_chart(group_rows, figures[-1], chance)
        figures.append(out / f"curves_{stem}.png")
        _learning_curves(group, figures[-1])
        if task == "classification":
            best = max(group, key=lambda c: row(c)["test_mean"])
            figures.append(out / f"confusion_{stem}.png")
            _confusion(best, figures[-1])
    text = [f"# Results: {path}", "", f"{len(configs)} configurations, {sum(len(c.runs) for c in configs)} runs. "
            "Mean ± sample std over runs; 95% CI of the mean from Student's t.", "", table, "## Figures", ""]
    text += [f"![{f.stem}]({f.name})" for f in figures]
    files[1].write_text("\n".join(text) + "\n")
    return ReportSummary(out, rows, table, files + figures)
