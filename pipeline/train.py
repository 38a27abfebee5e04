"""Stage 3: train an MLP (or a linear model) on stored features, every run of a configuration at once.

A *configuration* is one cell of the grid: representations (``a`` or ``a+b``) x layer set, plus the
label and every hyper-parameter. This module reads it top to bottom: the config, the grid, the data
(stored features -> standardised arrays), the run bookkeeping (config hash, finished runs, whole
batches), the metrics and runs written, then the orchestration (in process or on dask). The runs
themselves (seeds ``seed + run``) train together as one batched ensemble in pipeline/model.py, which
knows nothing of the store.

Only ``labels/``, ``features/`` and the root attrs are read; results go to ``runs/<config-hash>/``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import zarr

from . import cluster, leases, metrics, models, provenance, rawdata, representations, store
from .commands import quoted
from .errors import PipelineError, disk_full
from .hyper import Hyper, unset_by_default
from .models import Fitted

TRAIN_VERSION = 1  # bump when a change to the trainer changes its results: it is part of the config hash
SPLITS = ("train", "val", "test")
TASKS = ("auto", "classification", "regression")
DEFAULT_LABEL = "category_label"  # the original's label, trained on when the store has it and --label is not given
LAYER_SETS = {"all": None, "visual": "attn1", "text": "attn2"}  # the original's configurations
MAX_RUNS = 1000  # runs of one configuration train as one ensemble in memory: more is a typo, not a protocol
MAX_WIDTH, MAX_DEPTH = 1 << 16, 64  # likewise for the MLP's hidden width and depth


@dataclass(frozen=True)
@unset_by_default
class TrainConfig(Hyper):
    """Everything ``pipeline train`` takes; the defaults are the original protocol.

    The hyper-parameter fields (depth, hidden, dropout, lr, ...) are Hyper's, inherited: one copy of
    them. One not given (None) takes its model's default (``models.Model.unset``: Hyper's, or the model's
    preset) when the config is made, so a config's fields are always values. The trainer gets ``hyper()``,
    not this config, because a model's fixed hyper-parameters (a linear model's depth 0) replace some.
    """

    store: str = store.DEFAULT_STORE
    reps: str = "all"  # "all", "a,b" (separate configurations) or "a+b" (concatenated); mixable: "a,b+c"
    layers: str = "all"  # comma-separated layer sets: all, visual, text, or a regex
    label: str | None = None  # None: category_label if the store has it, else its only classification label
    runs: int = 10
    seed: int = 42
    model: str = "mlp"  # a name in pipeline/models.py's registry
    task: str = "auto"  # auto: a float label is regressed, any other classified; or "classification", "regression"
    device: str = "auto"
    force: bool = False
    quiet: bool = False
    output: str | None = None  # write the runs here (a personal store) when ``store`` is read-only
    workers: int | None = None  # a LocalCluster of this many worker processes, one configuration per task
    scheduler: str | None = None  # address of an existing dask.distributed scheduler (or $DASK_SCHEDULER_ADDRESS)
    dashboard: bool = False  # serve the local cluster's dask dashboard (on 127.0.0.1)
    dry_run: bool = False  # plan the grid and estimate its cost (``plan``); nothing is trained or written
    raw_memory: int | None = None  # bytes of raw factors kept on the device (rawdata.place); None: rawdata.memory_budget

    def __post_init__(self):
        h = self.given()  # an unknown model: one line naming the models
        finite = math.isfinite  # NaN fails every comparison below, but inf passes "> 0"
        checks = [("runs", self.runs, 1 <= self.runs <= MAX_RUNS, f"1 to {MAX_RUNS}"),
                  ("hidden", h.hidden, 1 <= h.hidden <= MAX_WIDTH, f"1 to {MAX_WIDTH}"),
                  ("depth", h.depth, 1 <= h.depth <= MAX_DEPTH, f"1 to {MAX_DEPTH}"),
                  ("dropout", h.dropout, 0 <= h.dropout < 1, "0 <= p < 1"),
                  ("lr", h.lr, finite(h.lr) and h.lr > 0, "a finite number > 0"),
                  ("weight-decay", h.weight_decay, finite(h.weight_decay) and h.weight_decay >= 0, "a finite number >= 0"),
                  ("batch-size", h.batch_size, h.batch_size >= 2, "2 or more"), ("epochs", h.epochs, h.epochs >= 1, "1 or more"),
                  ("patience", h.patience, h.patience >= 1, "1 or more"),
                  ("plateau-patience", h.plateau_patience, h.plateau_patience >= 0, "0 or more"),
                  ("plateau-factor", h.plateau_factor, 0 < h.plateau_factor < 1, "0 < f < 1"),
                  ("seed", self.seed, 0 <= self.seed and self.seed + self.runs < 1 << 63, "0 <= seed, seed + runs < 2**63"),
                  ("raw-memory", self.raw_memory, self.raw_memory is None or self.raw_memory >= 0, "a size of 0 bytes or more")]
        for name, value, ok, rule in checks:
            if not ok:
                raise PipelineError(f"--{name} {value!r} is out of range; use {rule}")
        if self.task not in TASKS:
            raise PipelineError(f"unknown --task {self.task!r}; use {', '.join(TASKS)}")
        cluster.check_workers(self.workers)
        cluster.check_device(self.device)

    def given(self) -> Hyper:
        """This config's hyper-parameters, its model's preset for each one left at None (not given). The Nones stay
        in the config, so that ``dataclasses.replace(config, model=...)`` gives the new model its own preset."""
        unset = models.get(self.model).unset()
        return Hyper(**{f.name: getattr(unset if getattr(self, f.name) is None else self, f.name) for f in fields(Hyper)})

    def hyper(self) -> Hyper:
        """What the model trains with: this config's hyper-parameters (``given``), with those its model fixes set
        (``linear``: depth 0, no hidden layer, no dropout)."""
        return models.get(self.model).hyper(self.given())


# --- the grid ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One cell of the grid: representations concatenated in this order, restricted to one layer set."""

    reps: tuple[str, ...]
    layer_set: str

    @property
    def name(self) -> str:
        return f"{'+'.join(self.reps)} [{self.layer_set}]"


