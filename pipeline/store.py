"""The Zarr v3 store: where things live, creating and opening it safely, and completion marks.

Layout (docs/store-format.md is the spec):
  zarr.json                       root attrs: format, schema version, source, modules, layers, splits, labels
  raw/<split>/<module>/A          (model, rank, in)  float32 (float16 when the source is), chunked on model
  raw/<split>/<module>/B          (model, out, rank)
  raw/<split>/<module>/rank       (model,) true rank per adapter, only when ranks vary (zero padding beyond it)
  raw/<split>/<module>/alpha      (model,) LoRA alpha per adapter, only when it varies between adapters
  labels/<split>/<key>            (model,) one label column: integer codes (attrs: classes), integers or floats
  index/<split>/row               (model,) row index in the source split;  model_id when the source names models
  index/zarr.json                 attrs: a copy of the root attrs, to restore a lost root zarr.json
A group is complete when its attrs say ``complete: true``; that mark is written after its arrays.
Labels and the store's own bookkeeping (``index/``) never share a group: a label column may be named
anything, ``row`` and ``model_id`` included. Schema 1 kept the bookkeeping in ``labels/<split>``.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from .commands import quoted
from .errors import PipelineError
from .layers import safe_key

FORMAT = "weightspace-pipeline-store"
SCHEMA_VERSION = 2  # 2: bookkeeping in index/ (it shared labels/ in 1), a copy of the root attrs
INDEX = "index"  # index/<split>/row, index/<split>/model_id; its attrs hold the copy of the root attrs
DEFAULT_STORE = "stores/default.zarr"
LEASES = "_leases"  # who is computing what: pipeline/leases.py


def default_store() -> str:
    return os.environ.get("PIPELINE_STORE") or DEFAULT_STORE


CODECS = ("none", "lz4", "zstd")


def raw_compressors(codec: str, itemsize: int) -> list:
    """Codecs of the raw weights; crc32c always. Default "none": see docs/store-format.md for the figures.

    Random-like float weights compress by ~1.1x, and on 2 cores blosc costs ~40% of write speed.
    """
    if codec not in CODECS:
        raise PipelineError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    compressor = {
        "none": [],
        "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=itemsize)],
        "zstd": [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle, typesize=itemsize)],
    }[codec]
    return [*compressor, Crc32cCodec()]


def small_compressors() -> list:
    return [Crc32cCodec()]


def provenance() -> dict:
    """Who wrote something, when: the stamp every mark carries."""
    return {"by": f"{getpass.getuser()}@{socket.gethostname()}", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def is_url(location: str | Path) -> bool:
    """s3://, gs://, memory:// and the like: a store reached through fsspec (file:// is turned into a path)."""
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str | Path) -> Path:
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def zarr_store(location: str | Path, read_only: bool = False) -> Store:
    """The zarr store object behind ``location``, usable before a hierarchy exists there (for leases).

    URLs go through fsspec; credentials and endpoints come from the environment (for S3:
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL...), never from the store.
    """
    if is_url(location):
        # Listings must not be cached: leases and completion marks written by other processes must be seen.
        options = {"use_listings_cache": False} if str(location).split("://")[0] in ("s3", "s3a", "gs", "gcs") else None
        try:
            return FsspecStore.from_url(str(location), storage_options=options, read_only=read_only)
        except (ImportError, ValueError) as exc:
            raise PipelineError(f"cannot open store {location}: {str(exc).splitlines()[0]} "
                                "(for s3:// install s3fs, for gs:// gcsfs)") from None
    return LocalStore(str(local_path(location)), read_only=read_only)


def _get(zstore: Store, key: str) -> bytes | None:
    try:
        buffer = sync(zstore.get(key, prototype=default_buffer_prototype()))
    except (OSError, ValueError):
        return None
    return None if buffer is None else buffer.to_bytes()


