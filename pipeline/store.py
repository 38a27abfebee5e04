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

Integrity: every array writes every chunk (even one equal to the fill value), and a complete mark
records each array's chunk manifest (the crc32c of the chunk at each position), so an absent,
swapped or replaced chunk is damage that ``verify`` and the readers can see, never zeros read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import traceback
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from .commands import materialize_args, quoted
from .errors import PipelineError
from .layers import safe_key
from .provenance import stamp

FORMAT = "weightspace-pipeline-store"
SCHEMA_VERSION = 2  # 2: bookkeeping in index/ (it shared labels/ in 1), a copy of the root attrs
INDEX = "index"  # index/<split>/row, index/<split>/model_id; its attrs hold the copy of the root attrs
DEFAULT_STORE = "stores/default.zarr"
LEASES = "_leases"  # who is computing what: pipeline/leases.py
# Written with a complete mark, in the same metadata write: a chunk manifest {"count": n, "crc32c": [per chunk, in
# C order of the chunk grid]}; a marked group holds one per array, by name, a marked array (a representation) its own.
MANIFEST = "chunks"

# zarr's default (write_empty_chunks false) skips a chunk equal to the fill value, so an absent chunk
# file would read back as zeros and could be either "all zeros" or "deleted". Writing every chunk
# makes absence always damage. It is a runtime setting of an array object, not stored in the array's
# metadata: every array this package writes is created with it (``config=WRITE_EVERY_CHUNK``) or, when
# reopened (features writing its region, materialize resuming), written through ``writable``. zarr's
# process-wide default is left as the user has it.
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}

# Root attributes every command relies on, with their JSON type (docs/store-format.md).
REQUIRED_ATTRS = {"source": dict, "layout": dict, "modules": list, "layers": list, "splits": dict, "labels": dict,
                  "chunk_models": int}


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


def root_restorable(location: str | Path) -> bool:
    """The root zarr.json is lost, unreadable or lacks what commands need, and ``index/`` holds a good copy of it."""
    copy = root_copy(location)
    if copy is None or not attrs_valid(location, copy):
        return False
    attrs = _root_attrs(location)
    return not (isinstance(attrs, dict) and attrs.get("format") == FORMAT and attrs_valid(location, attrs))


def damaged_message(location: str | Path) -> str:
    """What to do with a store whose root metadata is lost: restore it from its copy, or rebuild."""
    if root_restorable(location):
        return (f"store {location} has lost its root metadata (zarr.json missing or unreadable); restore it from its "
                f"copy with {quoted('verify', location, '--repair')} (nothing else is lost)")
    return (f"store {location} has lost its root metadata (zarr.json missing or unreadable) and holds no copy of it; "
            f"rebuild it with {quoted('materialize', location, '--source', 'SOURCE', '--overwrite')} (features and runs are lost)")


def restore_root(location: str | Path) -> bool:
    """Write the root zarr.json back from its copy; False when there is no copy."""
    if not root_restorable(location):
        return False
    _write_root(location, root_copy(location))
    return True


def _write_root(location: str | Path, attrs: dict) -> None:
    """Replace the root zarr.json in one write (the store's set is atomic: a temporary file, then a rename)."""
    write_group_metadata(zarr_store(location), "", attrs)


def write_group_metadata(zstore: Store, path: str, attrs: dict) -> None:
    """Write the zarr.json of the group at ``path`` ("" for the root) with ``attrs``, in one write, over whatever is there."""
    document = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    buffer = default_buffer_prototype().buffer.from_bytes(json.dumps(document, indent=2).encode())
    sync(zstore.set(f"{path}/zarr.json" if path else "zarr.json", buffer))


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
                                "environment, or use --personal-store for your results") from None
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
                            "or use --personal-store for your results") from None


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
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:  # True is an int to Python
        raise PipelineError(f"{path} has an invalid schema version {version!r}; it was not written by this pipeline "
                            f"or is damaged: recreate it with {quoted('materialize', path, '--source', 'SOURCE', '--overwrite')}")
    if version > SCHEMA_VERSION:
        raise PipelineError(f"{path} was written by a newer pipeline (store schema {version}; this one reads up to "
                            f"{SCHEMA_VERSION}): upgrade weightspace-pipeline to use it (nothing was changed)")


