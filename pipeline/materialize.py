"""Stage 1: a LoRA dataset -> one chunked Zarr store, each weight column of each split read once.

``plan`` inspects the source (names, shapes, labels, splits) from metadata and list offsets only,
and refuses bad input before anything is written. ``materialize`` allocates the arrays, then
copies one module of one split at a time (Arrow -> numpy -> zarr, in batches bounded by a memory
budget) and marks it complete last, so a rerun skips finished modules and redoes the rest.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import arrowio, fileread, leases, provenance, store
from .errors import PipelineError, disk_full, not_storable
from .layers import Module, pair_modules, safe_key, select_modules
from .sources import Source, open_source
from .splits import SplitPlan, check_split_options, datasets_sizes, plan_splits, shares_of_all, split_warnings

GiB = 2**30
ID_COLUMNS = ("model_id", "id", "file", "filename", "name")


def _positive(value) -> bool:
    """A finite number above 0 (nan and inf fail: they would make chunk and batch sizes meaningless)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and 0 < value < float("inf")


@dataclass(frozen=True)
class MaterializeConfig:
    """Everything ``pipeline materialize`` takes; saved in the store."""

    store: str = store.DEFAULT_STORE
    source: str | None = None  # None: the built-in synthetic dataset
    labels_csv: str | None = None  # labels file (CSV, JSON or JSONL) of a folder of adapters
    split_column: str | None = None  # its column that gives each adapter's split
    layers: str | None = None  # regex over module and column names (``--modules``)
    labels: tuple[str, ...] = ()  # label columns that must exist (all scalar columns are kept)
    test_size: float = 0.3  # share of all rows held out of train (val + test): datasets' train_test_split(test_size)
    val_test_size: float = 0.67  # share of the held-out rows that go to test, the rest to val (``--val-size/--test-size``)
    split_seed: int = 42
    memory: int = GiB  # budget for weights held at once
    chunk_mb: float = 4.0
    codec: str = "none"  # raw weights: none | lz4 | zstd (crc32c always)
    allow_nonfinite: bool = False
    min_split: int | None = None  # refuse (not just warn about) a split of fewer adapters, or a class missing from a split
    verify_source: bool = False  # fingerprint a folder of adapter files by content (sha256), not name, size and mtime
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self):
        # The one place options are checked, so the Python API refuses what the CLI refuses.
        check_split_options(self.test_size, self.val_test_size, self.split_seed)
        if not _positive(self.chunk_mb):
            raise PipelineError(f"--chunk-mb {self.chunk_mb!r} is not a size in MB above 0 (e.g. 4)")
        if not _positive(self.memory):
            raise PipelineError(f"--memory {self.memory!r} is not a budget above 0 bytes (e.g. 1GiB)")
        if self.min_split is not None and (isinstance(self.min_split, bool) or not isinstance(self.min_split, (int, np.integer))
                                           or self.min_split < 1):
            raise PipelineError(f"--min-split {self.min_split!r} is not a whole number of adapters >= 1 (e.g. 10)")


@dataclass(frozen=True)
class ModulePlan:
    module: Module
    down: arrowio.MatrixColumn
    up: arrowio.MatrixColumn
    ranks: dict[str, np.ndarray]  # source split -> true rank per row
    dtype: str  # stored dtype
    alpha: float | None  # the module's alpha when every adapter has the same one
    rank_varies: bool
    alphas: dict[str, np.ndarray] | None = None  # source split -> alpha per row, for a folder of adapter files

    @property
    def rank(self) -> int:
        return self.down.rows

    def row_bytes(self) -> int:
        return (self.down.rows * self.down.cols + self.up.rows * self.up.cols) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Plan:
    source: Source
    modules: list[ModulePlan]
    splits: list[SplitPlan]
    labels: dict[str, dict]  # name -> {"kind", "classes"?}
    id_column: str | None
    ignored: list[str]
    chunk_models: int
    layout: dict = field(default_factory=dict)  # what must match for a store to be resumed
    notes: tuple[str, ...] = ()  # warnings, said before anything is written


# --- planning: everything checked before anything is written ----------------------------------------


def _scalar_kind(arrow_type: pa.DataType) -> str | None:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_dictionary(arrow_type):
        return "categorical"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type):
        return "float"
    return None