def layer_pattern(layer_set: str) -> re.Pattern | None:
    """all -> None (everything); visual -> attn1; text -> attn2; anything else is a regex (re.search)."""
    if layer_set in LAYER_SETS:
        pattern = LAYER_SETS[layer_set]
        return None if pattern is None else re.compile(re.escape(pattern))
    try:
        return re.compile(layer_set)
    except re.error as err:
        raise PipelineError(f"--layers {layer_set!r} is not a valid regular expression ({err})") from None


def select(names: list[str], layer_set: str) -> np.ndarray:
    """Indices of the names (layer or module names) that the layer set keeps, in stored order."""
    pattern = layer_pattern(layer_set)
    return np.array([i for i, name in enumerate(names) if pattern is None or pattern.search(name)], dtype=np.int64)


def feature_home(root: zarr.Group, name: str) -> zarr.Group:
    """Where a representation's features are read: this store, or the shared store it builds on (--personal-store)."""
    base = store.base_location(root)
    if base is None:
        return root
    rep = representations.get(name)
    fingerprint = root.attrs["source"]["fingerprint"]
    groups = [root.get(f"features/{split}") for split in SPLITS]
    if all(g is not None and provenance.rep_state(store.member(g, name), rep, fingerprint) == "fresh" for g in groups):
        return root
    return store.open_root(base, mode="r")


def _stored_reps(root: zarr.Group) -> list[str]:
    present = set()
    base = store.base_location(root)
    for group in (root, store.open_root(base, mode="r") if base else None):
        features = group.get("features/train") if group is not None else None
        present |= set(features.array_keys()) if features is not None else set()
    return [name for name in representations.REGISTRY if name in present]


def plan_grid(root: zarr.Group, config: TrainConfig) -> list[Setup]:
    """The configurations asked for: rep groups x layer sets, in the order given. A model that reads the raw
    factors has one group, models.RAW (``--rep all`` or ``--rep raw``)."""
    model = models.get(config.model)
    if model.inputs == "raw":
        if config.reps.strip() not in ("all", models.RAW):
            raise PipelineError(f"--model {model.name} learns from the raw LoRA factors, not from stored features; "
                                f"use --rep {models.RAW} (or all)")
        groups = [(models.RAW,)]
    elif models.RAW in [p.strip() for part in config.reps.split(",") for p in part.split("+")]:
        raise PipelineError(f"--rep {models.RAW} is read only by the models that learn from the raw factors "
                            f"({', '.join(m.name for m in models.REGISTRY.values() if m.inputs == 'raw') or 'none yet'})")
    elif config.reps.strip() == "all":
        groups = [(name,) for name in _stored_reps(root)]
        if not groups:
            raise PipelineError(f"store {config.store} has no features yet; run {quoted('features', config.store)}")
    else:
        groups = [tuple(p.strip() for p in part.split("+")) for part in config.reps.split(",") if part.strip()]
        if not groups or any(not all(g) for g in groups):
            raise PipelineError(f"--rep {config.reps!r}: name representations like a,b or a+b")
        for group in groups:
            for name in group:
                representations.get(name)
    layer_sets = [s.strip() for s in config.layers.split(",") if s.strip()]
    if not layer_sets:
        raise PipelineError("--layers names no layer set; use all, visual, text or a regex")
    return [Setup(group, layer_set) for group in dict.fromkeys(groups) for layer_set in dict.fromkeys(layer_sets)]