def _not_a_store(path: str | Path) -> PipelineError:
    """What is true of a location that holds no store of ours, and what to do about it."""
    if not is_url(path):
        local = local_path(path)
        if local.is_file():
            return PipelineError(f"{path} is a file, not a pipeline store (a store is a folder); pass the store's folder "
                                 "as --store")
        if (local / "zarr.json").is_file() and not isinstance(_root_attrs(path), dict):
            return PipelineError(f"the root zarr.json of {path} is damaged (not JSON, or not zarr metadata); restore it "
                                 f"from a backup, or delete {path} and run {quoted('materialize', path, '--source', 'SOURCE')}")
        from .sources import DATASET_KINDS, dataset_kind  # here: sources imports the datasets library

        kind = dataset_kind(local)
        if kind is not None:  # the --source of materialize, given as --store
            return PipelineError(f"{path} holds a dataset ({DATASET_KINDS[kind]}), not a pipeline store; make a store of it "
                                 f"with {quoted('materialize', f'{local.resolve()}.zarr', '--source', path)} and pass that as --store")
        if local.is_dir() and any(child.name != LEASES for child in local.iterdir()):
            return PipelineError(f"{path} is a folder that is not a pipeline store (no weightspace-pipeline zarr.json at its "
                                 "top); check the --store path")
    return PipelineError(f"{path} is not a pipeline store; make one with {quoted('materialize', path, '--source', 'SOURCE')}")


def check_attrs(path: str | Path, attrs: dict) -> None:
    """Refuse, in one line, a store whose root attributes lack what every command relies on."""
    for key, kind in REQUIRED_ATTRS.items():
        value = attrs.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            what = "lacks" if key not in attrs else "has a malformed"
            break
    else:
        bad_split = next((s for s, info in attrs["splits"].items()
                          if not isinstance(info, dict) or not isinstance(info.get("n"), int)), None)
        bad_module = next((i for i, m in enumerate(attrs["modules"]) if not isinstance(m, dict) or "key" not in m), None)
        if bad_split is None and bad_module is None and isinstance(attrs["source"].get("fingerprint"), str):
            return
        key, what = ("splits" if bad_split is not None else "modules" if bad_module is not None else "source"), "has a malformed"
    if attrs.get("base"):
        fix = f"delete {path} and rerun your command with --personal-store {path}"
    else:
        recorded = attrs.get("materialize_config")
        if isinstance(recorded, dict) and recorded.get("source"):  # the very options it was made with
            args = materialize_args(recorded)
        else:
            uri = attrs.get("source", {}).get("uri") if isinstance(attrs.get("source"), dict) else None
            args = ["--source", uri or "SOURCE"]
        fix = f"recreate it with {quoted('materialize', path, *args, '--overwrite')}"
    raise PipelineError(f"{path}: the root zarr.json {what} {key!r} attribute (damaged or edited metadata); {fix}")


def attrs_valid(path: str | Path, attrs: dict) -> bool:
    try:
        check_attrs(path, attrs)
    except PipelineError:
        return False
    return True


def open_root(path: str | Path, mode: str = "r", validate: bool = True) -> zarr.Group:
    """An existing store of ours, read-only ("r") or for updating ("r+"), of a schema this code reads.

    ``validate`` checks the root attributes every command needs; only ``materialize --overwrite``,
    which replaces them, opens without it. Schema 1 stores are read as they are: ``index_path``
    finds their bookkeeping in ``labels/``.
    """
    attrs = _root_attrs(path)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        if is_damaged_ours(path):
            raise PipelineError(damaged_message(path))
        raise _not_a_store(path)
    check_schema(path, attrs.get("schema_version"))
    if attrs.get("replacing"):
        raise PipelineError(f"store {path} is being replaced (a `materialize --overwrite` was interrupted, or is running); "
                            f"run {quoted('materialize', path)} to finish it")
    if validate and not attrs_valid(path, attrs):  # only then is the copy in index/ worth reading
        if root_restorable(path):
            raise PipelineError(damaged_message(path))
        check_attrs(path, attrs)
    return zarr.open_group(zarr_store(path, read_only=mode == "r"), mode=mode, zarr_format=3)