def _keys(zstore: Store, prefix: str = "") -> list[str]:
    async def collect():
        return [key async for key in zstore.list_prefix(prefix)]

    return sync(collect())


def _json_attrs(location: str | Path, key: str) -> dict | None:
    """The attributes of the zarr.json at ``key``, or None when it is absent or not a JSON object."""
    if not is_url(location) and not (local_path(location) / key).is_file():
        return None
    raw = _get(zarr_store(location, read_only=True), key)
    if raw is None:
        return None
    try:
        attrs = json.loads(raw).get("attributes", {})
    except (ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def _root_attrs(location: str | Path) -> dict | None:
    return _json_attrs(location, "zarr.json")


def root_copy(location: str | Path) -> dict | None:
    """The copy of the root attrs kept in ``index/zarr.json`` (schema 2), or None."""
    copy = (_json_attrs(location, f"{INDEX}/zarr.json") or {}).get("root")
    return copy if isinstance(copy, dict) and copy.get("format") == FORMAT else None


def is_ours(location: str | Path) -> bool:
    attrs = _root_attrs(location)
    return bool(attrs) and attrs.get("format") == FORMAT


_OUR_GROUPS = ("raw", "labels", INDEX, "features", "runs")


def is_damaged_ours(location: str | Path) -> bool:
    """Recognisably one of our stores, but its root zarr.json is lost or unreadable.

    Either it has the copy of the root attrs (schema 2), or our top-level groups (a store of schema 1,
    or one whose replacement by an older version was killed after the root went and before the rest).
    """
    if is_ours(location):
        return False
    if root_copy(location) is not None:
        return True
    return any(_json_attrs(location, f"{name}/zarr.json") is not None for name in _OUR_GROUPS)


def damaged_message(location: str | Path) -> str:
    """What to do with a store whose root metadata is lost: restore it from its copy, or rebuild."""
    if root_copy(location) is not None:
        return (f"store {location} has lost its root metadata (zarr.json missing or unreadable); restore it from its "
                f"copy with {quoted('verify', location, '--repair')} (nothing else is lost)")
    return (f"store {location} has lost its root metadata (zarr.json missing or unreadable) and holds no copy of it; "
            f"rebuild it with {quoted('materialize', location, '--source', 'SOURCE', '--overwrite')} (features and runs are lost)")


def restore_root(location: str | Path) -> bool:
    """Write the root zarr.json back from its copy; False when there is no copy."""
    copy = root_copy(location)
    if copy is None:
        return False
    _write_root(location, copy)
    return True


def _write_root(location: str | Path, attrs: dict) -> None:
    """Replace the root zarr.json in one write (the store's set is atomic: a temporary file, then a rename)."""
    document = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    buffer = default_buffer_prototype().buffer.from_bytes(json.dumps(document, indent=2).encode())
    sync(zarr_store(location).set("zarr.json", buffer))


def check_usable(location: str | Path) -> str:
    """'absent', 'ours', 'damaged' (ours, root metadata lost: see is_damaged_ours) or raise.

    The location must be free, an empty folder, or one of our stores.
    """
    if is_url(location):
        if is_ours(location):
            return "ours"
        if is_damaged_ours(location):
            return "damaged"
        try:
            keys = _keys(zarr_store(location, read_only=True))
        except OSError as exc:
            raise PipelineError(f"cannot list store {location} ({exc}); check the URL and the credentials in the environment") from None
        if any(not key.startswith(LEASES + "/") for key in keys):
            raise PipelineError(f"store {location} exists and is not one of our stores; choose another --store (nothing was changed)")
        return "absent"
    path = local_path(location)
    if not path.exists():
        return "absent"
    if not path.is_dir():
        raise PipelineError(f"store path {path} exists and is a file, not a store; choose another --store")
    if is_ours(path):
        return "ours"
    if is_damaged_ours(path):
        return "damaged"
    if any(child.name != LEASES for child in path.iterdir()):  # a lease alone: a materialize starting there
        raise PipelineError(f"store path {path} exists and is not one of our stores; choose another --store (nothing was changed)")
    return "absent"


def check_writable(location: str | Path) -> None:
    """Fail early, in one line, when the store cannot be created or written."""
    if is_url(location):
        zstore = zarr_store(location)
        probe = f".pipeline-write-probe-{socket.gethostname()}-{os.getpid()}"
        try:
            sync(zstore.set(probe, default_buffer_prototype().buffer.from_bytes(b"")))
            sync(zstore.delete(probe))
        except Exception as exc:  # noqa: BLE001 - botocore, gcsfs, fsspec: each raises its own
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PipelineError(f"cannot write to {location} ({first}); check the bucket, the credentials in the "
                                "environment, or use --output for your results") from None
        return
    path = local_path(location)
    probe_dir = path if path.exists() else path.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise PipelineError(f"cannot create store {path}: {probe_dir} is not a folder; choose another --store")
    probe = probe_dir / f".pipeline-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(f"cannot write to {probe_dir} ({exc.strerror}); choose a writable --store, "
                            "or use --output for your results") from None