# --- data: stored features -> standardised tensors ---------------------------------------------------


@dataclass
class Data:
    """One configuration's inputs, standardised with train statistics; y is codes or floats."""

    x: dict[str, np.ndarray]  # split -> (n, width) float32
    y: dict[str, np.ndarray]  # split -> (n,) int64 class codes or float64 targets
    index: dict[str, np.ndarray]  # split -> positions in labels/<split> of the rows kept (labelled ones)
    task: str  # "classification" or "regression"
    classes: list[str]  # class names (classification)
    layers: dict[str, list[str]]  # rep -> names of the selected layers (or modules)
    y_scale: tuple[float, float] = (0.0, 1.0)  # regression: targets were standardised with this (mean, std)

    @property
    def width(self) -> int:
        """Numbers per adapter the model reads (features, or the raw factors)."""
        train = self.x["train"]
        return train.width if hasattr(train, "width") else train.shape[1]


def check_splits(root: zarr.Group, path: str) -> None:
    splits = root.attrs["splits"]
    for split in SPLITS:
        if split not in splits:
            raise PipelineError(f"store {path} has no {split!r} split (it has {', '.join(splits)}); training needs train, val and test")
        if splits[split]["n"] == 0:
            raise PipelineError(f"split {split!r} of store {path} has no rows; materialize with other --val-size/--test-size")


def resolve_label(root: zarr.Group, path: str, label: str | None) -> str:
    """The label to train on: the one asked for; else category_label (the original's) when the store has
    it, else the store's only classification label; else a one-line refusal that names the labels it has."""
    known = root.attrs["labels"]
    if label is not None or DEFAULT_LABEL in known:
        return DEFAULT_LABEL if label is None else label
    classes = [name for name, info in known.items() if info["kind"] != "float"]  # float labels are regression targets
    if len(classes) == 1:
        return classes[0]
    have = ", ".join(f"{name} ({info['kind']})" for name, info in known.items()) or "no labels"
    what = "several classification labels" if classes else "no classification label"
    raise PipelineError(f"store {path} has no {DEFAULT_LABEL} and {what}; choose one with --label (it has {have})")


def load_labels(root: zarr.Group, path: str, label: str | None, task: str = "auto") -> tuple[dict, dict, str, list[str]]:
    """Per split the kept positions and targets, the task, and the class names. Rows without a label are dropped.

    ``task`` auto: a float label is regressed, a categorical, integer or boolean one classified (its distinct
    values the classes); "regression" also regresses an integer label (e.g. LoRA-WiSE's image counts, as
    numbers); "classification" also classifies it (DSiRe's view of the same counts: each count a class).
    """
    label = resolve_label(root, path, label)
    known = root.attrs["labels"]
    if label not in known:
        raise PipelineError(f"unknown label {label!r}; the store has {', '.join(known) or 'no labels'}")
    kind = known[label]["kind"]
    if task == "auto":
        task = "regression" if kind == "float" else "classification"
    if task == "regression" and kind not in ("float", "integer"):
        raise PipelineError(f"--task regression needs a numeric label, but {label!r} is {kind}; use --task classification")
    if task == "classification" and kind == "float":
        raise PipelineError(f"--task classification needs classes, but {label!r} is a float label; use --task regression, "
                            "or store it as integers or strings")
    raw = {split: store.read_array(root, store.label_path(root, split, label)) for split in SPLITS}
    classes = []
    if task == "regression":
        raw = {split: values.astype(np.float64) for split, values in raw.items()}  # an integer label too
        for split, values in raw.items():  # NaN is a missing label; an infinite one is no target to learn
            if np.isinf(values).any():
                raise PipelineError(f"label {label!r} has {int(np.isinf(values).sum())} infinite value(s) in split {split!r}; "
                                    "fix them (or make them missing) in the source and rematerialize, or choose another --label")
        keep = {s: np.flatnonzero(np.isfinite(v)) for s, v in raw.items()}
        y = {s: raw[s][keep[s]] for s in SPLITS}
    elif kind == "categorical":
        classes = list(known[label]["classes"])
        keep = {s: np.flatnonzero(v >= 0) for s, v in raw.items()}
        y = {s: raw[s][keep[s]].astype(np.int64) for s in SPLITS}
    else:  # integer or bool: the distinct values are the classes, in sorted order (LabelEncoder)
        values = np.unique(np.concatenate([raw[s] for s in SPLITS]))
        classes = [str(bool(v)) if kind == "bool" else str(v) for v in values]
        keep = {s: np.arange(len(v)) for s, v in raw.items()}
        y = {s: np.searchsorted(values, raw[s]).astype(np.int64) for s in SPLITS}
    for split in SPLITS:
        if len(keep[split]) == 0:
            raise PipelineError(f"split {split!r} has no rows with a {label!r} label")
    if task == "classification" and len(np.unique(y["train"])) < 2:
        raise PipelineError(f"label {label!r} has only one class in the train split: nothing to classify")
    return keep, y, task, classes


