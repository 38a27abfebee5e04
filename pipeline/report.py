"""The report of the stored runs, for a paper: tables (Markdown, CSV, LaTeX) and figures (PNG, PDF), from the store alone.

Every configuration (representations, layer set, label, model, every hyper-parameter: one ``runs/<digest>``)
is its own row and bar; those that differ only in the layer set form one *variant*, shown as one table row
with the layer sets side by side, labelled by what differs from the defaults (``dw_norms · lr=1e-2, hidden=128``).
Statistics come from the stored test predictions and the test labels, through pipeline/stats.py
(docs/statistics.md): accuracy and macro F1 intervals over test adapters and seeds, each configuration against
the best, retention of part of the layers against all, per-class accuracy, the majority-class baseline.
Only runs marked complete are read; nothing is written to the store.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import zarr

from . import models, provenance, stats, store, tables
from .commands import quoted
from .errors import PipelineError
from .hyper import Hyper

DEFAULT_SEED = 42  # TrainConfig.seed (train.py imports torch, which a report does not need; a test keeps them equal)
HYPER = tuple(f.name for f in fields(Hyper))
LAYER_ORDER = ("all", "visual", "text")  # the original's layer sets first, in this order; others as first seen
CONFUSION = ("counts", "rates")

COLUMNS = ("config_hash", "label", "task", "model", "reps", "layer_set", "variant", "differs", "author", "trained_at",
           "runs", "seeds", "feature_width", "score", "test_mean", "test_low", "test_high", "test_se", "test_df", "test_std",
           "test_f1_mean", "test_f1_low", "test_f1_high", "test_precision_mean", "test_recall_mean",
           "test_r2_mean", "test_mae_mean", "test_mae_low", "test_mae_high", "test_rmse_mean",
           "test_mape_mean", "test_mape_low", "test_mape_high",
           "best_config", "vs_best_diff", "vs_best_low", "vs_best_high", "vs_best_p", "vs_best_p_holm", "vs_best_mcnemar_p",
           "retention_of", "retention", "retention_low", "retention_high", "majority_accuracy", "chance",
           "val_mean", "train_mean", "last_epoch_test_mean", "best_epoch_mean", "train_seconds", "warning",
           "seed", *HYPER)


# --- configurations: read, labelled, filtered -------------------------------------------------------------


@dataclass
class Config:
    """One configuration group of the store and its finished runs."""

    digest: str
    attrs: dict
    runs: list[dict]  # attrs of each complete run, in run order
    group: zarr.Group
    variant: str = ""  # the row label: reps and what differs from the defaults
    variant_key: str = ""  # the same for configurations that differ only in the layer set

    def values(self, split: str, key: str) -> list[float]:
        return [run["metrics"][split][key] for run in self.runs]

    @property
    def reps(self) -> str:
        return "+".join(self.attrs.get("reps", []))

    @property
    def hyper(self) -> dict:
        """The recorded hyper-parameters and seed (an old configuration without one: empty)."""
        conf = self.attrs.get("config") or {}
        return {k: conf[k] for k in (*HYPER, "seed") if k in conf}

    @property
    def authors(self) -> list[str]:
        """Who trained its runs (``user@host`` of each run's mark), first trainer first; [] for runs without one."""
        return list(dict.fromkeys(r["by"] for r in self.runs if r.get("by")))

    @property
    def trained_at(self) -> str:
        return max((r["at"] for r in self.runs if r.get("at")), default="")


def default_out(path: str) -> Path:
    """<store>.report beside the store: stores/default.zarr -> stores/default.report; for a store
    at a URL, under stores/ here: s3://bucket/team/lora.zarr -> stores/lora.report."""
    if store.is_url(path):
        path = Path("stores") / str(path).rstrip("/").rsplit("/", 1)[-1]
    path = store.local_path(path)
    return path.with_name((path.name[:-5] if path.name.endswith(".zarr") else path.name) + ".report")


def collect(path: str) -> list[Config]:
    """Every configuration with at least one finished run, labelled, in a stable order; of a personal store,
    also those of the store it builds on."""
    root = store.open_root(path, validate=False)  # only runs/ and labels/ are read: damaged root attrs do not stop it
    homes = [(path, root)]
    base = store.base_location(root)
    if base:  # a personal store: its own runs, and its base's (a configuration trained in both: its own)
        homes.append((base, store.open_root(base, mode="r", validate=False)))
    configs, seen = [], set()
    for location, home in homes:
        with store.damaged_metadata_is_one_line(location, f"{store.RUNS}/"):
            for digest, group in store.configurations(home):
                done = store.runs_of(group, complete=True)
                if done and digest not in seen:
                    seen.add(digest)
                    configs.append(Config(digest, group.attrs.asdict(), [run.attrs.asdict() for run in done.values()], group))
    if not configs:
        raise PipelineError(f"store {path} has no finished runs; run {quoted('train', path)} first")
    label_variants(configs)
    return sorted(configs, key=lambda c: (c.attrs["label"], c.variant, _layer_rank(c.attrs["layer_set"]), c.digest))


def _layer_rank(layer_set: str) -> tuple:
    return (LAYER_ORDER.index(layer_set), "") if layer_set in LAYER_ORDER else (len(LAYER_ORDER), layer_set)


def compact(value) -> str:
    """A number as a person writes it in a label: 1e-2, 5e-4, 0.5, 128."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    plain = f"{value:g}"
    mantissa, exponent = f"{value:.12e}".split("e")
    short = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return short if len(short) < len(plain) or (len(short) == len(plain) and abs(value) < 0.1) else plain


def differences(attrs: dict) -> dict:
    """What a configuration sets otherwise than ``pipeline train``'s defaults: model, seed and hyper-parameters
    (the ones a model always has, such as a linear model's depth 0, are not differences)."""
    conf = attrs.get("config") or {}
    model = models.REGISTRY.get(attrs.get("model"))
    defaults = model.defaults() if model else {f.name: f.default for f in fields(Hyper)}
    out = {"model": attrs["model"]} if attrs.get("model", "mlp") != "mlp" else {}  # absent: an old or damaged group
    if conf.get("seed", DEFAULT_SEED) != DEFAULT_SEED:
        out["seed"] = conf["seed"]
    out.update({k: conf[k] for k in HYPER if k in conf and conf[k] != defaults[k]})
    return out


def describe_differences(diff: dict) -> str:
    return ", ".join(f"{v}" if k == "model" else f"{k}={compact(v)}" for k, v in diff.items())


def label_variants(configs: list[Config]) -> None:
    """Give each configuration its variant (row label) and variant key.

    The key is the configuration minus its layer set: configurations that share it are one row with a
    column per layer set. Two different keys that would read alike (they differ in something the label
    does not show: a representation's version, the trainer's version, the source) get the key's first
    8 hex digits, so no two rows ever share a label.
    """
    for c in configs:
        conf = {k: v for k, v in (c.attrs.get("config") or {}).items() if k not in ("layer_set", "layers_hash")}
        c.variant_key = provenance.content_hash({"label": c.attrs.get("label"), "reps": c.attrs.get("reps"), **conf}, length=16)
        diff = describe_differences(differences(c.attrs))
        c.variant = f"{c.reps} · {diff}" if diff else c.reps
    seen: dict[tuple, set] = {}
    for c in configs:
        seen.setdefault((c.attrs.get("label"), c.variant), set()).add(c.variant_key)
    for c in configs:
        if len(seen[(c.attrs.get("label"), c.variant)]) > 1:
            c.variant = f"{c.variant} #{c.variant_key[:8]}"
    # one configuration per (variant, layer set): two with the same key and layer set (layer names that changed)
    # stay apart too, by their own hash
    cells: dict[tuple, list] = {}
    for c in configs:
        cells.setdefault((c.attrs.get("label"), c.variant_key, c.attrs.get("layer_set")), []).append(c)
    for group in cells.values():
        if len(group) > 1:
            for c in group:
                c.variant, c.variant_key = f"{c.variant} #{c.digest[:8]}", f"{c.variant_key}:{c.digest}"


# --where: field -> what it reads of a configuration (numbers are compared as numbers)
_WHERE_TEXT = {"rep": lambda c: [c.reps], "layer_set": lambda c: [c.attrs["layer_set"]], "label": lambda c: [c.attrs["label"]],
               "model": lambda c: [c.attrs["model"]], "task": lambda c: [c.attrs["task"]], "variant": lambda c: [c.variant],
               "author": lambda c: [w for a in c.authors for w in (a, a.split("@")[0])],
               "config": lambda c: [c.digest]}
WHERE_FIELDS = (*_WHERE_TEXT, "seed", *HYPER)
_WHERE_ALIASES = {"reps": "rep", "layers": "layer_set", "layer-set": "layer_set", "config_hash": "config", "by": "author"}


def parse_where(text: str | None) -> list[tuple[str, list[str]]]:
    """``lr=1e-3,model=mlp`` -> [("lr", ["1e-3"]), ("model", ["mlp"])]; ``rep=a|b`` is either. One line on a bad one."""
    conditions = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = _WHERE_ALIASES.get(name.strip(), name.strip().replace("-", "_"))
        if not sep or not value.strip():
            raise PipelineError(f"--where {text!r}: write conditions as field=value, comma-separated (e.g. lr=1e-3,model=mlp)")
        if name not in WHERE_FIELDS:
            raise PipelineError(f"--where: unknown field {name!r}; use one of {', '.join(WHERE_FIELDS)}")
        values = [v.strip() for v in value.split("|")]
        if name in ("seed", *HYPER):
            for v in values:
                try:
                    float(v)
                except ValueError:
                    raise PipelineError(f"--where {name}={v!r}: {name} is a number") from None
        conditions.append((name, values))
    return conditions


def matches(config: Config, conditions: list[tuple[str, list[str]]]) -> bool:
    for name, values in conditions:
        if name in _WHERE_TEXT:
            have = _WHERE_TEXT[name](config)
            if name == "config":
                ok = any(h.startswith(v) for h in have for v in values)
            else:
                ok = any(h == v for h in have for v in values)
        else:
            have = config.hyper.get(name)
            if have is None:
                defaults = {**{f.name: f.default for f in fields(Hyper)}, "seed": DEFAULT_SEED}
                have = defaults[name]
            ok = any(math.isclose(float(have), float(v), rel_tol=1e-9, abs_tol=0.0) for v in values)
        if not ok:
            return False
    return True


def select(configs: list[Config], where: str | None, path: str) -> list[Config]:
    conditions = parse_where(where)
    chosen = [c for c in configs if matches(c, conditions)]
    if not chosen:
        raise PipelineError(f"no configuration of store {path} matches --where {where!r} (it has {len(configs)}: "
                            f"{', '.join(sorted({c.variant for c in configs})[:6])}{', ...' if len(configs) > 6 else ''})")
    return chosen


# --- statistics of each configuration, from its stored test predictions --------------------------------------


@dataclass
class Scored:
    """One configuration with its test predictions and their statistics."""

    config: Config
    truth: np.ndarray  # (n,) test labels: class codes, or values (regression)
    predictions: np.ndarray  # (R, n)
    seeds: list[int]
    accuracy: stats.Interval | None = None
    f1: stats.Interval | None = None
    per_class: dict = field(default_factory=dict)  # class code -> Interval
    mae: tuple | None = None  # (estimate, low, high)
    mape: tuple | None = None  # (estimate, low, high), a fraction (metrics.regression's MAPE)

    @property
    def estimate(self) -> float:
        return self.accuracy.estimate if self.accuracy else float(np.mean(self.config.values("test", "r2")))


def _encode(root: zarr.Group, split: str, label: str, classes: list[str], task: str = "classification") -> np.ndarray | None:
    """The stored labels of ``split`` as the trainer coded them (-1: no label; regression: the values, an integer
    label's too), or None when the store cannot say."""
    info = (root.attrs.get("labels") or {}).get(label)
    if info is None:
        return None
    values = store.read_array(root, store.label_path(root, split, label))
    if info["kind"] == "float" or task == "regression":
        return values.astype(np.float64)
    if info["kind"] == "categorical":
        return values.astype(np.int64)
    names = [str(bool(v)) if info["kind"] == "bool" else str(v) for v in values]
    where = {name: i for i, name in enumerate(classes)}
    return np.array([where.get(n, -1) for n in names], dtype=np.int64)


def score(root: zarr.Group, config: Config, labels: dict) -> Scored:
    """Read the test predictions of every run and compute the configuration's statistics. ``labels``: a cache
    of ``_encode`` per (split, label, task)."""
    a = config.attrs
    runs = [config.group[store.run_key(r["run"])] for r in config.runs]
    index = store.read_array(runs[0], "test_index")
    predictions = np.stack([store.read_array(g, "test_pred") for g in runs])
    key = ("test", a["label"], a["task"])
    if key not in labels:
        labels[key] = _encode(root, "test", a["label"], a.get("classes", []), a["task"])
    coded = labels[key]
    truth = coded[index] if coded is not None and len(coded) > int(index.max(initial=-1)) else store.read_array(runs[0], "test_true")
    scored = Scored(config, truth, predictions, [int(r["seed"]) for r in config.runs])
    if a["task"] == "classification":
        k = len(a["classes"])
        scored.accuracy = stats.accuracy(truth, predictions)
        scored.f1 = stats.macro_f1(truth, predictions, k)
        scored.per_class = stats.per_class_accuracy(truth, predictions)
    else:
        error = np.abs(predictions - truth[None])
        scored.mae = _mean_of_cells(error)
        scored.mape = _mean_of_cells(error / np.maximum(np.abs(truth), np.finfo(np.float64).eps)[None])
    return scored


def _mean_of_cells(cells: np.ndarray) -> tuple[float, float, float]:
    """The mean of the R x n cells (|error| for the MAE, |error| / |y| for the MAPE) with the crossed-design t
    interval (stats.crossed_variance: test adapters and seeds), clipped at 0. Not bounded above, so no Wilson shape."""
    crossed = stats.crossed_variance(cells)
    estimate, var = float(crossed.estimate), float(crossed.var)
    half = float(stats.t_quantile(0.5 + stats.LEVEL / 2, float(crossed.df))) * math.sqrt(var) if math.isfinite(var) else math.nan
    return estimate, max(0.0, estimate - half), estimate + half


@dataclass
class LabelResults:
    """Everything the report says about one label's configurations."""

    label: str
    task: str
    classes: list[str]
    scored: list[Scored]
    best: str | None = None  # digest of the best configuration (classification)
    vs_best: dict = field(default_factory=dict)  # digest -> stats.Comparison
    retention: dict = field(default_factory=dict)  # digest (the part) -> (digest of all, Interval)
    baseline: dict | None = None  # stats.majority_baseline


def analyse(root: zarr.Group, configs: list[Config]) -> list[LabelResults]:
    """Statistics of every configuration, then per label the comparisons with the best, retention and the baseline."""
    cache: dict = {}
    out = []
    for label, task in dict.fromkeys((c.attrs["label"], c.attrs["task"]) for c in configs):  # a label may be both
        group = [score(root, c, cache) for c in configs if (c.attrs["label"], c.attrs["task"]) == (label, task)]
        first = group[0].config.attrs
        results = LabelResults(label, first["task"], list(first.get("classes", [])), group)
        if results.task == "classification":
            _compare(results)
            train = _encode(root, "train", label, results.classes)
            if train is not None and (train >= 0).any():
                results.baseline = stats.majority_baseline(train[train >= 0], group[0].truth, len(results.classes))
        out.append(results)
    return out


def _compare(results: LabelResults) -> None:
    """Each configuration against the best one (on the same test adapters), and retention of each variant's
    partial layer sets against its ``all``."""
    n = len(results.scored[0].truth)
    same = [s for s in results.scored if len(s.truth) == n and np.array_equal(s.truth, results.scored[0].truth)]
    if len(same) > 1:
        best, comparisons = stats.compare_to_best(same[0].truth, {s.config.digest: s.predictions for s in same},
                                                  {s.config.digest: s.seeds for s in same})
        results.best, results.vs_best = best, comparisons
    elif same:
        results.best = same[0].config.digest
    whole = {s.config.variant_key: s for s in same if s.config.attrs["layer_set"] == "all"}
    for s in same:
        full = whole.get(s.config.variant_key)
        if full is not None and full is not s:
            results.retention[s.config.digest] = (full.config.digest, stats.retention(
                s.truth, s.predictions, full.predictions, s.seeds, full.seeds))


def row(s: Scored, results: LabelResults) -> dict:
    """The numbers of one configuration, as in results.csv."""
    config, a = s.config, s.config.attrs
    score_name = config.runs[0]["score"]
    diff = differences(a)
    out = {
        "config_hash": config.digest, "label": a["label"], "task": a["task"], "model": a["model"], "reps": config.reps,
        "layer_set": a["layer_set"], "variant": config.variant, "differs": describe_differences(diff),
        "author": ";".join(config.authors), "trained_at": config.trained_at, "runs": len(config.runs),
        "seeds": ";".join(map(str, s.seeds)), "feature_width": a["feature_width"], "score": score_name,
        "val_mean": float(np.mean(config.values("val", score_name))),
        "train_mean": float(np.mean(config.values("train", score_name))),
        "last_epoch_test_mean": float(np.mean([r["last_epoch_metrics"]["test"][score_name] for r in config.runs])),
        "best_epoch_mean": float(np.mean([r["best_epoch"] for r in config.runs])),
        "train_seconds": float(sum(r["seconds"] for r in config.runs)),
        **config.hyper,
    }
    if s.accuracy is not None:
        acc, f1 = s.accuracy, s.f1
        out.update(test_mean=acc.estimate, test_low=acc.low, test_high=acc.high, test_se=acc.se, test_df=acc.df,
                   test_std=_std(config.values("test", "accuracy")), test_f1_mean=f1.estimate, test_f1_low=f1.low,
                   test_f1_high=f1.high, warning=acc.warning,
                   test_precision_mean=float(np.mean(config.values("test", "precision"))),
                   test_recall_mean=float(np.mean(config.values("test", "recall"))))
        if results.best is not None:
            out["best_config"] = results.best
        comparison = results.vs_best.get(config.digest)
        if comparison is not None:
            out.update(vs_best_diff=comparison.difference, vs_best_low=comparison.low, vs_best_high=comparison.high,
                       vs_best_p=comparison.p_value, vs_best_p_holm=comparison.p_adjusted,
                       vs_best_mcnemar_p=comparison.mcnemar_p)
        if config.digest in results.retention:
            of, ret = results.retention[config.digest]
            out.update(retention_of=of, retention=ret.estimate, retention_low=ret.low, retention_high=ret.high)
        if results.baseline:
            out.update(majority_accuracy=results.baseline["accuracy"], chance=results.baseline["chance"])
    else:
        r2 = config.values("test", "r2")
        out.update(test_mean=float(np.mean(r2)), test_std=_std(r2), test_r2_mean=float(np.mean(r2)),
                   test_mae_mean=s.mae[0], test_mae_low=s.mae[1], test_mae_high=s.mae[2],
                   test_rmse_mean=float(np.mean(config.values("test", "rmse"))),
                   test_mape_mean=s.mape[0], test_mape_low=s.mape[1], test_mape_high=s.mape[2],
                   warning=f"fewer than {stats.FEW_RUNS} runs: the MAE and MAPE intervals are approximate"
                   if len(config.runs) < stats.FEW_RUNS else "")
    return {k: out.get(k, "") for k in COLUMNS}


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


# --- the paper's tables -----------------------------------------------------------------------------------------


def _num(value, digits=3) -> str:
    return "-" if value is None or value == "" or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(interval: stats.Interval) -> str:
    mark = "†" if interval.few_runs else ""
    return f"{interval.estimate:.3f} [{interval.low:.3f}, {interval.high:.3f}]{mark}"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def layer_sets(scored: list[Scored]) -> list[str]:
    return sorted(dict.fromkeys(s.config.attrs["layer_set"] for s in scored), key=_layer_rank)


def variants(results: LabelResults) -> list[tuple[str, dict[str, Scored]]]:
    """(variant label, {layer set: Scored}) sorted by score: the first layer set's estimate (``all`` when there),
    then the next ones; a variant without a layer set sorts after those with it."""
    sets = layer_sets(results.scored)
    rows: dict[str, dict[str, Scored]] = {}
    for s in results.scored:
        rows.setdefault(s.config.variant, {})[s.config.attrs["layer_set"]] = s
    def key(item):
        return tuple(-item[1][ls].estimate if ls in item[1] and not math.isnan(item[1][ls].estimate) else math.inf
                     for ls in sets) + (item[0],)
    return sorted(rows.items(), key=key)


_FEW = f"† fewer than {stats.FEW_RUNS} runs: the interval's seed variance rests on {stats.FEW_RUNS - 2} degree of freedom (or none): approximate."


def paper_tables(results: LabelResults) -> list[tables.Table]:
    """The tables of one label: the score per variant with layer sets as columns (and retention), macro F1,
    each configuration against the best, per-class accuracy of the best variant (classification); R² and MAE
    (regression)."""
    sets = layer_sets(results.scored)
    rows = variants(results)
    slug = _slug(results.label)
    if results.task != "classification":
        def interval(cell: tuple) -> str:
            return f"{cell[0]:.3g} [{cell[1]:.3g}, {cell[2]:.3g}]"

        head = ["configuration", "runs", *[f"{ls} R²" for ls in sets], *[f"{ls} MAE [95% CI]" for ls in sets],
                *[f"{ls} MAPE [95% CI]" for ls in sets]]
        body = [[name, _runs(cells), *[_num(cells[ls].estimate) if ls in cells else "" for ls in sets],
                 *[interval(cells[ls].mae) if ls in cells else "" for ls in sets],
                 *[interval(cells[ls].mape) if ls in cells else "" for ls in sets]] for name, cells in rows]
        return [tables.Table(f"{slug}_r2", f"{results.label}: test R² (mean over runs), MAE and MAPE, by layer set",
                             head, body, "lr" + "r" * 3 * len(sets),
                             ["MAE and MAPE (a fraction: |error| / |label|, as scikit-learn's): means over runs and test "
                              "adapters, each with a t interval over both (docs/statistics.md); R²: the mean of the runs' "
                              "R², no interval."])]
    parts = [ls for ls in sets if ls != "all"] if "all" in sets else []
    notes = [f"Accuracy on {len(results.scored[0].truth)} test adapters, the mean over runs, with its 95% interval over "
             "test adapters and seeds (docs/statistics.md)."]
    if results.baseline:
        b = results.baseline
        notes.append(f"Majority class ({results.classes[b['majority_class']]}): {b['accuracy']:.3f} "
                     f"[{b['low']:.3f}, {b['high']:.3f}]; chance (1/{len(results.classes)}): {b['chance']:.3f}.")
    few = any(s.accuracy.few_runs for s in results.scored)
    if few:
        notes.append(_FEW)
    head = ["configuration", "runs", *[f"{ls} acc [95% CI]" for ls in sets], *[f"{ls}/all" for ls in parts]]
    body = []
    for name, cells in rows:
        line = [name, _runs(cells), *[_cell(cells[ls].accuracy) if ls in cells else "" for ls in sets]]
        for ls in parts:
            ret = results.retention.get(cells[ls].config.digest) if ls in cells else None
            line.append(f"{ret[1].estimate:.2f} [{ret[1].low:.2f}, {ret[1].high:.2f}]" if ret else "")
        body.append(line)
    out = [tables.Table(f"{slug}_accuracy", f"{results.label}: test accuracy by layer set", head, body,
                        "lr" + "r" * (len(sets) + len(parts)), notes)]
    f1_body = [[name, _runs(cells), *[_cell(cells[ls].f1) if ls in cells else "" for ls in sets]] for name, cells in rows]
    out.append(tables.Table(f"{slug}_f1", f"{results.label}: test macro F1 by layer set",
                            ["configuration", "runs", *[f"{ls} F1 [95% CI]" for ls in sets]], f1_body,
                            "lr" + "r" * len(sets), [_FEW] if few else []))
    if results.vs_best:
        out.append(_vs_best_table(results, slug))
    out.append(_per_class_table(results, rows[0], sets, slug))
    return out


def _runs(cells: dict[str, Scored]) -> str:
    counts = sorted({len(s.config.runs) for s in cells.values()})
    return "/".join(map(str, counts))


def _vs_best_table(results: LabelResults, slug: str) -> tables.Table:
    by_digest = {s.config.digest: s for s in results.scored}
    best = by_digest[results.best].config
    order = sorted(results.vs_best.items(), key=lambda kv: (kv[1].difference, kv[0]))
    body = [[by_digest[d].config.variant, by_digest[d].config.attrs["layer_set"], f"{c.difference:+.3f}",
             f"[{c.low:+.3f}, {c.high:+.3f}]", _p(c.p_value), _p(c.p_adjusted), _p(c.mcnemar_p),
             "paired" if c.paired else "independent"] for d, c in order]
    return tables.Table(f"{slug}_vs_best", f"{results.label}: each configuration against the best, "
                        f"{best.variant} [{best.attrs['layer_set']}]",
                        ["configuration", "layers", "Δ acc (best − this)", "95% CI", "p", "p (Holm)", "McNemar p", "seeds"],
                        body, "llrrrrrl",
                        ["Δ > 0: the best is ahead. t test over test adapters and seeds (runs paired by seed when they "
                         "share them); McNemar: exact test on the majority votes of the runs. The best is chosen on the "
                         "same test set, so its lead is optimistic."])


def _per_class_table(results: LabelResults, top: tuple[str, dict[str, Scored]], sets: list[str], slug: str) -> tables.Table:
    name, cells = top
    present = [ls for ls in sets if ls in cells]
    codes = sorted({k for ls in present for k in cells[ls].per_class})
    last = present[-1]

    def acc(k, ls):
        interval = cells[ls].per_class.get(k)
        return interval.estimate if interval is not None else -1.0
    codes.sort(key=lambda k: (-acc(k, last), k))
    body = []
    for k in codes:
        n = next(cells[ls].per_class[k].n_adapters for ls in present if k in cells[ls].per_class)
        body.append([results.classes[k] if k < len(results.classes) else str(k), str(n),
                     *[_cell(cells[ls].per_class[k]) if k in cells[ls].per_class else "" for ls in present]])
    return tables.Table(f"{slug}_per_class", f"{results.label}: per-class accuracy (recall) of {name}",
                        ["class", "test adapters", *[f"{ls} acc [95% CI]" for ls in present]], body,
                        "lr" + "r" * len(present),
                        [f"Sorted by the {last} accuracy: the classes at the top survive the {last} layers best."
                         if last != "all" else "Sorted by accuracy."])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# --- writing it ---------------------------------------------------------------------------------------------------


@dataclass
class ReportSummary:
    out: Path
    rows: list[dict]
    table: str
    files: list[Path]
    warnings: list[str] = field(default_factory=list)


def write_report(path: str, out: str | Path | None = None, where: str | None = None, confusion: str = "counts",
                 width: str = "auto") -> ReportSummary:
    """Read the store's runs (those ``where`` selects); write results.md, results.csv, each table as CSV and LaTeX,
    and the figures (PNG and PDF) into ``out``. ``confusion``: counts or rates in the confusion matrix's cells;
    ``width``: the figures' width, column (3.4 in), page (7 in) or auto."""
    if confusion not in CONFUSION:
        raise PipelineError(f"--confusion {confusion!r}: use counts or rates")
    from . import figures  # matplotlib: only once there is something to draw

    figures.check_width(width)
    configs = select(collect(path), where, path)
    root = store.open_root(path, validate=False)
    results = analyse(root, configs)
    chosen = _folder(path, out)
    try:
        return _write_files(chosen, path, where, results, confusion, width)
    except OSError as exc:  # a full disk or a folder that vanished: one line, the store is only read
        raise PipelineError(f"cannot write the report to {chosen} ({exc.strerror or exc}); free space or choose "
                            "another --out, then rerun") from None


def _folder(path: str, out: str | Path | None) -> Path:
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
    return chosen


def few_runs_warning(results: list[LabelResults]) -> list[str]:
    few = [s.config for r in results for s in r.scored if len(s.config.runs) < stats.FEW_RUNS]
    if not few:
        return []
    counts = sorted({len(c.runs) for c in few})
    return [f"{len(few)} of {sum(len(r.scored) for r in results)} configurations have fewer than {stats.FEW_RUNS} runs "
            f"({'/'.join(map(str, counts))}): their intervals are approximate; train more with --runs {stats.FEW_RUNS} or more"]


def _write_files(out: Path, path: str, where: str | None, results: list[LabelResults], confusion: str,
                 width: str) -> ReportSummary:
    """results.csv, per_class.csv, the tables, the figures and results.md (last: it links the others) into ``out``."""
    from . import figures

    rows = [row(s, r) for r in results for s in r.scored]
    files = [out / "results.csv", out / "per_class.csv", out / "results.md"]
    with open(files[0], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    _write_per_class(files[1], results)
    warnings = few_runs_warning(results)
    text = [f"# Results: {path}", ""]
    total = sum(len(r.scored) for r in results)
    text.append(f"{total} configurations, {sum(len(s.config.runs) for r in results for s in r.scored)} runs"
                f"{f', selected by --where {where}' if where else ''}. Rows are sorted by score; a row is one setting "
                "of representations, model and hyper-parameters, named by what differs from the defaults.")
    text += ["", *[f"**Warning:** {w}" for w in warnings], ""] if warnings else [""]
    printed = []
    for r in results:
        text.append(f"## {r.label} ({r.task})\n")
        for table in paper_tables(r):
            md = tables.markdown(table)
            text.append(md)
            printed.append(md)
            for suffix, render in (("csv", tables.to_csv), ("tex", tables.latex)):
                files.append(out / f"table_{table.name}.{suffix}")
                files[-1].write_text(render(table))
        drawn = figures.draw_label(r, out, confusion, width)
        files += drawn
        text += ["### Figures", ""] + [f"![{f.stem}]({f.name})" for f in drawn if f.suffix == ".png"] + [""]
    files[2].write_text("\n".join(text) + "\n")
    return ReportSummary(out, rows, "\n".join(printed), files, warnings)


def _write_per_class(file: Path, results: list[LabelResults]) -> None:
    with open(file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["config_hash", "label", "variant", "layer_set", "class", "test_adapters", "accuracy", "low", "high"])
        for r in results:
            for s in r.scored:
                for k, interval in s.per_class.items():
                    writer.writerow([s.config.digest, r.label, s.config.variant, s.config.attrs["layer_set"],
                                     r.classes[k] if k < len(r.classes) else k, interval.n_adapters,
                                     interval.estimate, interval.low, interval.high])