def bytes_under(location: str | Path, prefix: str = "") -> int:
    """Bytes stored under ``prefix`` (a folder of the store, "" for all of it), as on disk or in the bucket."""
    if not is_url(location):
        base = local_path(location) / prefix
        return sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) if base.is_dir() else 0
    zstore = zarr_store(location, read_only=True)
    path = f"{zstore.path.rstrip('/')}/{prefix}".rstrip("/")
    try:
        return int(sync(zstore.fs._du(path, total=True)))
    except FileNotFoundError:
        return 0


def check_schema(path: str | Path, version) -> None:
    """Refuse a store this code cannot read: one written by a newer schema, or a malformed version."""
    if not isinstance(version, int) or version < 1:
        raise PipelineError(f"{path} has an invalid schema version {version!r}; it was not written by this pipeline "
                            f"or is damaged: recreate it with `pipeline materialize --store {path} --overwrite`")
    if version > SCHEMA_VERSION:
        raise PipelineError(f"{path} was written by a newer pipeline (store schema {version}; this one reads up to "
                            f"{SCHEMA_VERSION}): upgrade weightspace-pipeline to use it (nothing was changed)")


def open_root(path: str | Path, mode: str = "r") -> zarr.Group:
    """An existing store of ours, read-only ("r") or for updating ("r+"), of a schema this code reads.

    Schema 1 stores are read as they are: ``index_path`` finds their bookkeeping in ``labels/``.
    """
    attrs = _root_attrs(path)
    if not attrs or attrs.get("format") != FORMAT:
        if is_damaged_ours(path):
            raise PipelineError(damaged_message(path))
        if not is_url(path) and local_path(path).is_file():
            raise PipelineError(f"{path} is a file, not a pipeline store; pass the store's folder as --store")
        raise PipelineError(f"{path} is not a pipeline store; make one with {quoted('materialize', path, '--source', 'SOURCE')}")
    check_schema(path, attrs.get("schema_version"))
    if attrs.get("replacing"):
        raise PipelineError(f"store {path} is being replaced (a `materialize --overwrite` was interrupted, or is running); "
                            f"run {quoted('materialize', path)} to finish it")
    return zarr.open_group(zarr_store(path, read_only=mode == "r"), mode=mode, zarr_format=3)


def index_path(root: zarr.Group, split: str, name: str = "") -> str:
    """Where a split's bookkeeping arrays (``row``, ``model_id``) are: ``index/<split>``, or ``labels/<split>`` in schema 1."""
    group = f"{INDEX}/{split}" if root.attrs.get("schema_version", 1) >= 2 else f"labels/{split}"
    return f"{group}/{name}" if name else group


