"""Stage 1: a LoRA dataset -> one chunked Zarr store, each weight column of each split read once.

``plan`` inspects the source (names, shapes, labels, splits) from metadata and list offsets only,
and refuses bad input before anything is written. ``materialize`` allocates the arrays, then
copies one module of one split at a time (Arrow -> numpy -> zarr, in batches bounded by a memory
budget) and marks it complete last, so a rerun skips finished modules and redoes the rest.
"""

from __future__ import annotations

import errno
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import arrowio, leases, store
from .errors import PipelineError
from .layers import Module, pair_modules, safe_key, select_modules
from .sources import Source, open_source
from .splits import SplitPlan, plan_splits

GiB = 2**30
ID_COLUMNS = ("model_id", "id", "file", "filename", "name")


@dataclass(frozen=True)
class MaterializeConfig:
    """Everything ``pipeline materialize`` takes; saved in the store."""

    store: str = store.DEFAULT_STORE
    source: str | None = None  # None: the built-in synthetic dataset
    labels_csv: str | None = None
    layers: str | None = None  # regex over module and column names
    labels: tuple[str, ...] = ()  # label columns that must exist (all scalar columns are kept)
    test_size: float = 0.3
    val_test_size: float = 0.67
    split_seed: int = 42
    memory: int = GiB  # budget for weights held at once
    chunk_mb: float = 4.0
    codec: str = "none"  # raw weights: none | lz4 | zstd (crc32c always)
    allow_nonfinite: bool = False
    overwrite: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class ModulePlan:
    module: Module
    down: arrowio.MatrixColumn
    up: arrowio.MatrixColumn
    ranks: dict[str, np.ndarray]  # source split -> true rank per row
    dtype: str  # stored dtype
    alpha: float | None  # the module's alpha when every adapter has the same one
    rank_varies: bool

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


def _label_plan(source: Source, columns: list[str], schema: pa.Schema) -> dict[str, dict]:
    labels = {}
    for name in columns:
        kind = _scalar_kind(schema.field(name).type)
        if kind is None:
            continue
        info = {"kind": kind, "column": name}
        if kind == "categorical":
            values = set()
            for ds in source.splits.values():
                values.update(v for v in pc.unique(ds.data.column(name)).to_pylist() if v is not None)
            info["classes"] = sorted(str(v) for v in values)  # sorted: codes equal sklearn's LabelEncoder
        labels[name] = info
    return labels


def plan(source: Source, config: MaterializeConfig) -> Plan:
    """Inspect ``source`` and refuse bad input; reads metadata and list offsets, never weight values."""
    first = next(iter(source.splits.values()))
    schema = first.data.schema
    columns = list(schema.names)
    for name, ds in source.splits.items():
        if list(ds.data.schema.names) != columns:
            raise PipelineError(f"source split {name!r} has different columns than the others; every split needs the same columns")
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
    id_column = next((c for c in ID_COLUMNS if c in columns and _scalar_kind(schema.field(c).type) == "categorical"), None)
    label_candidates = [c for c in columns if c not in all_lora and c not in alpha_columns and c != id_column]
    labels = _label_plan(source, label_candidates, schema)
    for wanted in config.labels:
        if wanted not in labels:
            scalar = ", ".join(labels) or "none"
            raise PipelineError(f"label column {wanted!r} is not in the source; scalar columns there: {scalar}")
    ignored = sorted(c for c in columns if c not in all_lora and c not in labels and c not in alpha_columns and c != id_column)

    sizes = {name: ds.num_rows for name, ds in source.splits.items()}
    splits = [SplitPlan(safe_key(s.name), s.source_split, s.rows) for s in
              plan_splits(sizes, config.test_size, config.val_test_size, config.split_seed)]

    module_plans = []
    for module in modules:
        for column in (module.down, module.up):
            if not arrowio.is_matrix_column(schema.field(column).type):
                raise PipelineError(f"column {column!r} is not a matrix (nested list of numbers) but {schema.field(column).type}")
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
        half = down.dtype == np.float16 and up.dtype == np.float16
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
    return Plan(source, module_plans, splits, labels, id_column, ignored, chunk_models, layout)