def _label_kind(source: Source, name: str) -> str | None:
    """The kind of a label column in every split: integers in one split and floats in another are floats."""
    kinds = {split: _scalar_kind(ds.data.schema.field(name).type) for split, ds in source.splits.items()}
    found = set(kinds.values())
    if len(found) == 1:
        return found.pop()
    if found == {"integer", "float"}:
        return "float"
    first_split, first_kind = next(iter(kinds.items()))
    other_split, other_kind = next((split, kind) for split, kind in kinds.items() if kind != first_kind)
    raise PipelineError(f"column {name!r} holds {first_kind or 'non-scalar'} values in source split {first_split!r} but "
                        f"{other_kind or 'non-scalar'} values in {other_split!r}; give it one type in every split")


def _label_plan(source: Source, columns: list[str], id_column: str | None = None) -> dict[str, dict]:
    labels = {}
    for name in columns:  # each is stored under its own key (store.label_keys), apart from the bookkeeping in index/
        kind = _label_kind(source, name)
        if kind is None:
            continue
        if kind in ("integer", "bool"):  # no missing code for these: refuse now, before anything is written
            for split, ds in source.splits.items():
                missing = ds.data.column(name).null_count
                if missing:
                    raise PipelineError(f"label {name!r} has {missing} missing value(s) in source split {split!r}; "
                                        "fill them or drop the column")
        info = {"kind": kind, "column": name}
        if kind == "categorical":
            values = set()
            for ds in source.splits.values():
                values.update(v for v in pc.unique(ds.data.column(name)).to_pylist() if v is not None)
            info["classes"] = sorted(str(v) for v in values)  # sorted: codes equal sklearn's LabelEncoder
        labels[name] = info
    return labels


def _unique_in_each_split(source: Source, column: str) -> bool:
    """An id names one adapter: a column that repeats a value (LoRA-WiSE's ``name``, the concept) is a label instead."""
    return all(len(pc.unique(ds.data.column(column))) == ds.num_rows for ds in source.splits.values())


