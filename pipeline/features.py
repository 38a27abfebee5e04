"""Stage 2: every requested representation of every layer, in one pass over the raw chunks.

A task is one model chunk of one split (aligned with the raw chunks): it reads each module's A and
B chunk once, moves them to the device once, computes every requested representation there, copies
all its results to the host in one transfer, and writes one region per representation. Outputs are
preallocated and a task owns its region, so a rerun rewrites the same bytes. Per-task progress flags make an interrupted run resume; a representation
whose spec hash and source fingerprint match and that is complete is skipped.

Why tasks span all modules of a chunk rather than one module: every zarr read or write costs
~1-3 ms of Python, so 128 small tasks per chunk would spend more time in overhead than in maths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import zarr
from zarr.errors import ContainsArrayError

from . import leases, provenance, representations, store
from . import cluster as cluster_mod
from .commands import quoted
from .errors import PipelineError, disk_full


@dataclass(frozen=True)
class FeaturesConfig:
    """Everything ``pipeline features`` takes."""

    store: str = store.DEFAULT_STORE
    reps: str = "all"
    splits: str = "all"
    device: str = "auto"
    workers: int | None = None  # a LocalCluster of this many worker processes
    scheduler: str | None = None  # address of an existing dask.distributed scheduler
    force: bool = False
    quiet: bool = False
    output: str | None = None  # write the features here (a personal store) when ``store`` is read-only
    dashboard: bool = False  # serve the local cluster's dask dashboard (on 127.0.0.1)

    def __post_init__(self):
        cluster_mod.check_workers(self.workers)
        cluster_mod.check_device(self.device)
        if self.splits.strip() != "all" and not [s for s in self.splits.split(",") if s.strip()]:
            raise PipelineError(f"--split {self.splits!r} names no split; use all, or a comma-separated list like train,val")


@dataclass(frozen=True)
class ModuleInfo:
    key: str
    index: int  # position in the module table (the module axis of module representations)
    layer_a: int  # position of A in the sorted layer table (the layer axis of tensor representations)
    layer_b: int
    rank: int
    rank_varies: bool
    alpha: float | None
    alpha_varies: bool


@dataclass(frozen=True)
class Task:
    """One model chunk of one split: the unit dask schedules. Plain data, picklable."""

    store: str  # where the features are written
    raw_store: str  # where the raw layers are read: the same store, or the shared one it builds on
    split: str
    chunk: int  # index of the model chunk
    start: int
    stop: int
    modules: tuple[ModuleInfo, ...]
    n_layers: int
    reps: tuple[str, ...]  # representations this task computes (those not done for this chunk)
    device: str  # as asked (auto, cpu or cuda): the worker that runs the task resolves it (cluster.task_device)
    # Materialize refuses NaN/Inf weights unless --allow-nonfinite: only then must a task look for them
    # (a pass over every raw value, which the stage otherwise never needs).
    raw_may_be_nonfinite: bool = True


# --- the maths, importable and tested without dask or zarr -------------------------------------------


def module_scale(rank: np.ndarray, alpha: np.ndarray | float | None) -> np.ndarray:
    """s = alpha / r per adapter when alpha is known, else 1."""
    if alpha is None:
        return np.ones(len(rank), dtype=np.float32)
    return (np.asarray(alpha, dtype=np.float32) / np.maximum(rank, 1)).astype(np.float32) * np.ones(len(rank), np.float32)


def compute_module(A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, reps) -> dict[str, torch.Tensor | tuple]:
    """Every representation of one module chunk: tensor ones as (features of A, features of B), module ones as one."""
    out = {}
    for rep in sorted(reps, key=lambda r: r.name == "ensemble"):  # ensemble last: it reuses its parts
        if rep.name == "ensemble" and all(p in out for p in representations.ENSEMBLE_PARTS):
            # ensemble is by definition the concatenation of its parts: don't compute them twice
            out[rep.name] = tuple(torch.cat([out[p][i] for p in representations.ENSEMBLE_PARTS], dim=1) for i in (0, 1))
        elif rep.kind == "tensor":
            out[rep.name] = (rep.fn(A, rep.params), rep.fn(B, rep.params))
        else:
            out[rep.name] = rep.fn(A, B, scale, rep.params)
    return out


def to_host(parts: list[torch.Tensor]) -> list[np.ndarray]:
    """(n, w_i) float32 results on one device -> the same as host arrays, in one device->host copy.

    Concatenated on the device, copied once, split into views on the host: a copy per result would be a
    synchronisation each (about 45 per module for --rep all).
    """
    if not parts:
        return []
    host = torch.cat(parts, dim=1).cpu().numpy()
    return np.split(host, np.cumsum([p.shape[1] for p in parts])[:-1], axis=1)


# --- one task: read once, compute, write its own region -----------------------------------------------


def read_raw(group: zarr.Group, role: str, start: int, stop: int) -> np.ndarray:
    """The one place raw chunks are read (tests count calls); an absent or damaged chunk is one line."""
    return store.read_array(group, role, start, stop)


def _check_raw_finite(task: Task, key: str, a: np.ndarray, b: np.ndarray) -> None:
    """Refuse raw weights with NaN/Inf (a store kept with --allow-nonfinite): no representation of them is meaningful."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise PipelineError(f"the raw weights of split {task.split!r} have NaN or Inf (module {key}, models {task.start}-"
                            f"{task.stop}): the store was materialized with --allow-nonfinite; fix or drop those adapters in "
                            "the source and rematerialize without it, or leave that split out with --split")