def label_keys(names) -> dict[str, str]:
    """Label column name -> its node under ``labels/<split>``: distinct for distinct names.

    A name that is already a safe key keeps it; any other gets its safe form, with ``-2``, ``-3``...
    when that is taken, so that ``a b`` and ``a_b`` (both ``a_b`` once made safe) never overwrite each
    other. Safe names are placed first, so a suffix never takes a real column's name.
    """
    names = sorted(names)
    keys = {name: name for name in names if safe_key(name) == name}
    taken = set(keys.values())
    for name in (n for n in names if n not in keys):
        key, n = safe_key(name), 1
        while key in taken:
            n += 1
            key = f"{safe_key(name)}-{n}"
        keys[name] = key
        taken.add(key)
    return keys


def label_path(root: zarr.Group, split: str, label: str) -> str:
    """The array of label column ``label`` in ``split`` (stores before label keys: its safe name)."""
    info = root.attrs["labels"][label]
    return f"labels/{split}/{info.get('key') or safe_key(label)}"


def create_root(path: str | Path, attrs: dict) -> zarr.Group:
    """A new store at ``path``, which holds nothing but (maybe) leases: those must survive.

    ``index/zarr.json`` keeps a copy of the root attrs (they never change after this), so a lost or
    damaged root zarr.json can be restored (``verify --repair``) instead of leaving a dead end.
    """
    full = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **attrs}
    if _get(zarr_store(path, read_only=True), "zarr.json") is not None:  # our root, left by clear()
        _write_root(path, full)
        root = zarr.open_group(zarr_store(path), mode="r+", zarr_format=3)
    else:
        root = zarr.create_group(store=zarr_store(path), zarr_format=3, overwrite=False, attributes=full)
    root.create_group(INDEX, attributes={"root": full, "description": "a copy of the root attrs, to restore zarr.json"},
                      overwrite=True)
    return root


def begin_replacing(path: str | Path, config: dict) -> None:
    """Step 1 of --overwrite: mark the root "replacing" (one write) before anything is deleted.

    Every command then refuses the store with one line, and ``materialize --store S`` resumes the
    replacement with ``config`` (the new store's materialize config), so a kill at any point of the
    replacement leaves a store that says what it is and how to finish it, never a dead end.
    """
    attrs = _root_attrs(path) or root_copy(path) or {"format": FORMAT, "schema_version": SCHEMA_VERSION}
    _write_root(path, {**attrs, "replacing": {"materialize_config": config, **provenance()}})


def clear(path: str | Path) -> None:
    """Step 2 of --overwrite: remove everything but the root zarr.json and the leases (the caller holds one)."""
    if is_url(path):
        zstore = zarr_store(path)
        keys = [key for key in _keys(zstore) if key != "zarr.json" and not key.startswith(LEASES + "/")]
        for key in sorted(keys, key=lambda k: not k.endswith("zarr.json")):  # metadata (and its marks) first
            sync(zstore.delete(key))
        return
    for child in local_path(path).iterdir():
        if child.name in (LEASES, "zarr.json"):
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def base_location(root: zarr.Group) -> str | None:
    """The shared store a personal store (made by --output) builds on: its raw data and features are read there."""
    return (root.attrs.get("base") or {}).get("store")


def raw_location(location: str) -> str:
    """Where the raw layers of the store at ``location`` are: itself, or its base."""
    return base_location(open_root(location)) or location