def check_task(model_name: str, task: str, label: str) -> None:
    """The model takes the label's task (knn-vote: classification only), or one line that says which it takes."""
    model = models.get(model_name)
    if task not in model.tasks:
        raise PipelineError(f"--model {model.name} does not do {task} (label {label!r}); it does {', '.join(model.tasks)}: "
                            "choose another --model, --label or --task")


def check_fresh(root: zarr.Group, path: str, name: str, on_wait=None) -> None:
    """The representation is complete and up to date in every split, or a one-line error with the fix.

    A representation someone is computing right now is waited for (``on_wait(split, holder)``), then checked.
    """
    rep = representations.get(name)
    fingerprint = root.attrs["source"]["fingerprint"]
    fix = f"run {quoted('features', path, '--rep', name)}"
    root = feature_home(root, name)
    for split in SPLITS:
        leases.wait_for(root.store, f"features/{split}/{name}",
                        on_wait=(lambda holder, split=split: on_wait(split, holder)) if on_wait else None)
        group = store.member(root, f"features/{split}")
        if group is None:
            raise PipelineError(f"representation {name!r} is not computed yet; {fix}")
        state = provenance.rep_state(store.member(group, name), rep, fingerprint)
        if state != "fresh":
            what = {"partial": "only partly computed", "stale": "not computed yet or stale"}[state]
            if state == "stale" and name in group:
                what = "stale (computed from other data or an older version)"
            raise PipelineError(f"representation {name!r} is {what} for split {split!r}; {fix}")


def axis_names(root: zarr.Group, name: str) -> list[str]:
    """Names along a representation's second axis: sorted layer names (tensor kind) or module names (module
    kind, and the raw factors)."""
    if name != models.RAW and representations.get(name).kind == "tensor":
        return [layer["name"] for layer in root.attrs["layers"]]
    return [module["name"] for module in root.attrs["modules"]]


def load_data(root: zarr.Group, path: str, setup: Setup, label: str | None, cache: dict | None = None,
              task: str = "auto") -> Data:
    """Slice the stored features to the layer set, flatten per model, concatenate reps, standardise."""
    label = resolve_label(root, path, label)
    keep, y, task, classes = load_labels(root, path, label, task)
    if setup.reps == (models.RAW,):
        return _raw_data(root, path, setup, keep, y, task, classes, label)
    cache = {} if cache is None else cache
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    layers = {}
    for name in setup.reps:
        check_fresh(root, path, name)
        names = axis_names(root, name)
        index = select(names, setup.layer_set)
        if len(index) == 0:
            axis = "layers" if representations.get(name).kind == "tensor" else "modules"
            raise PipelineError(f"layer set {setup.layer_set!r} matches none of the {len(names)} {axis} of {name!r}")
        layers[name] = [names[i] for i in index]
        home = feature_home(root, name)
        for split in SPLITS:
            if (split, name) not in cache:
                cache[(split, name)] = store.read_array(home, f"features/{split}/{name}")
            values = cache[(split, name)][keep[split]][:, index].reshape(len(keep[split]), -1)
            bad = int((~np.isfinite(values)).sum())
            if bad:
                raise PipelineError(f"features {name!r} of split {split!r} contain {bad} NaN/Inf values; "
                                    f"recompute them with {quoted('features', path, '--rep', name, '--force')}")
            parts[split].append(values)
    x = {s: np.concatenate(parts[s], axis=1) for s in SPLITS}
    mean, scale = standard_scaler(x["train"])
    x = {s: ((v - mean) / scale).astype(np.float32) for s, v in x.items()}
    y_scale = target_scale(y, label) if task == "regression" else (0.0, 1.0)
    return Data(x, y, keep, task, classes, layers, y_scale)


def _raw_data(root: zarr.Group, path: str, setup: Setup, keep: dict, y: dict, task: str, classes: list[str],
              label: str) -> Data:
    """The raw factors of the layer set's modules, unstandardised, left in the store until ``_train_runs`` places
    them (pipeline/rawdata.py: resident or streamed)."""
    rawdata.check(root, path, SPLITS)
    modules = root.attrs["modules"]
    index = select([m["name"] for m in modules], setup.layer_set)
    if len(index) == 0:
        raise PipelineError(f"layer set {setup.layer_set!r} matches none of the {len(modules)} modules")
    chosen = [modules[i] for i in index]
    x = {s: rawdata.RawSource(root, chosen, s, keep[s]) for s in SPLITS}
    y_scale = target_scale(y, label) if task == "regression" else (0.0, 1.0)
    return Data(x, y, keep, task, classes, {models.RAW: [m["name"] for m in chosen]}, y_scale)