def run_task(task: Task) -> tuple[int, int, str]:
    """Compute ``task``; returns (bytes of raw read, number of modules, the device it computed on). Runs on a dask worker."""
    device = cluster_mod.task_device(task.device)
    root = zarr.open_group(store.zarr_store(task.store), mode="r+", zarr_format=3)
    raw = root if task.raw_store == task.store else zarr.open_group(store.zarr_store(task.raw_store, read_only=True), mode="r",
                                                                       zarr_format=3)
    reps = [representations.get(name) for name in task.reps]
    n = task.stop - task.start
    outputs = {rep.name: np.zeros((n, task.n_layers if rep.kind == "tensor" else len(task.modules), rep.width), np.float32)
               for rep in reps}
    nbytes = 0
    results: list[tuple[str, int, torch.Tensor]] = []  # (representation, its column of the layer/module axis, on the device)
    for module in task.modules:
        group = raw[f"raw/{task.split}/{module.key}"]
        a = read_raw(group, "A", task.start, task.stop)
        b = read_raw(group, "B", task.start, task.stop)
        # Each group's mark says whether it was written with --allow-nonfinite (a resume may add it); before marks
        # said so, the root's materialize options did.
        if group.attrs.get("allow_nonfinite", task.raw_may_be_nonfinite):
            _check_raw_finite(task, module.key, a, b)
        nbytes += a.nbytes + b.nbytes
        rank = store.read_array(group, "rank", task.start, task.stop) if module.rank_varies else np.full(n, module.rank)
        alpha = store.read_array(group, "alpha", task.start, task.stop) if module.alpha_varies else module.alpha
        A = torch.from_numpy(a).to(device, dtype=torch.float32)
        B = torch.from_numpy(b).to(device, dtype=torch.float32)
        scale = torch.from_numpy(module_scale(rank, alpha)).to(device)
        for name, value in compute_module(A, B, scale, reps).items():
            if isinstance(value, tuple):
                results += [(name, module.layer_a, value[0]), (name, module.layer_b, value[1])]
            else:
                results.append((name, module.index, value))
    for (name, column, _), values in zip(results, to_host([value for *_, value in results])):  # the one copy
        outputs[name][:, column] = values
    features = root[f"features/{task.split}"]
    for name, values in outputs.items():
        if not np.isfinite(values).all():
            raise PipelineError(f"representation {name!r} produced NaN or Inf on {task.split} models {task.start}-{task.stop}; "
                                "this is a bug in the representation: report it")
        store.writable(features[name])[task.start:task.stop] = values
    for name in outputs:  # the flags follow the data
        store.writable(features[f"_progress/{name}"])[task.chunk] = 1
    return nbytes, len(task.modules), device


# --- planning and allocation -------------------------------------------------------------------------


def _modules(attrs: dict) -> list[ModuleInfo]:
    layer_index = {layer["name"]: i for i, layer in enumerate(attrs["layers"])}
    return [ModuleInfo(m["key"], i, layer_index[m["down"]], layer_index[m["up"]], m["rank"], m["rank_varies"],
                       m.get("alpha"), m.get("alpha_varies", False)) for i, m in enumerate(attrs["modules"])]


def _check_materialized(root: zarr.Group, path: str, attrs: dict, splits: list[str]) -> None:
    missing = [f"raw/{s}/{m['key']}" for s in splits for m in attrs["modules"] if not store.group_complete(root, f"raw/{s}/{m['key']}")]
    if missing:
        raise PipelineError(f"store {path} has incomplete materialized data ({len(missing)} groups, e.g. {missing[0]}); "
                            f"run {quoted('materialize', path)} to finish it")


def _splits(attrs: dict, wanted: str) -> list[str]:
    available = list(attrs["splits"])
    if wanted == "all":
        return available
    chosen = [s.strip() for s in wanted.split(",") if s.strip()]
    if not chosen:
        raise PipelineError(f"--split {wanted!r} names no split; the store has {', '.join(available)}")
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise PipelineError(f"unknown split {unknown[0]!r}; the store has {', '.join(available)}")
    return chosen