def writable_target(location: str, output: str | None) -> str:
    """The store a command writes to: ``location`` if writable, else ``output`` (made if absent).

    ``output`` is a small personal store that refers to ``location`` by its source fingerprint: it holds
    a copy of the labels and what the command computes; raw layers and features stay in ``location``.
    """
    if not output:
        open_root(location)  # a clear error first when it is not a store at all
        try:
            check_writable(location)
        except PipelineError as exc:
            raise PipelineError(f"store {location} is read-only here ({exc}); pass --output STORE to write your "
                                "results to a store of your own that builds on it") from None
        return location
    shared = open_root(location, mode="r")
    fingerprint = shared.attrs["source"]["fingerprint"]
    if check_usable(output) == "ours":
        mine = open_root(output)
        if mine.attrs["source"]["fingerprint"] != fingerprint or mine.attrs.get("layout") != shared.attrs.get("layout"):
            raise PipelineError(f"--output {output} builds on other data than {location} (another source, or other "
                                "splits or layers); choose another --output")
        return output
    check_writable(output)
    attrs = {k: v for k, v in shared.attrs.asdict().items() if k not in ("format", "schema_version", "created", "base")}
    mine = create_root(output, {**attrs, "created": provenance(), "base": {"store": str(location), "fingerprint": fingerprint}})
    bookkeeping = ("row", "model_id")
    for split in attrs["splits"]:  # labels and index: small, and every reader of a store needs them
        labels = shared[f"labels/{split}"]
        index = shared[index_path(shared, split)]
        names = [n for n in labels.array_keys() if index.path != labels.path or n not in bookkeeping]
        _copy_arrays(labels, names, mine, f"labels/{split}")
        _copy_arrays(index, [n for n in index.array_keys() if n in bookkeeping], mine, index_path(mine, split))
    return output


def _copy_arrays(source: zarr.Group, names: list[str], target: zarr.Group, path: str) -> None:
    for name in names:
        array = source[name]
        copy = target.create_array(f"{path}/{name}", shape=array.shape, chunks=array.chunks, dtype=array.dtype,
                                   dimension_names=array.metadata.dimension_names, compressors=small_compressors(),
                                   attributes=array.attrs.asdict())
        copy[...] = array[...]
    mark_complete(target, path)


def member(root: zarr.Group, path: str) -> zarr.Array | zarr.Group | None:
    """The node at ``path``, or None, leaving no reference cycle behind.

    zarr's ``sync`` raises a missing node's KeyError from a local variable, so the exception, its
    traceback and that frame form a cycle; every calling frame hangs off it (``f_back``) with all its
    locals until Python's cyclic GC runs, which can be many modules later. In materialize that kept
    each module's last copy batch alive: 1.53 GiB peak with --memory 1GiB at 50k adapters, 0.62 after
    (docs/performance.md). Clearing the traceback's frames breaks the cycle.
    """
    try:
        return root[path]
    except KeyError as exc:
        traceback.clear_frames(exc.__traceback__)
        return None


def group_complete(root: zarr.Group, path: str) -> bool:
    node = member(root, path)
    return node is not None and bool(node.attrs.get("complete", False))


def update_attrs(node: zarr.Group | zarr.Array, values: dict) -> None:
    """Merge ``values`` into a node's attributes in ONE metadata write.

    ``node.attrs.update`` is MutableMapping.update: one write per key, so a reader (or a SIGKILL)
    can see ``complete: true`` before the rest of the mark. ``attrs.put`` writes the whole document.
    """
    node.attrs.put({**node.attrs.asdict(), **values})


def mark_complete(root: zarr.Group, path: str, **info) -> None:
    """Written last, after every array of the group: a reader trusts nothing without it."""
    update_attrs(root.require_group(path), {"complete": True, **provenance(), **info})


def mark_incomplete(root: zarr.Group, path: str) -> None:
    group = root.require_group(path)
    if group.attrs.get("complete"):
        update_attrs(group, {"complete": False})


def require_array(root: zarr.Group, path: str, shape: tuple, chunks: tuple, dtype, dims: tuple, compressors=None, attrs=None) -> zarr.Array:
    """The array at ``path`` with this shape, chunking and dtype: reused if it already is, else (re)allocated."""
    existing = member(root, path)
    if isinstance(existing, zarr.Array) and existing.shape == tuple(shape) and existing.chunks == tuple(chunks) \
            and existing.dtype == np.dtype(dtype):
        return existing
    return root.create_array(
        path, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, dimension_names=dims,
        compressors=compressors if compressors is not None else small_compressors(), attributes=attrs or {}, overwrite=True,
    )