# --- the store's description --------------------------------------------------------------------------


def _root_attrs(p: Plan, config: MaterializeConfig) -> dict:
    modules, layers = [], []
    for m in p.modules:
        modules.append({
            "key": m.module.key, "name": m.module.name, "scheme": m.module.scheme, "down": m.module.down, "up": m.module.up,
            "in": m.down.cols, "out": m.up.rows, "rank": m.rank, "rank_varies": m.rank_varies,
            "alpha_column": m.module.alpha, "alpha": m.alpha, "alpha_varies": bool(m.module.alpha) and m.alpha is None,
            "dtype": m.dtype,
        })
        layers.append({"name": m.module.down, "module": m.module.key, "role": "A", "shape": [m.rank, m.down.cols]})
        layers.append({"name": m.module.up, "module": m.module.key, "role": "B", "shape": [m.up.rows, m.rank]})
    return {
        "source": {"uri": p.source.uri, "kind": p.source.kind, "fingerprint": p.source.fingerprint},
        "layout": p.layout,
        "modules": modules,
        "layers": sorted(layers, key=lambda layer: layer["name"]),
        "splits": {s.name: {"n": len(s.rows), "source_split": s.source_split} for s in p.splits},
        "labels": p.labels,
        "id_column": p.id_column,
        "ignored_columns": p.ignored,
        "chunk_models": p.chunk_models,
        "materialize_config": {k: v for k, v in asdict(config).items() if k not in ("overwrite", "quiet")},
        "created": store.provenance(),
    }


def _open_or_create(config: MaterializeConfig, p: Plan):
    state = store.check_usable(config.store)
    if state == "ours":
        root = store.open_root(config.store, mode="r+", validate=not config.overwrite)  # --overwrite replaces damaged attrs
        attrs = root.attrs.asdict()
        same_source = attrs.get("source", {}).get("fingerprint") == p.source.fingerprint
        same_layout = attrs.get("layout") == p.layout
        if same_source and same_layout:
            if config.overwrite and not store.attrs_valid(config.store, attrs):
                store.update_attrs(root, _root_attrs(p, config))  # same source and layout: only the root document is damaged
            return root
        if not config.overwrite:
            what = "a different source" if not same_source else "different layers, splits or chunking"
            raise PipelineError(
                f"store {config.store} was made from {what} ({attrs.get('source', {}).get('uri')}); "
                "rerun with --overwrite to replace it, or choose another --store"
            )
        store.clear(config.store)
    return store.create_root(config.store, _root_attrs(p, config))


# --- copying ---------------------------------------------------------------------------------------