def _allocate(features: zarr.Group, rep, n: int, chunk: int, n_chunks: int, axis: str, axis_len: int, fingerprint: str) -> None:
    features.create_array(
        rep.name, shape=(n, axis_len, rep.width), chunks=(chunk, axis_len, rep.width), dtype="float32", fill_value=0,
        dimension_names=("model", axis, f"{rep.name}_feature"), compressors=store.small_compressors(),
        attributes={**provenance.rep_stamp(rep, fingerprint), "complete": False}, overwrite=True,
    )
    features.create_array(f"_progress/{rep.name}", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                          dimension_names=("chunk",), compressors=store.small_compressors(), overwrite=True)


def _write_coordinates(root: zarr.Group, split: str, attrs: dict) -> zarr.Group:
    features = root.require_group(f"features/{split}")
    for name, values in (("layer", [layer["name"] for layer in attrs["layers"]]), ("module", [m["name"] for m in attrs["modules"]])):
        if name not in features:
            try:
                array = features.create_array(name, shape=(len(values),), dtype=str, dimension_names=(name,),
                                              compressors=store.small_compressors(), config=store.WRITE_EVERY_CHUNK)
            except ContainsArrayError:  # another process made it a moment ago; it writes the same values
                continue
            array[:] = np.array(values)
    return features


@dataclass
class FeaturesSummary:
    computed: dict[str, list[str]]  # split -> reps computed
    up_to_date: dict[str, list[str]]
    tasks: int
    seconds: float
    devices: list[str] = field(default_factory=list)  # the devices the tasks computed on, as their workers resolved --device


@dataclass
class Plan:
    tasks: list[Task]
    computed: dict[str, list[str]]  # split -> reps this process computes (it holds their leases)
    fresh: dict[str, list[str]]  # split -> reps already up to date
    held: list  # the leases.Lease of every computed (split, rep)
    deferred: dict[tuple[str, str], leases.Holder]  # (split, rep) someone else is computing -> who


def plan_tasks(config: FeaturesConfig, only: set[tuple[str, str]] | None = None) -> Plan:
    """Take the lease of every (split, rep) to compute, allocate what is stale, and return the tasks.

    A (split, rep) whose lease someone else holds is deferred, not touched; ``only`` limits the plan
    to the given (split, rep) pairs (the deferred ones, once their holders are done).
    """
    root = store.open_root(config.store, mode="r+")
    raw_location = store.base_location(root) or config.store
    raw_root = root if raw_location == config.store else store.open_root(raw_location, mode="r")
    attrs = root.attrs.asdict()
    reps = representations.resolve(config.reps)
    splits = _splits(attrs, config.splits)
    _check_materialized(raw_root, raw_location, attrs, splits)
    fingerprint = attrs["source"]["fingerprint"]
    modules = tuple(_modules(attrs))
    plan = Plan([], {}, {}, [], {})
    try:
        _fill_plan(plan, config, root, raw_root, raw_location, attrs, reps, splits, modules, fingerprint, only)
    except BaseException:
        for lease in plan.held:
            lease.release()
        raise
    return plan