def index_path(root: zarr.Group, split: str, name: str = "") -> str:
    """Where a split's bookkeeping arrays (``row``, ``model_id``) are: ``index/<split>``, or ``labels/<split>`` in schema 1."""
    group = f"{INDEX}/{split}" if root.attrs.get("schema_version", 1) >= 2 else f"labels/{split}"
    return f"{group}/{name}" if name else group


_RESERVED_KEYS = {"zarr.json"}  # a node name zarr itself uses inside every group


def label_keys(names) -> dict[str, str]:
    """Label column name -> its node under ``labels/<split>``: distinct for distinct names.

    A name that is already a safe key keeps it; any other gets its safe form, with ``-2``, ``-3``...
    when that is taken, so that ``a b`` and ``a_b`` (both ``a_b`` once made safe) never overwrite each
    other. Safe names are placed first, so a suffix never takes a real column's name.
    """
    names = sorted(names)
    keys = {name: name for name in names if safe_key(name) == name and name not in _RESERVED_KEYS}
    taken = set(keys.values())
    for name in (n for n in names if n not in keys):
        key, n = safe_key(name), 1
        while key in taken or key in _RESERVED_KEYS:
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
    root.create_group(INDEX, attributes=index_attrs(full), overwrite=True)
    return root


def index_attrs(root_attrs: dict) -> dict:
    """The attrs of ``index/``: the copy of the root attrs a lost root zarr.json is restored from."""
    return {"root": root_attrs, "description": "a copy of the root attrs, to restore zarr.json"}


def begin_replacing(path: str | Path, config: dict) -> None:
    """Step 1 of --overwrite: mark the root "replacing" (one write) before anything is deleted.

    Every command then refuses the store with one line, and ``materialize --store S`` resumes the
    replacement with ``config`` (the new store's materialize config), so a kill at any point of the
    replacement leaves a store that says what it is and how to finish it, never a dead end.
    """
    attrs = _root_attrs(path) or root_copy(path) or {"format": FORMAT, "schema_version": SCHEMA_VERSION}
    _write_root(path, {**attrs, "replacing": {"materialize_config": config, **stamp()}})


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
    """The shared store a personal store (made by --personal-store) builds on: its raw data and features are read there."""
    return (root.attrs.get("base") or {}).get("store")


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
            raise PipelineError(f"store {location} is read-only here ({exc}); pass --personal-store STORE to write your "
                                "results to a store of your own that builds on it") from None
        return location
    shared = open_root(location, mode="r")
    fingerprint = shared.attrs["source"]["fingerprint"]
    if check_usable(output) == "ours":
        mine = open_root(output)
        if mine.attrs["source"]["fingerprint"] != fingerprint or mine.attrs.get("layout") != shared.attrs.get("layout"):
            raise PipelineError(f"--personal-store {output} builds on other data than {location} (another source, or other "
                                "splits or layers); choose another --personal-store")
        return output
    check_writable(output)
    attrs = {k: v for k, v in shared.attrs.asdict().items() if k not in ("format", "schema_version", "created", "base")}
    mine = create_root(output, {**attrs, "created": stamp(), "base": {"store": str(location), "fingerprint": fingerprint}})
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
                                   attributes=array.attrs.asdict(), config=WRITE_EVERY_CHUNK)
        copy[...] = read(array)  # an absent or damaged chunk of the base is refused, not copied as zeros
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
    except (ValueError, TypeError) as exc:  # a zarr.json that is not JSON, or not a valid metadata document
        traceback.clear_frames(exc.__traceback__)
        key = f"{root.path}/{path}".strip("/")
        raise PipelineError(f"the metadata of {key} in store {location_of(root.store)} is damaged ({type(exc).__name__}); "
                            f"run {quoted('verify', location_of(root.store), '--repair')}, then the commands it "
                            "prints") from None