def _batches(n: int, chunk: int, row_bytes: int, budget: int):
    """Row ranges aligned to chunks, each holding at most ``budget`` bytes (at least one chunk)."""
    per_batch = max(chunk, (budget // max(row_bytes, 1)) // chunk * chunk)
    for start in range(0, n, per_batch):
        yield start, min(n, start + per_batch)


def _check_finite(values: np.ndarray, column: str, source_rows: np.ndarray) -> None:
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if not finite.all():
        row = int(source_rows[np.flatnonzero(~finite)[0]])
        raise PipelineError(
            f"layer {column!r} has NaN or Inf in source row {row}; fix the data or rerun with --allow-nonfinite "
            "(finished layers are kept)"
        )


class _Writer:
    """Writes one batch in the background while the next is gathered: at most one in flight."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
        self._pending = None

    def write(self, array, start: int, stop: int, values: np.ndarray) -> None:
        self.wait()
        self._pending = self._pool.submit(array.__setitem__, slice(start, stop), values)

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
            values = arrowio.gather(table.column(column), spec, mp.ranks[split.source_split], rows, mp.dtype)
            if not config.allow_nonfinite:
                _check_finite(values, column, rows)
            writer.write(array, start, stop, values)
            written += values.nbytes
    if mp.rank_varies:
        ranks = mp.ranks[split.source_split][split.rows].astype(np.int32)
        store.require_array(root, f"{path}/rank", (n,), (max(n, 1),), "int32", ("model",))[:] = ranks
    if mp.module.alpha and mp.alpha is None:
        alpha = table.column(mp.module.alpha).to_numpy(zero_copy_only=False)[split.rows].astype(np.float32)
        store.require_array(root, f"{path}/alpha", (n,), (max(n, 1),), "float32", ("model",))[:] = alpha
    writer.wait()  # the completion mark must follow the data
    return written


def _write_labels(root, p: Plan, split: SplitPlan) -> None:
    path = f"labels/{split.name}"
    table = p.source.splits[split.source_split].data
    n = len(split.rows)
    take = pa.array(split.rows)
    store.require_array(root, f"{path}/row", (n,), (max(n, 1),), "int64", ("model",),
                        attrs={"description": f"row index in source split {split.source_split!r}"})[:] = split.rows
    if p.id_column:
        ids = table.column(p.id_column).take(take).to_numpy(zero_copy_only=False).astype(str)
        root.create_array(f"{path}/model_id", shape=(n,), dtype=str, dimension_names=("model",), compressors=store.small_compressors(),
                          attributes={"column": p.id_column}, overwrite=True)[:] = ids
    for name, info in p.labels.items():
        values = table.column(name).take(take)
        key = safe_key(name)
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
        store.require_array(root, f"{path}/{key}", (n,), (max(n, 1),), data.dtype, ("model",),
                            attrs={"column": name, "kind": info["kind"], **attrs})[:] = data
    store.mark_complete(root, path)


@dataclass
class Summary:
    store: str
    modules_written: int
    modules_skipped: int
    bytes_written: int
    seconds: float


def materialize(config: MaterializeConfig, source: Source | None = None, progress=None, on_wait=None) -> Summary:
    """Run stage 1; see the module docstring. ``progress(bytes, layers)`` is called as layers finish.

    One materialize at a time per store: a second one waits (``on_wait(holder)`` is called), then
    finds the layers done and skips them.
    """
    started = time.perf_counter()
    source = source or open_source(config.source, config.labels_csv)
    p = plan(source, config)
    store.check_usable(config.store)  # refuse a foreign folder before writing a lease into it
    store.check_writable(config.store)
    lease = leases.take(store.zarr_store(config.store), "materialize", on_wait=on_wait)
    try:
        return _materialize(config, source, p, progress, started)
    finally:
        lease.release()


def _materialize(config: MaterializeConfig, source: Source, p: Plan, progress, started: float) -> Summary:
    root = _open_or_create(config, p)
    todo = [(s, m) for s in p.splits for m in p.modules if not store.group_complete(root, f"raw/{s.name}/{m.module.key}")]
    skipped = len(p.splits) * len(p.modules) - len(todo)
    written = 0
    bar = progress(total_layers=2 * len(todo), total_bytes=sum(len(s.rows) * m.row_bytes() for s, m in todo)) if progress else None
    writer = _Writer()
    try:
        for split in p.splits:
            if not store.group_complete(root, f"labels/{split.name}"):
                _write_labels(root, p, split)
        for split, mp in todo:
            chunk = min(p.chunk_models, max(len(split.rows), 1))
            nbytes = _copy_module(root, split, mp, source, config, chunk, writer)
            store.mark_complete(root, f"raw/{split.name}/{mp.module.key}", bytes=nbytes)
            written += nbytes
            if bar:
                bar.update(layers=2, nbytes=nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise PipelineError(
                f"no space left while writing {config.store} ({exc.strerror}); finished layers are kept: free space and rerun to resume"
            ) from None
        raise
    finally:
        writer.close()
        if bar:
            bar.close()
    return Summary(config.store, len(todo), skipped, written, time.perf_counter() - started)