def plan(source: Source, config: MaterializeConfig) -> Plan:
    """Inspect ``source`` and refuse bad input; reads metadata and list offsets, never weight values."""
    first = next(iter(source.splits.values()))
    schema = first.data.schema
    columns = list(schema.names)
    for name, ds in source.splits.items():
        if list(ds.data.schema.names) != columns:
            raise PipelineError(f"source split {name!r} has different columns than the others; every split needs the same columns")
    if source.files is not None:  # a folder of adapter files: the weights are in the files, the labels in the tables
        all_modules = list(source.files.modules)
        alpha_columns = sorted(m.alpha for m in all_modules if m.alpha)
    else:
        all_modules, alpha_columns = pair_modules(columns)
    modules = all_modules
    if not modules:
        raise PipelineError(
            f"source {source.uri} has no LoRA weight columns (expected names like '...lora.down.weight', "
            "'...lora_A.weight', 'lora_unet_..._lora_down.weight' or 'unet:0:down')"
        )
    modules = select_modules(modules, config.layers)
    lora_columns = {c for m in modules for c in (m.down, m.up)}
    all_lora = {c for m in all_modules for c in (m.down, m.up)}
    id_column = next((c for c in ID_COLUMNS if c in columns and _scalar_kind(schema.field(c).type) == "categorical"
                      and _unique_in_each_split(source, c)), None)
    label_candidates = [c for c in columns if c not in all_lora and c not in alpha_columns and c != id_column]
    labels = _label_plan(source, label_candidates, id_column)
    for wanted in config.labels:
        if wanted not in labels:
            scalar = ", ".join(labels) or "none"
            raise PipelineError(f"label column {wanted!r} is not in the source; scalar columns there: {scalar}")
    ignored = sorted(c for c in columns if c not in all_lora and c not in labels and c not in alpha_columns and c != id_column)
    if source.files is not None:  # tensors that are not LoRA factors (token embeddings), as a table's non-scalar columns are
        ignored = sorted(ignored + [t for t in source.files.names if t not in all_lora and t not in alpha_columns])

    sizes = {name: ds.num_rows for name, ds in source.splits.items()}
    splits = [SplitPlan(safe_key(s.name), s.source_split, s.rows) for s in
              plan_splits(sizes, config.test_size, config.val_test_size, config.split_seed)]

    module_plans = [_file_module_plan(source, module) for module in modules] if source.files is not None else []
    for module in modules if source.files is None else []:
        for column in (module.down, module.up):
            for split, ds in source.splits.items():  # every split: arrowio reads offsets of whatever it is given
                arrow_type = ds.data.schema.field(column).type
                if not arrowio.is_matrix_column(arrow_type):
                    where = f" in source split {split!r}" if len(source.splits) > 1 else ""
                    raise PipelineError(f"column {column!r} is not a matrix (nested list of numbers){where} but {arrow_type}")
        if not config.allow_nonfinite:  # a null would be read as NaN: name it for what it is
            for name, ds in source.splits.items():
                for column in (module.down, module.up):
                    row = arrowio.null_row(ds.data.column(column))
                    if row is not None:
                        raise PipelineError(f"layer {column!r} has a missing (null) value in row {row} of source split {name!r}; "
                                            "fill it, or rerun with --allow-nonfinite to store it as NaN")
        ranks = {name: arrowio.row_ranks(ds.data.column(module.down), module.down) for name, ds in source.splits.items()}
        downs = [arrowio.describe(ds.data.column(module.down), module.down, 0, ranks[n]) for n, ds in source.splits.items()]
        ups = [arrowio.describe(ds.data.column(module.up), module.up, 1, ranks[n]) for n, ds in source.splits.items()]
        for (name, ds), d, u in zip(source.splits.items(), downs, ups):
            arrowio.check_shapes(ds.data.column(module.down), d, ranks[name])
            arrowio.check_shapes(ds.data.column(module.up), u, ranks[name])
        down = max(downs, key=lambda d: d.rows)
        up = max(ups, key=lambda u: u.cols)
        if len({d.cols for d in downs}) > 1 or len({u.rows for u in ups}) > 1:
            raise PipelineError(f"module {module.name!r} has different shapes in different splits")
        if down.rows != up.cols:
            raise PipelineError(f"module {module.name!r}: down has rank {down.rows} but up has rank {up.cols}")
        half = all(c.dtype == np.float16 for c in downs + ups)  # one float32 split anywhere would be cut to float16
        alpha = None
        if module.alpha:
            values = np.unique(np.concatenate([ds.data.column(module.alpha).to_numpy(zero_copy_only=False) for ds in source.splits.values()]))
            alpha = float(values[0]) if len(values) == 1 else None
        rank_varies = bool(any((r != down.rows).any() for r in ranks.values()))
        module_plans.append(ModulePlan(module, down, up, ranks, "float16" if half else "float32", alpha, rank_varies))

    widest = max(m.row_bytes() for m in module_plans)
    chunk_models = max(1, int(config.chunk_mb * 2**20 // widest))
    layout = {
        "modules": [m.module.name for m in module_plans],
        "splits": {s.name: [s.source_split, len(s.rows)] for s in splits},
        "split_seed": config.split_seed, "test_size": config.test_size, "val_test_size": config.val_test_size,
        "chunk_models": chunk_models, "codec": config.codec,
    }
    notes = tuple(source.notes) + tuple(split_warnings(splits, _classes_in(source, splits, labels), config.min_split))
    return Plan(source, module_plans, splits, labels, id_column, ignored, chunk_models, layout, notes)


def _classes_in(source: Source, splits: list[SplitPlan], labels: dict[str, dict]) -> dict[str, dict[str, set]]:
    """label -> split -> classes present, for the class-like labels (at most half as many classes as adapters)."""
    n = sum(ds.num_rows for ds in source.splits.values())
    out = {}
    for name, info in labels.items():
        if info["kind"] not in ("categorical", "bool") or (info["kind"] == "categorical" and len(info["classes"]) * 2 > n):
            continue
        out[name] = {}
        for split in splits:
            values = source.splits[split.source_split].data.column(name).take(pa.array(split.rows)).to_pylist()
            out[name][split.name] = {str(v) for v in values if v is not None}
    return out


def _file_module_plan(source: Source, module: Module) -> ModulePlan:
    """A module of a folder of adapter files, from what the headers said (fileread.scan checked the shapes)."""
    files = source.files
    ranks = {split: f.ranks[module.name] for split, f in files.splits.items()}
    rank = int(max(r.max() for r in ranks.values()))
    down = arrowio.MatrixColumn(module.down, rank, files.shapes[module.down][1], 0, np.dtype(files.numpy_dtype(module.down)))
    up = arrowio.MatrixColumn(module.up, files.shapes[module.up][0], rank, 1, np.dtype(files.numpy_dtype(module.up)))
    half = files.dtypes[module.down] == {"F16"} and files.dtypes[module.up] == {"F16"}
    alphas = {split: f.alphas[module.alpha] for split, f in files.splits.items()} if module.alpha else None
    alpha = None
    if alphas:
        values = np.unique(np.concatenate(list(alphas.values())))
        alpha = float(values[0]) if len(values) == 1 else None
    rank_varies = bool(any((r != rank).any() for r in ranks.values()))
    return ModulePlan(module, down, up, ranks, "float16" if half else "float32", alpha, rank_varies, alphas)


# --- the store's description --------------------------------------------------------------------------


def recorded_config(config: MaterializeConfig) -> dict:
    """The options a store records, to be resumed by ``materialize --store S`` alone (local paths made absolute)."""
    recorded = {k: v for k, v in asdict(config).items() if k not in ("store", "overwrite", "quiet")}
    for name in ("source", "labels_csv"):
        value = recorded[name]
        if value and "://" not in value and not value.startswith("zoo:") and Path(value).expanduser().exists():
            recorded[name] = str(Path(value).expanduser().resolve())
    return recorded


def resume_config(location: str, given: dict) -> MaterializeConfig:
    """The config of ``materialize --store S [given options]``.

    On an existing store of ours (not --overwrite) it starts from the options the store was made
    with, or from those of the replacement an interrupted ``--overwrite`` recorded, so that
    ``materialize --store S`` alone resumes or repairs it exactly; ``given`` (the options on the
    command line, by parameter name) override them. Otherwise the defaults (``source`` None: the
    built-in dataset).

    The split is given as ``val_size``/``test_size``, shares of all rows (``--val-size``, ``--test-size``),
    and stored as the datasets library's two sizes (``test_size`` held out, ``val_test_size`` of that to
    test). With ``val_test_size`` given (the old spelling, ``--val-test-size``) ``test_size`` is the
    held-out share, as it was before ``--val-size`` existed, so old commands keep their meaning.
    """
    given = dict(given)
    shares = {}
    if "val_test_size" in given:
        if "val_size" in given:
            raise PipelineError("--val-size does not mix with --val-test-size (the old spelling, in which --test-size is the "
                                "held-out share); give --val-size and --test-size, shares of all rows")
    elif "test_size" in given and "val_size" not in given:  # it had another meaning before --val-size: never guess which
        val, test = shares_of_all(MaterializeConfig.test_size, MaterializeConfig.val_test_size)
        raise PipelineError(f"--test-size {given['test_size']} alone is ambiguous: it is the share of all rows that go to "
                            "test, but before --val-size existed it was the share held out of train (val + test); give "
                            f"--val-size too (the default split is --val-size {val} --test-size {test})")
    else:
        shares = {name: given.pop(name) for name in ("val_size", "test_size") if name in given}
    base: dict = {}
    if not given.get("overwrite") and store.check_usable(location) != "absent":
        attrs = store._root_attrs(location) or store.root_copy(location) or {}
        base = (attrs.get("replacing") or {}).get("materialize_config") or attrs.get("materialize_config") or {}
        if "labels" in base:
            base = {**base, "labels": tuple(base["labels"])}
    known = {f.name for f in fields(MaterializeConfig)}
    config = MaterializeConfig(**{k: v for k, v in {**base, **given}.items() if k in known}, store=location)
    if shares:
        val_size, test_size = shares_of_all(config.test_size, config.val_test_size)
        held_out, to_test = datasets_sizes(shares.get("val_size", val_size), shares.get("test_size", test_size))
        config = replace(config, test_size=held_out, val_test_size=to_test)
    return config


def _root_attrs(p: Plan, config: MaterializeConfig) -> dict:
    keys = store.label_keys(p.labels)
    modules, layers = [], []
    for m in p.modules:
        modules.append({
            "key": m.module.key, "name": m.module.name, "scheme": m.module.scheme, "down": m.module.down, "up": m.module.up,
            "in": m.down.cols, "out": m.up.rows, "rank": m.rank, "rank_varies": m.rank_varies,
            "alpha_column": m.module.alpha, "alpha": m.alpha, "alpha_varies": bool(m.module.alpha) and m.alpha is None,
            "dtype": m.dtype,
        })
        if m.module.alpha and m.module.alpha in p.source.alpha_from:  # where a folder of adapter files said it
            modules[-1]["alpha_from"] = p.source.alpha_from[m.module.alpha]
        layers.append({"name": m.module.down, "module": m.module.key, "role": "A", "shape": [m.rank, m.down.cols]})
        layers.append({"name": m.module.up, "module": m.module.key, "role": "B", "shape": [m.up.rows, m.rank]})
    return {
        "source": {"uri": p.source.uri, "kind": p.source.kind, "fingerprint": p.source.fingerprint},
        "layout": p.layout,
        "modules": modules,
        "layers": sorted(layers, key=lambda layer: layer["name"]),
        "splits": {s.name: {"n": len(s.rows), "source_split": s.source_split} for s in p.splits},
        "labels": {name: {**info, "key": keys[name]} for name, info in p.labels.items()},
        "id_column": p.id_column,
        "ignored_columns": p.ignored,
        "chunk_models": p.chunk_models,
        "materialize_config": recorded_config(config),
        "created": provenance.stamp(),
    }


def _open_or_create(config: MaterializeConfig, p: Plan):
    """The store to fill: this one resumed, its lost root restored, or a new one (``--overwrite``: replaced crash-safely)."""
    state = store.check_usable(config.store)
    if state != "absent" and store.restore_root(config.store):
        state = "ours"  # the root zarr.json was lost or damaged, and came back from its copy in index/
    if state == "damaged" and not config.overwrite:
        raise PipelineError(store.damaged_message(config.store))
    if state == "ours":
        attrs = store._root_attrs(config.store)
        if attrs.get("replacing"):  # an interrupted --overwrite: finish it, with the options it recorded
            return _replace(config, p)
        store.check_schema(config.store, attrs.get("schema_version"))
        if not config.overwrite:
            store.check_attrs(config.store, attrs)  # damaged attrs: one line that says how to recreate them
        source_attrs = attrs.get("source") if isinstance(attrs.get("source"), dict) else {}
        same_source = source_attrs.get("fingerprint") == p.source.fingerprint
        same_layout = attrs.get("layout") == p.layout
        if same_source and same_layout:  # resume (with --overwrite too: nothing would change)
            root = store.open_root(config.store, mode="r+", validate=False)
            if not store.attrs_valid(config.store, attrs):  # --overwrite, same data: only the root document is damaged
                store.update_attrs(root, _root_attrs(p, config))
            return root
        if not config.overwrite:
            what = "a different source" if not same_source else "different layers, splits or chunking"
            raise PipelineError(
                f"store {config.store} was made from {what} ({attrs.get('source', {}).get('uri')}); "
                "rerun with --overwrite to replace it (its features and runs are deleted), or choose another --store"
            )
    if state != "absent":
        return _replace(config, p)
    return store.create_root(config.store, _root_attrs(p, config))


def _replace(config: MaterializeConfig, p: Plan):
    """--overwrite in three steps, each safe to be killed after: mark, clear, write the new root."""
    store.begin_replacing(config.store, recorded_config(config))
    store.clear(config.store)
    return store.create_root(config.store, _root_attrs(p, config))


# --- copying ---------------------------------------------------------------------------------------


def _batches(n: int, chunk: int, row_bytes: int, budget: int):
    """Row ranges aligned to chunks, each holding at most ``budget`` bytes (at least one chunk)."""
    per_batch = max(chunk, (budget // max(row_bytes, 1)) // chunk * chunk)
    for start in range(0, n, per_batch):
        yield start, min(n, start + per_batch)


def _check_finite(values: np.ndarray, column: str, source_rows: np.ndarray, source_row=None) -> None:
    """Refuse a non-finite value; ``source_row(i)`` (row i of the batch in the source's own dtype) tells
    a NaN or Inf of the source from a finite value too large for the stored dtype."""
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if finite.all():
        return
    i = int(np.flatnonzero(~finite)[0])
    raise not_storable(column, f"source row {int(source_rows[i])}", values.dtype,
                       source_row is not None and bool(np.isfinite(source_row(i)).all()))


def _as_in_source(column: pa.ChunkedArray, spec: arrowio.MatrixColumn, ranks: np.ndarray, rows: np.ndarray):
    """Row i of a batch in the source's own dtype; read only when a value is not finite, to say why."""
    dtype = arrowio.leaf_type(column.type).to_pandas_dtype()
    return lambda i: arrowio.gather(column, spec, ranks, rows[i:i + 1], dtype)


class _Writer:
    """Writes one batch in the background while the next is gathered: at most one in flight."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
        self._pending = None

    def write(self, array, start: int, stop: int, values: np.ndarray) -> None:
        self.submit(array.__setitem__, slice(start, stop), values)

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def _copy_module(root, split: SplitPlan, mp: ModulePlan, source: Source, config: MaterializeConfig, chunk: int, writer: _Writer) -> int:
    """Copy one module of one split into its preallocated arrays; returns bytes written."""
    path = f"raw/{split.name}/{mp.module.key}"
    n = len(split.rows)
    table = arrowio.mapped_table(source.splits[split.source_split])  # unmapped on return: RSS stays flat
    dims = {"A": ("model", "rank", "in"), "B": ("model", "out", "rank")}
    written = 0
    for role, column, spec in (("A", mp.module.down, mp.down), ("B", mp.module.up, mp.up)):
        shape = (n, spec.rows, spec.cols)
        array = store.require_array(root, f"{path}/{role}", shape, (chunk, spec.rows, spec.cols), mp.dtype, dims[role],
                                    store.raw_compressors(config.codec, np.dtype(mp.dtype).itemsize), {"column": column})
        row_bytes = spec.rows * spec.cols * np.dtype(mp.dtype).itemsize
        # A third of the budget per batch: one being gathered, one being written, and zarr's buffers.
        for start, stop in _batches(n, chunk, row_bytes, config.memory // 3):
            rows = split.rows[start:stop]
            ranks = mp.ranks[split.source_split]
            values = arrowio.gather(table.column(column), spec, ranks, rows, mp.dtype)
            if not config.allow_nonfinite:
                _check_finite(values, column, rows, _as_in_source(table.column(column), spec, ranks, rows))
            writer.write(array, start, stop, values)
            written += values.nbytes
    alpha = table.column(mp.module.alpha).to_numpy(zero_copy_only=False) if mp.module.alpha and mp.alpha is None else None
    _write_rank_alpha(root, split, mp, alpha)
    writer.wait()  # the completion mark must follow the data
    return written


def _write_rank_alpha(root, split: SplitPlan, mp: ModulePlan, alpha: np.ndarray | None) -> None:
    """The per-adapter rank (when it varies) and alpha (when it varies; ``alpha``: per source row) of one module."""
    path, n = f"raw/{split.name}/{mp.module.key}", len(split.rows)
    if mp.rank_varies:
        ranks = mp.ranks[split.source_split][split.rows].astype(np.int32)
        store.require_array(root, f"{path}/rank", (n,), (max(n, 1),), "int32", ("model",))[:] = ranks
    if alpha is not None:
        store.require_array(root, f"{path}/alpha", (n,), (max(n, 1),), "float32", ("model",))[:] = alpha[split.rows].astype(np.float32)


_PROGRESS = "files_progress"  # attribute of raw/<split>: rows of a folder of adapter files written for all of its modules


def _reusable(root, path: str, shape: tuple, chunks: tuple, dtype: str) -> bool:
    node = store.member(root, path)
    return node is not None and getattr(node, "shape", None) == shape and node.chunks == chunks and node.dtype == np.dtype(dtype)


def _copy_file_split(root, split: SplitPlan, mps: list[ModulePlan], source: Source, config: MaterializeConfig, chunk: int,
                     writer: _Writer, bar) -> int:
    """The unfinished modules ``mps`` of one split, from the adapter files: each file opened once per split, its
    matrices scattered into every module's arrays, in chunk-aligned batches of at most a third of ``--memory``.

    After each batch is written, ``raw/<split>`` records how many rows are done for which modules, so a killed run
    resumes at the next batch (when the same modules are unfinished and their arrays are still there)."""
    n = len(split.rows)
    dims = {"A": ("model", "rank", "in"), "B": ("model", "out", "rank")}
    arrays, reusable = {}, True
    for mp in mps:
        for role, column, spec in (("A", mp.module.down, mp.down), ("B", mp.module.up, mp.up)):
            path, shape = f"raw/{split.name}/{mp.module.key}/{role}", (n, spec.rows, spec.cols)
            reusable = reusable and _reusable(root, path, shape, (chunk, spec.rows, spec.cols), mp.dtype)
            arrays[mp.module.name, role] = store.require_array(
                root, path, shape, (chunk, spec.rows, spec.cols), mp.dtype, dims[role],
                store.raw_compressors(config.codec, np.dtype(mp.dtype).itemsize), {"column": column})
    group = root.require_group(f"raw/{split.name}")
    keys = sorted(mp.module.key for mp in mps)
    done = group.attrs.get(_PROGRESS) or {}
    first = int(done.get("rows", 0)) if reusable and set(keys) <= set(done.get("modules", ())) else 0
    if first == 0 and done:
        store.update_attrs(group, {_PROGRESS: None})
    row_bytes = sum(mp.row_bytes() for mp in mps)
    per_batch = max(chunk, (config.memory // 3 // max(row_bytes, 1)) // chunk * chunk)
    todo = [(mp.module, mp.rank, mp.down.cols, mp.up.rows, mp.dtype) for mp in mps]
    files = source.files.splits[split.source_split]

    def write(start: int, stop: int, batch: dict, modules: list[str]) -> None:
        for (name, role), array in arrays.items():
            array[start:stop] = batch[name][0 if role == "A" else 1]
        store.update_attrs(group, {_PROGRESS: {"rows": stop, "modules": modules}})  # after the data, as a mark is

    written = 0
    if bar and first:
        bar.update(layers=first, nbytes=0)
    for start in range(first, n, per_batch):
        stop = min(n, start + per_batch)
        batch = fileread.read_rows(source.files, files, split.rows[start:stop], todo, not config.allow_nonfinite)
        writer.submit(write, start, stop, batch, keys)
        nbytes = (stop - start) * row_bytes
        written += nbytes
        if bar:
            bar.update(layers=stop - start, nbytes=nbytes)
    writer.wait()
    for mp in mps:
        alpha = None
        if mp.module.alpha and mp.alpha is None:
            alpha = mp.alphas[split.source_split]
        _write_rank_alpha(root, split, mp, alpha)
    return written


def _write_labels(root, p: Plan, split: SplitPlan) -> None:
    """labels/<split>: one array per label column, under its own key; index/<split>: where each row came from."""
    table = p.source.splits[split.source_split].data
    n = len(split.rows)
    take = pa.array(split.rows)
    index = store.index_path(root, split.name)
    store.require_array(root, f"{index}/row", (n,), (max(n, 1),), "int64", ("model",),
                        attrs={"description": f"row index in source split {split.source_split!r}"})[:] = split.rows
    if p.id_column:
        ids = table.column(p.id_column).take(take).to_numpy(zero_copy_only=False).astype(str)
        root.create_array(f"{index}/model_id", shape=(n,), dtype=str, dimension_names=("model",), compressors=store.small_compressors(),
                          attributes={"column": p.id_column}, overwrite=True, config=store.WRITE_EVERY_CHUNK)[:] = ids
    store.mark_complete(root, index)
    keys = store.label_keys(p.labels)
    path = f"labels/{split.name}"
    root.require_group(path)
    for name, info in p.labels.items():
        values = table.column(name).take(take)
        if info["kind"] == "categorical":
            text = values.cast(pa.string()).to_numpy(zero_copy_only=False)
            known = np.array([v is not None for v in text])
            codes = np.full(n, -1, dtype=np.int32)
            codes[known] = np.searchsorted(np.asarray(info["classes"]), text[known].astype(str))
            data, attrs = codes, {"classes": info["classes"], "missing_code": -1}
        elif info["kind"] == "float":
            data, attrs = values.to_numpy(zero_copy_only=False).astype(np.float64), {}
        else:
            if values.null_count:
                raise PipelineError(f"label {name!r} has missing values in split {split.name!r}; fill them or drop the column")
            data, attrs = values.to_numpy(zero_copy_only=False).astype(np.int64), {}
        store.require_array(root, f"{path}/{keys[name]}", (n,), (max(n, 1),), data.dtype, ("model",),
                            attrs={"column": name, "kind": info["kind"], **attrs})[:] = data
    store.mark_complete(root, path)


def _copy_files(root, p: Plan, todo: list[tuple[SplitPlan, ModulePlan]], source: Source, config: MaterializeConfig, writer,
                bar) -> int:
    """A folder of adapter files, split by split: every unfinished module of a split in one pass over its files."""
    written = 0
    for split in p.splits:
        mps = [mp for s, mp in todo if s is split]
        if not mps:
            continue
        chunk = min(p.chunk_models, max(len(split.rows), 1))
        written += _copy_file_split(root, split, mps, source, config, chunk, writer, bar)
        # the progress goes before the marks: a stale one could later skip rows of a module that verify --repair reopened
        store.update_attrs(root[f"raw/{split.name}"], {_PROGRESS: None})
        for mp in mps:
            store.mark_complete(root, f"raw/{split.name}/{mp.module.key}", bytes=len(split.rows) * mp.row_bytes(),
                                allow_nonfinite=config.allow_nonfinite)
    return written


@dataclass
class Summary:
    store: str
    modules_written: int
    modules_skipped: int
    bytes_written: int
    seconds: float
    warnings: tuple[str, ...] = ()


def materialize(config: MaterializeConfig, source: Source | None = None, progress=None, on_wait=None, on_warning=None) -> Summary:
    """Run stage 1; see the module docstring. ``progress(bytes, layers)`` is called as layers finish.

    ``on_warning(line)`` is called with each warning (small or odd splits, a ``split`` label column), before anything
    is written; without it they are ``warnings.warn``-ed unless ``quiet``. ``Summary.warnings`` holds them too.

    One materialize at a time per store: a second one waits (``on_wait(holder)`` is called), then
    finds the layers done and skips them.
    """
    started = time.perf_counter()
    if source is None and config.source is None:
        from .synthetic import builtin_dataset

        config = replace(config, source=str(builtin_dataset()))
    source = source or open_source(config.source, config.labels_csv, quiet=config.quiet, split_column=config.split_column,
                                   verify_source=config.verify_source)
    p = plan(source, config)
    store.check_usable(config.store)  # refuse a foreign folder before writing a lease into it
    store.check_writable(config.store)
    lease = leases.take(store.zarr_store(config.store), "materialize", on_wait=on_wait)
    try:
        return _materialize(config, source, p, progress, started, on_warning)
    finally:
        lease.release()


def _materialize(config: MaterializeConfig, source: Source, p: Plan, progress, started: float, on_warning) -> Summary:
    root = _open_or_create(config, p)
    for note in p.notes:  # after every refusal, before the first byte of data
        if on_warning is not None:
            on_warning(note)
        elif not config.quiet:
            warnings.warn(note, UserWarning, stacklevel=3)
    todo = [(s, m) for s in p.splits for m in p.modules if not store.group_complete(root, f"raw/{s.name}/{m.module.key}")]
    skipped = len(p.splits) * len(p.modules) - len(todo)
    written = 0
    total_bytes = sum(len(s.rows) * m.row_bytes() for s, m in todo)
    if source.files is not None:  # files are read a batch of adapters at a time: the bar counts adapters
        total = sum(len(s.rows) for s in p.splits if any(t[0] is s for t in todo))
        bar = progress(total_layers=total, total_bytes=total_bytes, unit="adapter") if progress else None
    else:
        bar = progress(total_layers=2 * len(todo), total_bytes=total_bytes) if progress else None
    writer = _Writer()
    try:
        for split in p.splits:
            if not (store.group_complete(root, f"labels/{split.name}") and store.group_complete(root, store.index_path(root, split.name))):
                _write_labels(root, p, split)
        if source.files is not None:
            written = _copy_files(root, p, todo, source, config, writer, bar)
        for split, mp in todo if source.files is None else []:
            chunk = min(p.chunk_models, max(len(split.rows), 1))
            nbytes = _copy_module(root, split, mp, source, config, chunk, writer)
            store.mark_complete(root, f"raw/{split.name}/{mp.module.key}", bytes=nbytes,
                                allow_nonfinite=config.allow_nonfinite)
            written += nbytes
            if bar:
                bar.update(layers=2, nbytes=nbytes)
    except OSError as exc:
        full = disk_full(exc, config.store)
        if full is not None:
            raise full from None
        raise
    finally:
        writer.close()
        if bar:
            bar.close()
    return Summary(config.store, len(todo), skipped, written, time.perf_counter() - started, p.notes)