@contextlib.contextmanager
def damaged_metadata_is_one_line(location: str, what: str):
    """Around a walk over many nodes (``runs/``): a zarr.json there that is not JSON, or not zarr metadata,
    becomes one line that names ``what`` and the repair, instead of a JSONDecodeError from inside zarr."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"the metadata of {what} in store {location} is damaged ({type(exc).__name__}); "
                            f"run {quoted('verify', location, '--repair')}, then the commands it prints") from None


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
    """Written last, after every array of the group: a reader trusts nothing without it.

    The mark carries the chunk manifest of each of the group's arrays, by name, in the same single
    write: which arrays the group has (a deleted array's metadata is then seen as damage) and which
    chunk is at each position of each.
    """
    group = root.require_group(path)
    arrays = dict(sorted(group.arrays()))  # one listing, and every tail below in one round of reads: a mark stays cheap
    keys = {name: chunk_keys(array) for name, array in arrays.items()}
    tails = iter(_tails(group.store, [key for name in arrays for key in keys[name]]))
    manifests = {name: _manifest(array, keys[name], [next(tails) for _ in keys[name]]) for name, array in arrays.items()}
    update_attrs(group, {"complete": True, MANIFEST: manifests, **stamp(), **info})


def mark_array_complete(array: zarr.Array, **info) -> None:
    """An array that carries its own mark (a representation): its manifest and the mark in one metadata write."""
    update_attrs(array, {"complete": True, MANIFEST: chunk_manifest(array), **info})


def mark_incomplete(root: zarr.Group, path: str) -> None:
    group = root.require_group(path)
    if group.attrs.get("complete"):
        update_attrs(group, {"complete": False, MANIFEST: None})  # its chunks are rewritten: the manifest with them


def writable(array: zarr.Array) -> zarr.Array:
    """``array`` as this package writes it: every chunk stored, even one equal to the fill value (WRITE_EVERY_CHUNK)."""
    return array.with_config(WRITE_EVERY_CHUNK)


def require_array(root: zarr.Group, path: str, shape: tuple, chunks: tuple, dtype, dims: tuple, compressors=None, attrs=None) -> zarr.Array:
    """The array at ``path`` with this shape, chunking and dtype, to write (``writable``): reused if it already
    is, else (re)allocated."""
    try:
        existing = member(root, path)
    except PipelineError:  # damaged metadata (verify --repair reset its group): allocate it afresh
        existing = None
    if isinstance(existing, zarr.Array) and existing.shape == tuple(shape) and existing.chunks == tuple(chunks) \
            and existing.dtype == np.dtype(dtype):
        return writable(existing)
    return root.create_array(
        path, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, dimension_names=dims,
        compressors=compressors if compressors is not None else small_compressors(), attributes=attrs or {}, overwrite=True,
        config=WRITE_EVERY_CHUNK,
    )


# --- runs/: one group per trained configuration (runs/<config hash>), one per run in it (run-NNN) ---------


RUNS = "runs"


def run_key(run: int) -> str:
    """The name of run ``run``'s group in its configuration's: ``run-000``, ``run-001``..."""
    return f"run-{run:03d}"


def run_path(digest: str, run: int | None = None) -> str:
    """``runs/<digest>``, the group of the configuration with that hash, or ``runs/<digest>/run-NNN``, one of its runs."""
    return f"{RUNS}/{digest}" if run is None else f"{RUNS}/{digest}/{run_key(run)}"


def run_number(name: str) -> int | None:
    """The run a child of ``runs/<digest>`` holds, or None when ``name`` is not a run's group."""
    digits = name.removeprefix("run-")
    return int(digits) if name.startswith("run-") and digits.isdigit() else None


def configurations(root: zarr.Group) -> list[tuple[str, zarr.Group]]:
    """(config hash, group) of every trained configuration, by hash; none without ``runs/``.

    Damaged metadata of ``runs/`` itself is one line (``member``); of a configuration or a run below it, zarr's
    ValueError or TypeError, for the caller to name (``damaged_metadata_is_one_line``).
    """
    runs = member(root, RUNS)
    return [(digest, runs[digest]) for digest in sorted(runs.group_keys())] if runs is not None else []


def runs_of(group: zarr.Group, complete: bool = False) -> dict[int, zarr.Group]:
    """The runs of one configuration (its ``runs/<digest>`` group), by run number, in run order;
    ``complete``: only those marked complete."""
    runs = {}
    for name in group.group_keys():
        run = run_number(name)
        if run is None:
            continue
        node = group[name]
        if not complete or node.attrs.get("complete"):
            runs[run] = node
    return dict(sorted(runs.items()))


# --- chunk integrity: manifests, and reads that refuse what is absent or damaged ------------------------


def location_of(zstore: Store) -> str:
    """The location a zarr store object was opened from, as a user would pass it to --store."""
    if isinstance(zstore, LocalStore):
        return str(zstore.root)
    if isinstance(zstore, FsspecStore):
        return zstore.fs.unstrip_protocol(zstore.path)
    return str(zstore)


def chunk_keys(array: zarr.Array) -> list[str]:
    """The store key of every chunk of ``array``, in C order of the chunk grid (the manifest's order)."""
    return [f"{array.path}/{array.metadata.encode_chunk_key(index)}"
            for index in itertools.product(*(range(n) for n in array.cdata_shape))]


def chunk_tails(array: zarr.Array, keys: list[str] | None = None) -> list[int | None]:
    """The crc32c each stored chunk carries (its last 4 bytes, written by the crc32c codec), None where absent.

    A byte-range read per chunk, all at once: no chunk is decoded.
    """
    return _tails(array.store, chunk_keys(array) if keys is None else keys)


def _tails(zstore: Store, keys: list[str]) -> list[int | None]:
    async def tails():
        prototype = default_buffer_prototype()
        return await asyncio.gather(*(zstore.get(key, prototype=prototype, byte_range=SuffixByteRequest(4)) for key in keys))

    return [None if b is None else int.from_bytes(b.to_bytes()[-4:], "little") for b in sync(tails())]


def chunk_manifest(array: zarr.Array) -> dict:
    """What a complete mark records of an array: its chunk count and each chunk's crc32c, by position."""
    keys = chunk_keys(array)
    return _manifest(array, keys, chunk_tails(array, keys))


def _manifest(array: zarr.Array, keys: list[str], tails: list[int | None]) -> dict:
    absent = [key for key, tail in zip(keys, tails) if tail is None]
    if absent:  # every chunk is written (write_empty_chunks), so this is damage during the write itself
        raise PipelineError(f"{absent[0]} is missing in store {location_of(array.store)} just after it was written "
                            "(a disk or another process removed it); rerun the command")
    return {"count": len(tails), "crc32c": tails}


def manifest_of(array: zarr.Array, group: zarr.Group | None = None) -> dict | None:
    """The chunk manifest of ``array``: in its own attrs (a representation), else in its group's mark; None
    when unfinished or written before manifests existed."""
    own = array.attrs.get(MANIFEST)
    if isinstance(own, dict) and "count" in own:
        return own
    marks = group.attrs.get(MANIFEST) if group is not None else None
    found = marks.get(array.basename) if isinstance(marks, dict) else None
    return found if isinstance(found, dict) else None


def chunk_problems(array: zarr.Array, manifest: dict | None, legacy: bool = True) -> list[tuple[str, tuple, str]]:
    """(key, chunk index, what is wrong) for every chunk that is absent, or not the chunk the manifest
    recorded at its position (swapped, copied or replaced). Without a manifest only presence is
    checked; ``legacy``: the array may have been written before manifests (and empty chunks) existed."""
    keys = chunk_keys(array)
    indices = list(itertools.product(*(range(n) for n in array.cdata_shape)))
    tails = chunk_tails(array, keys)
    recorded = manifest.get("crc32c") if isinstance(manifest, dict) else None
    if recorded is not None and len(recorded) != len(keys):
        return [(array.path, (0,) * array.ndim,
                 f"has {len(keys)} chunks but {len(recorded)} were recorded when it was marked complete")]
    out = []
    for position, (key, index, tail) in enumerate(zip(keys, indices, tails)):
        if tail is None:
            what = "chunk missing (deleted or lost)"
            if recorded is None and legacy:
                what += ("; this array predates chunk manifests, so it may also be a chunk of fill values zarr did not "
                         "write: the repair rewrites it either way")
            out.append((key, index, what))
        elif recorded is not None and tail != recorded[position]:
            others = [keys[i] for i, crc in enumerate(recorded) if crc == tail and i != position]
            what = (f"holds the chunk written at {others[0][len(array.path) + 1:]} (chunks swapped or copied)"
                    if others else "is not the chunk written here (replaced: its checksum differs from the recorded one)")
            out.append((key, index, what))
    return out


def _covering(array: zarr.Array, start: int | None, stop: int | None) -> list[str]:
    """Keys of the chunks holding models [start, stop) (every model when None) of ``array``."""
    if array.ndim == 0 or start is None:
        return chunk_keys(array)
    first, last = start // array.chunks[0], (max(stop, start + 1) - 1) // array.chunks[0]
    rest = [range(n) for n in array.cdata_shape[1:]]
    return [f"{array.path}/{array.metadata.encode_chunk_key(index)}"
            for index in itertools.product(range(first, min(last + 1, array.cdata_shape[0])), *rest)]


def _damaged(array: zarr.Array, key: str, what: str) -> PipelineError:
    where = location_of(array.store)
    return PipelineError(f"{key} in store {where} is {what}; run {quoted('verify', where, '--repair')}, "
                         "then the commands it prints")


def check_chunks(array: zarr.Array, start: int | None = None, stop: int | None = None, group: zarr.Group | None = None) -> None:
    """Refuse to read a complete array (one with a manifest, in its attrs or its ``group``'s mark) one of
    whose chunks covering models [start, stop) is absent: zarr would return fill values for it. One
    existence check per chunk, all at once (one round trip on object storage, not one per chunk)."""
    manifest = manifest_of(array, group)
    if manifest is None:
        return  # unfinished (a reader does not use it) or written before manifests: verify checks those
    if manifest.get("count") != int(np.prod(array.cdata_shape)):
        raise _damaged(array, array.path, f"not the array that was marked complete ({manifest.get('count')} chunks "
                                          f"recorded, {int(np.prod(array.cdata_shape))} now)")
    keys = list(_covering(array, start, stop))

    async def exist():
        return await asyncio.gather(*(array.store.exists(key) for key in keys))

    for key, present in zip(keys, sync(exist())):
        if not present:
            raise _damaged(array, key, "missing (a chunk file was deleted or lost)")


def read(array: zarr.Array, start: int | None = None, stop: int | None = None, group: zarr.Group | None = None) -> np.ndarray:
    """``array[start:stop]`` (all of it when None), refusing an absent chunk and naming a damaged one, in one line.

    ``group``: the array's group, whose complete mark holds its manifest (see ``check_chunks``)."""
    check_chunks(array, start, stop, group)
    try:
        return array[...] if start is None else array[start:stop]
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged chunk raises whatever its codec raises
        first = (str(exc).splitlines() or [type(exc).__name__])[0].split(". Stored:")[0][:80]
        for key in _covering(array, start, stop):  # which chunk: only on this error path
            index = tuple(int(i) for i in key.rsplit("/c", 1)[-1].strip("/").split("/") if i)
            selection = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, array.chunks))
            try:
                array[selection]
            except Exception:  # noqa: BLE001
                raise _damaged(array, key, f"damaged ({first})") from None
        raise _damaged(array, array.path, f"unreadable ({first})") from None


def read_array(group: zarr.Group, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """The array ``name`` (a path below ``group``) of a complete group, read with ``read``; a missing array is
    one line, not a KeyError."""
    if "/" in name:
        parent, name = name.rsplit("/", 1)
        group = member(group, parent)
        if not isinstance(group, zarr.Group):
            raise _damaged_group(group, parent)
    array = member(group, name)
    if not isinstance(array, zarr.Array):
        raise _damaged_group(group, name)
    return read(array, start, stop, group)


def _damaged_group(group: zarr.Group, name: str) -> PipelineError:
    where, key = location_of(group.store), f"{group.path}/{name}".strip("/")
    return PipelineError(f"{key} is missing in store {where} although {key.rsplit('/', 1)[0]} is marked complete; "
                         f"run {quoted('verify', where, '--repair')}, then the commands it prints")