def target_scale(y: dict[str, np.ndarray], label: str) -> tuple[float, float]:
    """(mean, std) that standardise the regression targets (train statistics), or a one-line refusal of
    targets that cannot be trained on: constant in train, or beyond float32 once standardised (training
    and metrics use float32 tensors; a label near 1e308 would overflow into NaN metrics)."""
    train = y["train"]
    if np.all(train == train[0]):
        raise PipelineError(f"label {label!r} is constant ({train[0]:g}) in the train split: nothing to regress; "
                            "choose another --label")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mean, std = (float(v[0]) for v in standard_scaler(train[:, None]))
        fits = math.isfinite(mean) and math.isfinite(std) and all(
            np.isfinite(v.astype(np.float32)).all() and np.isfinite((v.astype(np.float32) - np.float32(mean)) / np.float32(std)).all()
            for v in y.values())
    if not fits:
        largest = max(float(np.abs(v).max()) for v in y.values() if len(v))
        raise PipelineError(f"label {label!r} has values too large to train on (|value| up to {largest:.3g}; they overflow "
                            "float32 once standardised); rescale the label (e.g. its logarithm) and rematerialize")
    return mean, std


def standard_scaler(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sklearn StandardScaler's mean and scale: population std in float64, 1 for (near-)constant features."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    mean = x.mean(0)
    var = x.var(0)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2  # sklearn's _is_constant_feature
    scale = np.sqrt(var)
    scale[constant | (scale < 10 * eps)] = 1.0
    return mean, scale


# --- run bookkeeping: what a configuration is, which of its runs are done -------------------------------


def config_dict(root: zarr.Group, config: TrainConfig, setup: Setup, data: Data) -> dict:
    """What determines a configuration's results. Not in it: the run count, device, store path, force, quiet."""
    layer_names = [f"{name}:{layer}" for name in setup.reps for layer in data.layers[name]]
    return {
        "train_version": TRAIN_VERSION,
        "source_fingerprint": root.attrs["source"]["fingerprint"],
        "reps": [{"name": n} if n == models.RAW else {"name": n, "spec_hash": representations.get(n).spec_hash()}
                 for n in setup.reps],
        "layer_set": setup.layer_set,
        "layers_hash": provenance.digest("\n".join(layer_names).encode(), length=16),
        "label": config.label,
        "task": data.task,
        "model": config.model,
        "model_version": models.get(config.model).version,
        "seed": config.seed,
        **asdict(config.hyper()),
    }


def config_hash(config: dict) -> str:
    """sha256 of the sorted-key JSON of the configuration, first 16 hex digits."""
    return provenance.content_hash(config, length=16)


def with_whole_batches(root: zarr.Group, digest: str, todo: list[int]) -> list[int]:
    """``todo`` plus the finished runs that were trained in one ensemble with any of them.

    A run's bytes depend (in the last bit) on which runs it was trained beside, so runs are redone by
    whole batches: a crash between two runs' marks is repaired to exactly what a clean run writes.
    """
    wanted = set(todo)
    with store.damaged_metadata_is_one_line(store.location_of(root.store), store.run_path(digest)):
        group = store.member(root, store.run_path(digest))
        for run in store.runs_of(group).values() if group is not None and todo else ():
            batch = run.attrs.get("batch")
            if batch and wanted & set(batch):
                wanted |= set(batch)
    return sorted(wanted)


def finished_runs(root: zarr.Group, digest: str) -> set[int]:
    with store.damaged_metadata_is_one_line(store.location_of(root.store), store.run_path(digest)):
        group = store.member(root, store.run_path(digest))
        return set() if group is None else set(store.runs_of(group, complete=True))


# --- metrics and the runs written -----------------------------------------------------------------------


def _final_metrics(fitted: Fitted, data: Data, tensors: dict, n_out: int) -> tuple[dict, dict, torch.Tensor]:
    """Metrics of the best weights on every split, of the last weights on test; test outputs (R, n)."""
    out = {}
    result = {}
    for split in SPLITS:
        out[split] = fitted.predict(tensors[split][0], "best")
        result[split] = _metrics(out[split], tensors[split][1], data, n_out)
    last = {"test": result["test"] if fitted.one_model else
            _metrics(fitted.predict(tensors["test"][0], "last"), tensors["test"][1], data, n_out)}
    return result, last, out["test"]


def _metrics(out: torch.Tensor, y: torch.Tensor, data: Data, n_out: int) -> dict:
    if data.task == "classification":
        return metrics.classification(y, out.argmax(-1), n_out)
    mean, std = data.y_scale  # y is in original units; the outputs are standardised
    return metrics.regression(y, out[..., 0] * std + mean)


def _per_run(values: dict, r: int) -> dict:
    return {k: float(v[r]) for k, v in values.items() if k != "confusion"}


def _write_array(group: zarr.Group, name: str, values: np.ndarray, dims: tuple[str, ...], attrs: dict | None = None) -> None:
    values = np.asarray(values)
    array = group.create_array(name, shape=values.shape, chunks=values.shape or (1,), dtype=values.dtype,
                               dimension_names=dims, compressors=store.small_compressors(), attributes=attrs or {},
                               overwrite=True, config=store.WRITE_EVERY_CHUNK)
    array[...] = values


def configuration_attrs(config: dict, digest: str, setup: Setup, data: Data) -> dict:
    """The attrs of ``runs/<digest>``: what the configuration is (``config``, hashed) and what it was trained on."""
    return {
        "config": config, "config_hash": digest, "name": setup.name, "reps": list(setup.reps), "layer_set": setup.layer_set,
        "label": config["label"], "task": data.task, "model": config["model"], "classes": data.classes,
        "feature_width": data.width, "layers": data.layers, "n": {s: int(len(data.index[s])) for s in SPLITS},
    }


def write_runs(root: zarr.Group, digest: str, config: dict, setup: Setup, data: Data, ens: Fitted, runs: list[int],
               seeds: list[int], final: dict, last: dict, test_out: torch.Tensor) -> None:
    """Each run's curves, metrics and test predictions under runs/<digest>/run-NNN; its complete mark last."""
    group = root.require_group(store.run_path(digest))
    configuration = configuration_attrs(config, digest, setup, data)
    store.update_attrs(group, configuration)
    score_name = "accuracy" if data.task == "classification" else "r2"
    if data.task == "classification":
        predictions = test_out.argmax(-1).cpu().numpy().astype(np.int64)
        truth = data.y["test"]
    else:
        mean, std = data.y_scale
        predictions = (test_out[..., 0] * std + mean).cpu().numpy()
        truth = data.y["test"]
    for r, (run, seed) in enumerate(zip(runs, seeds)):
        key = store.run_path(digest, run)
        store.mark_incomplete(root, key)
        g = root.require_group(key)
        epochs = len(ens.curves["lr"][r])
        _write_array(g, "epoch", np.arange(1, epochs + 1, dtype=np.int64), ("epoch",))
        for name, values in ens.curves.items():
            _write_array(g, name, values[r], ("epoch",), {"score": score_name} if "score" in name else None)
        _write_array(g, "test_index", data.index["test"], ("test_model",), {"description": "position in labels/test"})
        _write_array(g, "test_true", truth, ("test_model",))
        _write_array(g, "test_pred", predictions[r], ("test_model",))
        if data.task == "classification":
            _write_array(g, "test_confusion", final["test"]["confusion"][r].cpu().numpy(), ("true_class", "pred_class"),
                         {"classes": data.classes})
    # The marks last and back to back: a kill between two marks of one batch redoes the batch, so keep that window short.
    for r, (run, seed) in enumerate(zip(runs, seeds)):
        key, epochs = store.run_path(digest, run), len(ens.curves["lr"][r])
        store.mark_complete(root, key, run=run, seed=seed, score=score_name, best_epoch=int(ens.best_epoch[r]),
                            epochs=epochs, metrics={s: _per_run(final[s], r) for s in SPLITS},
                            last_epoch_metrics={"test": _per_run(last["test"], r)}, device=ens.device,
                            seconds=ens.seconds / len(runs), ensemble_seconds=ens.seconds, ensemble_size=len(runs),
                            batch=[int(r) for r in runs], configuration=configuration)  # restores a lost group zarr.json

def check_finite(ens: Fitted, final: dict, last: dict, setup: Setup, label: str) -> None:
    """Refuse (before any run is written) an ensemble whose curves or metrics have NaN/Inf, or a run whose
    validation score was never finite (best epoch 0: its "best" weights are the initial ones)."""
    values = [np.concatenate(curve) for curve in ens.curves.values()]
    values += [v.detach().cpu().numpy().ravel() for m in (*final.values(), *last.values()) for k, v in m.items() if k != "confusion"]
    bad = [name for name, ok in (("curves or metrics", all(np.isfinite(v).all() for v in values)),
                                 ("no finite validation score", bool((ens.best_epoch >= 1).all()))) if not ok]
    if bad:
        raise PipelineError(f"training {setup.name} on {label!r} produced NaN or Inf ({bad[0]}); no run was marked complete: "
                            "lower --lr, or check the label's values and the features")


# --- orchestration: one configuration, the grid, on dask ------------------------------------------------


@dataclass
class ConfigResult:
    setup: Setup
    config_hash: str
    trained: list[int]
    skipped: list[int]
    seconds: float
    test_score: float  # mean over the configuration's finished runs
    score: str
    width: int


@dataclass
class TrainSummary:
    results: list[ConfigResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trained(self) -> int:
        return sum(len(r.trained) for r in self.results)

    @property
    def skipped(self) -> int:
        return sum(len(r.skipped) for r in self.results)

def _train_runs(root: zarr.Group, config: TrainConfig, setup: Setup, data: Data, conf: dict, digest: str, todo: list[int],
                device: str, on_epoch=None) -> float:
    """Train runs ``todo`` of one configuration as one ensemble and write them; returns training seconds.
    ``on_epoch(epoch, active, runs)`` after each epoch (pipeline/model.py's hook, with the ensemble's size)."""
    n_out = len(data.classes) if data.task == "classification" else 1
    dtype = torch.int64 if data.task == "classification" else torch.float32
    if setup.reps == (models.RAW,):  # resident on the device where they fit the budget, else streamed by block
        x = rawdata.place(data.x, device, config.raw_memory)
    else:
        x = {s: torch.from_numpy(data.x[s]).to(device) for s in SPLITS}
    y = {s: torch.as_tensor(data.y[s], dtype=dtype, device=device) for s in SPLITS}  # original units
    if data.task == "regression":  # the loss sees standardised targets
        y_fit = {s: (y[s] - data.y_scale[0]) / data.y_scale[1] for s in ("train", "val")}
    else:
        y_fit = y
    seeds = [config.seed + r for r in todo]
    hook = (lambda epoch, active: on_epoch(epoch, active, len(todo))) if on_epoch else None
    fit = models.get(config.model).fitter()
    ens = fit((x["train"], y_fit["train"]), (x["val"], y_fit["val"]), seeds, config.hyper(), data.task, n_out, hook)
    with torch.no_grad():
        final, last, test_out = _final_metrics(ens, data, {s: (x[s], y[s]) for s in SPLITS}, n_out)
    check_finite(ens, final, last, setup, config.label)
    write_runs(root, digest, conf, setup, data, ens, todo, seeds, final, last, test_out)
    return ens.seconds


def train_setup(root: zarr.Group, config: TrainConfig, setup: Setup, device: str, cache: dict, on_wait=None,
                on_epoch=None) -> ConfigResult:
    """Train the runs of one configuration that are not finished yet (all of them with --force).

    The configuration's lease is held while training: a teammate training the same configuration
    at the same time is waited for, and only the runs they did not finish are trained after them.
    """
    data = load_data(root, config.store, setup, config.label, cache, config.task)
    conf = config_dict(root, config, setup, data)
    digest = config_hash(conf)
    done = set() if config.force else finished_runs(root, digest)
    todo = [r for r in range(config.runs) if r not in done]
    seconds = 0.0
    if todo:
        lease = leases.take(root.store, f"train/{digest}", on_wait=(lambda h: on_wait(setup.name, h)) if on_wait else None)
        try:
            done = set() if config.force else finished_runs(root, digest)  # again: they may have trained some
            todo = with_whole_batches(root, digest, [r for r in range(config.runs) if r not in done])
            done -= set(todo)
            if todo:
                seconds = _train_runs(root, config, setup, data, conf, digest, todo, device, on_epoch)
        finally:
            lease.release()
    score = "accuracy" if data.task == "classification" else "r2"
    values = [root[store.run_path(digest, r)].attrs["metrics"]["test"][score] for r in range(config.runs)]
    return ConfigResult(setup, digest, todo, sorted(done & set(range(config.runs))), seconds, float(np.mean(values)), score,
                        data.width)


def train(config: TrainConfig, on_result=None, on_wait=None, progress=None) -> TrainSummary:
    """Run stage 3 over the grid; ``on_result(ConfigResult)`` is called after each configuration and
    ``on_wait(what, holder)`` when something someone else is computing is waited for. ``progress``: a
    pipeline/progress.py factory, one step per configuration, the runs and epoch of the current one noted
    (in this process; on dask, configurations only)."""
    started = time.perf_counter()
    # On dask each task resolves the device on its worker (train_task); without a scheduler the workers, or this
    # process, see this machine's GPUs: a cuda it lacks is refused now, before any work.
    remote = cluster.scheduler_address(config.scheduler)
    device = None if remote else cluster.resolve_device(config.device)
    in_process = not remote and cluster.local_placement(config.workers, config.device).kind == "in-process"
    config = replace(config, store=store.writable_target(config.store, config.output), output=None)
    root = store.open_root(config.store, mode="r")
    check_splits(root, config.store)
    config = replace(config, label=resolve_label(root, config.store, config.label))  # resolved once: it is hashed
    setups = plan_grid(root, config)
    for setup in setups:  # fail on bad input before training anything
        for name in setup.reps:
            if name == models.RAW:
                rawdata.check(root, config.store, SPLITS)
                continue
            check_fresh(root, config.store, name,
                        on_wait=(lambda split, h, name=name: on_wait(f"features {name} on {split}", h)) if on_wait else None)
    _, targets, task, _ = load_labels(root, config.store, config.label, config.task)
    check_task(config.model, task, config.label)
    if task == "regression":
        target_scale(targets, config.label)
    summary = TrainSummary()
    bar = _Bar(progress, len(setups), config)
    try:
        if not in_process:
            summary.results = _train_on_cluster(config, setups, bar.wrap(on_result))
        else:
            root = store.open_root(config.store, mode="r+")
            cache: dict = {}
            for setup in setups:
                for key in [k for k in cache if k[1] not in setup.reps]:  # keep only the current reps' arrays in memory
                    del cache[key]
                bar.start(setup)
                result = train_setup(root, config, setup, device, cache, on_wait, bar.epoch)
                summary.results.append(result)
                bar.done(result)
                if on_result:
                    on_result(result)
    except OSError as exc:  # finished runs are marked one by one: a rerun trains only what is missing
        full = disk_full(exc, config.store)
        if full is None:
            raise
        raise full from None
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


class _Bar:
    """train's progress: configurations done of the total (tqdm's rate and ETA), runs done of the grid's, and the
    current configuration's epoch; epoch notes at most every 0.2 s (one step is far shorter than a redraw).

    The bar appears with the first epoch or finished configuration, so that bad input found while loading the
    first configuration's data stays the one line of its error."""

    def __init__(self, progress, configurations: int, config: TrainConfig):
        self.progress, self.configurations, self.bar = progress, configurations, None
        self.total, self.runs_done, self.epochs = configurations * config.runs, 0, config.given().epochs
        self.setup, self.shown = None, 0.0

    def _shown(self):
        if self.bar is None and self.progress is not None:
            self.bar = self.progress(total_layers=self.configurations, total_bytes=0)
        return self.bar

    def start(self, setup: Setup) -> None:
        self.setup = setup
        if self.bar:
            self.bar.note(f"{setup.name} · runs {self.runs_done}/{self.total}")

    def epoch(self, epoch: int, active: int, runs: int) -> None:
        now = time.monotonic()
        if (now - self.shown > 0.2 or active == 0) and self._shown():
            self.shown = now
            self.bar.note(f"{self.setup.name} · runs {self.runs_done}/{self.total}, {active} of {runs} training · "
                          f"epoch {epoch}/{self.epochs}")

    def done(self, result: ConfigResult) -> None:
        self.runs_done += len(result.trained) + len(result.skipped)
        if self._shown():
            self.bar.note(f"runs {self.runs_done}/{self.total}")
            self.bar.update(1, 0)

    def wrap(self, on_result):
        def each(result):
            self.done(result)
            if on_result:
                on_result(result)
        return each

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def train_task(config: TrainConfig, setup: Setup) -> ConfigResult:
    """One configuration on a dask worker: its device is the worker's (one worker per GPU), resolved there."""
    device = cluster.task_device(config.device)
    root = store.open_root(config.store, mode="r+")
    return train_setup(root, config, setup, device, {})


def _train_on_cluster(config: TrainConfig, setups: list[Setup], on_result) -> list[ConfigResult]:
    from dask.distributed import as_completed

    with cluster.Session(config.scheduler, config.workers, config.dashboard, config.device) as session:
        client = session.client()
        futures = {client.submit(train_task, config, setup, pure=False): i for i, setup in enumerate(setups)}
        results: list = [None] * len(setups)
        for future in as_completed(futures):
            results[futures[future]] = result = _task_result(future, setups[futures[future]])
            if on_result:
                on_result(result)
        return results


def _task_result(future, setup: Setup) -> ConfigResult:
    """A configuration's result from its dask task; a failure other than a PipelineError (or a full disk,
    handled by ``train``) as one line naming the configuration."""
    try:
        return future.result()
    except (PipelineError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - named, in one line, never a traceback
        detail = " ".join(str(exc).split()) or "no message"
        raise PipelineError(f"training task {setup.name} failed: {type(exc).__name__}: {detail}; finished runs are kept: "
                            "rerun the same command to resume (report it if it fails again)") from None