def _fill_plan(plan: Plan, config: FeaturesConfig, root, raw_root, raw_location: str, attrs: dict, reps, splits, modules,
               fingerprint: str, only) -> None:
    nonfinite = (raw_root.attrs.get("materialize_config") or {}).get("allow_nonfinite", True)  # unknown: check
    for split in splits:
        n = attrs["splits"][split]["n"]
        chunk = raw_root[f"raw/{split}/{modules[0].key}/A"].chunks[0]
        n_chunks = -(-n // chunk)
        features = _write_coordinates(root, split, attrs)
        todo: dict[int, list[str]] = {}
        for rep in reps:
            if only is not None and (split, rep.name) not in only:
                continue
            if not config.force and provenance.rep_state(store.member(features, rep.name), rep, fingerprint) == "fresh":
                plan.fresh.setdefault(split, []).append(rep.name)
                continue
            lease = leases.Lease(root.store, f"features/{split}/{rep.name}")
            if not lease.acquire():
                plan.deferred[(split, rep.name)] = lease.holder
                continue
            # Again, now that the lease is ours: its last holder may have just finished it.
            state = "stale" if config.force else provenance.rep_state(store.member(features, rep.name), rep, fingerprint)
            if state == "fresh":
                lease.release()
                plan.fresh.setdefault(split, []).append(rep.name)
                continue
            plan.held.append(lease)
            plan.computed.setdefault(split, []).append(rep.name)
            if state == "stale":
                axis, axis_len = ("layer", len(attrs["layers"])) if rep.kind == "tensor" else ("module", len(modules))
                _allocate(features, rep, n, chunk, n_chunks, axis, axis_len, fingerprint)
                done = np.zeros(n_chunks, dtype=np.uint8)
            else:
                done = features[f"_progress/{rep.name}"][:]
            for c in np.flatnonzero(done == 0):
                todo.setdefault(int(c), []).append(rep.name)
        for c, names in sorted(todo.items()):
            plan.tasks.append(Task(config.store, raw_location, split, c, c * chunk, min(n, (c + 1) * chunk), modules,
                                   len(attrs["layers"]), tuple(names), config.device, nonfinite))


def _finish(config: FeaturesConfig, computed: dict) -> None:
    root = store.open_root(config.store, mode="r+")
    for split, names in computed.items():
        features = root[f"features/{split}"]
        for name in names:
            if features[f"_progress/{name}"][:].all():  # the mark records the chunk manifest, in the same write
                stamp = provenance.stamp()
                store.mark_array_complete(features[name], created_by=stamp["by"], created_at=stamp["at"])


def _task_result(future, task: Task, location: str):
    """A finished task's result; its failure as one line (a PipelineError as it is, a full disk as such)."""
    try:
        return future.result()
    except PipelineError:
        raise
    except OSError as exc:
        full = disk_full(exc, location)
        if full is not None:
            raise full from None
        raise _task_failed(task, exc) from None
    except Exception as exc:  # noqa: BLE001 - anything else a task raises is named, in one line
        raise _task_failed(task, exc) from None


def _task_failed(task: Task, exc: BaseException) -> PipelineError:
    detail = " ".join(str(exc).split()) or "no message"
    return PipelineError(f"feature task {task.split} models {task.start}-{task.stop} failed: {type(exc).__name__}: {detail}; "
                         "finished chunks are kept: rerun the same command to resume (report it if it fails again)")


def _run_tasks(config: FeaturesConfig, session: cluster_mod.Session, tasks: list[Task], progress) -> set[str]:
    """Run the tasks on the session's workers; returns the devices they computed on."""
    from dask.distributed import as_completed

    client = session.client()
    threads = torch.get_num_threads()
    if session.in_process:
        torch.set_num_threads(1)  # dask's threads already use every core: don't oversubscribe them
    devices = set()
    bar = progress(total_layers=len(tasks), total_bytes=0) if progress else None  # one step per model chunk
    try:
        futures = client.map(run_task, tasks, pure=False)
        task_of = dict(zip(futures, tasks))
        for future in as_completed(futures):
            nbytes, _, device = _task_result(future, task_of[future], config.store)
            devices.add(device)
            if bar:
                bar.update(layers=1, nbytes=nbytes)
    finally:
        if bar:
            bar.close()
        torch.set_num_threads(threads)
    return devices


def compute_features(config: FeaturesConfig, progress=None, on_wait=None) -> FeaturesSummary:
    """Run stage 2; see the module docstring.

    What someone else is computing in this store right now is waited for, after everything else
    is done, and then taken over where they left it if they did not finish. ``on_wait(split, rep,
    holder)`` is called when a wait starts.
    """
    started = time.perf_counter()
    if not cluster_mod.scheduler_address(config.scheduler):  # the workers are on this machine: refuse cuda without it now
        cluster_mod.resolve_device(config.device)
    with cluster_mod.Session(config.scheduler, config.workers, config.dashboard, config.device) as session:  # before the store changes
        try:
            config = replace(config, store=store.writable_target(config.store, config.output), output=None)
            return _compute(config, session, progress, on_wait, started)
        except OSError as exc:  # planning and marks write too (tasks' own failures arrive as PipelineErrors)
            full = disk_full(exc, config.store)
            if full is None:
                raise
            raise full from None


def _compute(config: FeaturesConfig, session: cluster_mod.Session, progress, on_wait, started: float) -> FeaturesSummary:
    computed: dict[str, list[str]] = {}
    fresh: dict[str, list[str]] = {}
    n_tasks, only, devices = 0, None, set()
    while True:
        plan = plan_tasks(config, only)
        try:
            if plan.tasks:
                devices |= _run_tasks(config, session, plan.tasks, progress)
            _finish(config, plan.computed)
        finally:
            for lease in plan.held:
                lease.release()
        n_tasks += len(plan.tasks)
        for target, part in ((computed, plan.computed), (fresh, plan.fresh)):
            for split, names in part.items():
                target.setdefault(split, []).extend(names)
        if not plan.deferred:
            break
        root = store.open_root(config.store, mode="r")
        for (split, name), holder in plan.deferred.items():
            leases.wait_for(root.store, f"features/{split}/{name}",
                            on_wait=(lambda h, s=split, r=name: on_wait(s, r, h)) if on_wait else None)
        only = set(plan.deferred)
    return FeaturesSummary(computed, fresh, n_tasks, time.perf_counter() - started, sorted(devices))
