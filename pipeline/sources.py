"""Open a LoRA dataset from where researchers keep it, as HuggingFace datasets plus a fingerprint.

Accepted: a local ``save_to_disk`` folder (Dataset or DatasetDict); a folder or glob of parquet or
arrow files; a folder of ``.safetensors`` adapters in any of the layouts of pipeline/adapters.py
(flat, a folder per adapter, split folders, labels from a file and/or <label>/ folders); a hub
dataset id; ``zoo:digits`` (the trained zoo of pipeline/zoo.py, built under stores/builtin/ on first use).

A labels CSV is UTF-8 (a byte-order mark is allowed), one row per adapter; a column's type comes from
all its values (int64 if every value is an integer, float64 if every value is a number, else
string; an empty cell is missing). A damaged or unreadable file is one PipelineError naming it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open

from . import adapters, fileread
from .adapters import column_type, csv_value  # noqa: F401  (their home was here)
from .errors import PipelineError
from .provenance import content_hash, digest



@dataclass(frozen=True)
class Source:
    """An opened source: its splits as datasets (memory-mapped Arrow tables) and what identifies it."""

    uri: str
    kind: str  # save_to_disk | files | safetensors | hub | zoo
    splits: dict[str, datasets.Dataset]
    fingerprint: str
    alpha_from: dict[str, str] = field(default_factory=dict)  # alpha column -> tensor | adapter_config.json | lora_adapter_metadata
    notes: tuple[str, ...] = ()  # warnings about the source, said before anything is written
    files: fileread.FileTensors | None = None  # a folder of adapter files: the weights stay in them, read by materialize


def _digest(payload) -> str:
    return content_hash(payload, length=32, default=str)  # 32, str: the fingerprints stores hold


def _fingerprint_of(splits: dict[str, datasets.Dataset], kind: str, extra=None) -> str:
    # datasets' own fingerprint identifies the content (state.json for save_to_disk, the data files'
    # paths and modification times for parquet/arrow, the revision for the hub).
    return _digest({
        "kind": kind,
        "extra": extra,
        "splits": {name: [ds._fingerprint, ds.num_rows, str(ds.features)] for name, ds in sorted(splits.items())},
    })


def _as_splits(loaded) -> dict[str, datasets.Dataset]:
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {"train": loaded}


def open_source(uri: str, labels_csv: str | None = None, quiet: bool = False, split_column: str | None = None,
                verify_source: bool = False) -> Source:
    """Open ``uri``; see the module docstring for what it may be. ``quiet``: no datasets progress bars.

    ``labels_csv``: the labels file (CSV, JSON or JSONL) of a folder of adapters; ``split_column``: its
    column that holds each adapter's split; ``verify_source``: fingerprint the adapter files by their content
    (a sha256 of every byte) rather than by name, size and modification time.
    """
    kind = _kind_of(uri)
    for option, value in (("--labels-csv", labels_csv), ("--split-column", split_column), ("--verify-source", verify_source)):
        if value and kind != "safetensors":  # refuse rather than ignore, and before opening: the user meant these labels
            raise PipelineError(f"{option} is only for a folder of .safetensors adapters, but {uri!r} is a {kind} source "
                                f"whose labels and splits are its own columns; drop {option}")
    with _datasets_output(quiet):
        if kind == "safetensors":
            return _open_safetensors_folder(Path(uri).expanduser(), labels_csv, split_column, quiet, verify_source)
        return _open(uri, kind)


DATASET_KINDS = {"save_to_disk": "a save_to_disk folder", "safetensors": "a folder of .safetensors adapters",
                 "files": "a folder of parquet/arrow files"}


def dataset_kind(path: str | Path) -> str | None:
    """save_to_disk, safetensors or files when the local folder holds a dataset ``materialize --source`` reads
    (judged by its file names alone), else None."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return "save_to_disk"
    if any(path.glob("*.safetensors")):
        return "safetensors"
    if _data_files(str(path)):
        return "files"
    if any(not any(part.startswith(".") for part in p.relative_to(path).parts) for p in path.rglob("*.safetensors")):
        return "safetensors"  # adapters in folders, at any depth
    return None


def _kind_of(uri: str) -> str:
    """zoo | save_to_disk | safetensors | files | hub, from the path alone; refuses a path that holds none."""
    path = Path(uri).expanduser()
    if uri.startswith("zoo:"):
        return "zoo"
    kind = dataset_kind(path)
    if kind is not None:
        return kind
    if _data_files(uri):  # a glob
        return "files"
    if path.is_dir():  # a folder that holds none of the layouts
        raise PipelineError(adapters.no_adapters_message(path))
    if path.exists() or any(ch in uri for ch in "*?[") or uri.startswith((".", "/", "~")):
        raise PipelineError(
            f"source {uri!r} holds no dataset: expected a save_to_disk folder, parquet/arrow files, "
            "or .safetensors adapters with a labels CSV"
        )
    if "/" not in uri:
        raise PipelineError(f"source {uri!r} does not exist; give a local folder, a glob of parquet/arrow files, or a hub id like owner/name")
    return "hub"


def _open(uri: str, kind: str) -> Source:
    path = Path(uri).expanduser()
    if kind == "zoo":
        from .zoo import builtin_zoo

        splits = _as_splits(datasets.load_from_disk(str(builtin_zoo(uri))))
        return Source(uri, "zoo", splits, _fingerprint_of(splits, "save_to_disk"))
    if kind == "save_to_disk":
        _check_saved_layout(path)
        with _reading(f"save_to_disk folder {path}"):
            splits = _as_splits(datasets.load_from_disk(str(path)))
        return Source(str(path), "save_to_disk", splits, _fingerprint_of(splits, "save_to_disk"))
    if kind == "files":
        return _open_files(uri, _data_files(uri))
    return _open_hub(uri)


@contextlib.contextmanager
def _datasets_output(quiet: bool):
    """datasets' progress bars off under ``quiet``; its log lines off always, since a failure is said once, by us."""
    bars_were_on = not datasets.are_progress_bars_disabled()
    if quiet and bars_were_on:
        datasets.disable_progress_bars()
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub", "fsspec")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if quiet and bars_were_on:
            datasets.enable_progress_bars()


def _innermost_message(exc: BaseException) -> str:
    # datasets wraps the reader's error (DatasetGenerationError from an ArrowInvalid): the inner one says what is wrong.
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def _reading(what: str):
    """Any failure of a reader (truncated, garbage, mismatched file) becomes one line naming ``what``."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"cannot read {what}: {_innermost_message(exc)}; the file is damaged or not in that format") from None


def _check_saved_layout(path: Path) -> None:
    """Refuse a save_to_disk folder whose JSON is damaged, or names a split that is missing or empty."""
    if (path / "dataset_dict.json").exists():
        listing = _json_file(path / "dataset_dict.json")
        names = listing.get("splits") if isinstance(listing, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PipelineError(f"{path / 'dataset_dict.json'} has no list of splits; the folder is damaged: save it again")
        folders = [path / name for name in names]
    else:
        folders = [path]
    for folder in folders:
        if not (folder / "state.json").is_file():
            raise PipelineError(f"{path / 'dataset_dict.json'} names split {folder.name!r} but {folder} has no state.json; "
                                "restore that split or remove it from dataset_dict.json")
        state = _json_file(folder / "state.json")
        files = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(files, list):
            raise PipelineError(f"{folder / 'state.json'} lists no data files; the folder is damaged: save it again")
        if not files:
            raise PipelineError(f"source split {folder.name!r} has no rows; remove it or add rows")


def _json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); the folder is damaged: save it again") from None


def _data_files(uri: str) -> list[str]:
    path = Path(uri).expanduser()
    if path.is_dir():
        candidates = sorted(str(p) for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
    else:
        candidates = sorted(p for p in glob.glob(os.path.expanduser(uri)) if p.endswith((".parquet", ".arrow")))
    return candidates


def _split_of(file: str) -> str:
    stem = Path(file).name.lower()
    for name, aliases in (("test", ("test",)), ("validation", ("validation", "valid", "val")), ("train", ("train",))):
        if any(stem.startswith(a) or f"-{a}" in stem or f"_{a}" in stem or f"/{a}/" in file for a in aliases):
            return name
    return "train"


def _open_files(uri: str, files: list[str]) -> Source:
    by_split: dict[str, list[str]] = {}
    for file in files:
        by_split.setdefault(_split_of(file), []).append(file)
    builder = "parquet" if files[0].endswith(".parquet") else "arrow"
    if any(not f.endswith(f".{builder}") for f in files):
        raise PipelineError(f"source {uri!r} mixes parquet and arrow files; keep one format per source")
    _check_file_schemas(by_split, builder)
    with _reading(f"the {builder} files of {uri!r}"):
        loaded = datasets.load_dataset(builder, data_files=by_split)
    splits = _as_splits(loaded)
    stats = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    return Source(uri, "files", splits, _fingerprint_of(splits, "files", stats))


def _file_schema(file: str, builder: str) -> pa.Schema:
    with _reading(f"{builder} file {file}"):
        if builder == "parquet":
            return pq.read_schema(file)
        with pa.memory_map(file) as handle:  # datasets writes the IPC stream format; accept the file format too
            try:
                return pa.ipc.open_stream(handle).schema
            except pa.ArrowInvalid:
                handle.seek(0)
                return pa.ipc.open_file(handle).schema


def _check_file_schemas(by_split: dict[str, list[str]], builder: str) -> None:
    """Every file must be readable and have the same column names: say which file differs, before loading any."""
    first_file, first = None, None
    for files in by_split.values():
        for file in files:
            names = _file_schema(file, builder).names
            if first is None:
                first_file, first = file, names
            elif sorted(names) != sorted(first):
                extra, lacking = sorted(set(names) - set(first)), sorted(set(first) - set(names))
                raise PipelineError(f"{file} has different columns than {first_file} (extra: {', '.join(extra) or 'none'}; "
                                    f"lacking: {', '.join(lacking) or 'none'}); keep one schema per source")


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the hub answers a TCP connect within ``timeout``, else why not (so we fail fast, not after retries)."""
    from urllib.parse import urlparse

    endpoint = urlparse(datasets.config.HF_ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)), timeout=timeout).close()
        return None
    except OSError as exc:
        return f"cannot reach {endpoint.hostname} ({exc.strerror or exc})"


def _open_hub(name: str) -> Source:
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not datasets.config.HF_HUB_OFFLINE and not proxied:  # behind a proxy a direct connect proves nothing
        unreachable = _hub_reachable()
        if unreachable:
            raise PipelineError(f"hub dataset {name!r}: {unreachable}; connect to the network, set HF_HUB_OFFLINE=1 to use "
                                "a cached copy, or give a local folder")
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # offline, unknown id, private: all end the same way for the user
        hint = " (HF_HUB_OFFLINE is set: only cached datasets load)" if datasets.config.HF_HUB_OFFLINE else ""
        raise PipelineError(f"could not load hub dataset {name!r}: {str(exc).splitlines()[0]}{hint}") from None
    splits = _as_splits(loaded)
    return Source(name, "hub", splits, _fingerprint_of(splits, "hub"))


# --- a folder of .safetensors adapters (pipeline/adapters.py finds them, their splits and labels) -------


def _label_table(found: adapters.Found, labels_csv: str | None) -> adapters.LabelFile | dict[str, adapters.LabelFile] | None:
    """The labels file given (--labels-csv, any of CSV/JSON/JSONL), else the source's own, else one per split folder."""
    if labels_csv:
        path = Path(labels_csv).expanduser()
        if not path.exists():
            raise PipelineError(f"labels file {labels_csv!r} does not exist")
        if not path.is_file():
            raise PipelineError(f"labels file {labels_csv!r} is a folder, not a file; give the path of the labels file itself")
        return adapters.read_label_file(path)
    if None in found.label_files:
        return adapters.read_label_file(found.label_files[None])
    if found.label_files:
        return {split: adapters.read_label_file(path) for split, path in found.label_files.items()}
    return None


def _labels_of(found: adapters.Found, labels_csv: str | None) -> tuple[dict[str, str], list[dict], list[Path]]:
    """(column -> datasets dtype, each adapter's labels, the labels files read), from files and <label>/ folders."""
    table = _label_table(found, labels_csv)
    kinds: dict[str, str] = {}
    values: list[dict] = [{} for _ in found.adapters]
    read: list[Path] = []
    if isinstance(table, adapters.LabelFile):
        rows = adapters.match_labels(table, found.adapters, found.split_folders, found.root)
        kinds = dict(table.kinds)
        values = [dict(zip(table.columns, row)) for row in rows]
        read = [table.path]
    elif table:  # one file per split folder: each keys its own split's adapters
        columns = None
        for split, part in table.items():
            if columns is not None and part.columns != columns:
                raise PipelineError(f"{part.path} has other label columns than {read[0]}; give every split's file the same columns")
            columns = part.columns
            members = [i for i, a in enumerate(found.adapters) if a.split == split]
            for i, row in zip(members, adapters.match_labels(part, [found.adapters[i] for i in members], False, part.path.parent)):
                values[i] = dict(zip(part.columns, row))
            read.append(part.path)
        kinds = {c: _merged_kind([t.kinds[c] for t in table.values()]) for c in columns}
    folders = adapters.folder_labels(found, have_file=bool(read))
    if folders is not None:
        if adapters.FOLDER_LABEL in kinds:
            raise PipelineError(f"{read[0].name} has a column {adapters.FOLDER_LABEL!r} and the adapters also lie in <label>/ "
                                f"folders, which give that label; rename the column")
        kinds[adapters.FOLDER_LABEL] = "string"
        for row, folder in zip(values, folders):
            row[adapters.FOLDER_LABEL] = folder
    if not kinds:
        raise PipelineError(f"{found.root} holds .safetensors adapters but no labels CSV, JSON or JSONL file and no <label>/ "
                            "folders; add labels.csv (file,<label>,...) or pass --labels-csv")
    return kinds, values, read


def _merged_kind(kinds: list[str]) -> str:
    found = set(kinds)
    return found.pop() if len(found) == 1 else "float64" if found <= {"int64", "float64"} else "string"


def _apply_split_column(found: adapters.Found, kinds: dict, values: list[dict], column: str | None) -> list[str]:
    """Each adapter's source split: its split folder's, or the labels column ``column`` (then no longer a label)."""
    if column is None:
        return [a.split for a in found.adapters]
    if found.split_folders:
        raise PipelineError(f"--split-column {column} but {found.root} has split folders, which give the splits; use one of the two")
    if column not in kinds:
        raise PipelineError(f"--split-column {column!r} is not a labels column; the columns are {', '.join(sorted(kinds))}")
    kinds.pop(column)
    splits = []
    for adapter, row in zip(found.adapters, values):
        value = row.pop(column)
        if value is None or not str(value).strip():
            raise PipelineError(f"adapter {adapter.id!r} has no value in split column {column!r}; give every adapter its split")
        splits.append(adapters.SPLIT_FOLDERS.get(str(value).strip().lower(), str(value).strip()))
    return splits


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    hasher = hashlib.sha256()  # streamed: provenance.digest takes bytes in memory, and adapter files can be large
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _source_fingerprint(found: adapters.Found, label_paths: list[Path], split_column: str | None, verify: bool, quiet: bool) -> str:
    """The files' paths, sizes and mtimes (their content hashes under ``verify``), the labels files' and the peft configs'
    bytes: a flat folder with a CSV keeps the fingerprint it always had."""
    from tqdm import tqdm

    stats = []
    total = sum(adapters.os_stat(a.file)[0] for a in found.adapters) if verify else 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing adapter files", disable=quiet or not verify, file=sys.stderr) as bar:
        for a in found.adapters:
            size, mtime = adapters.os_stat(a.file)
            stats.append((a.file.relative_to(found.root).as_posix(), size, _file_digest(a.file) if verify else mtime))
            bar.update(size if verify else 0)
    payload = {"kind": "safetensors", "files": stats}
    if verify:
        payload["content"] = "sha256"
    if len(label_paths) == 1:
        payload["csv"] = digest(label_paths[0].read_bytes(), length=64)
    elif label_paths:
        payload["label_files"] = [(str(p.relative_to(found.root)), digest(p.read_bytes(), length=64)) for p in label_paths]
    configs = sorted((a.split, a.id, a.config) for a in found.adapters if a.config is not None)
    if configs:  # by adapter, not by the config's path: that depends on how the source folder was typed
        payload["configs"] = [(split, id_, digest(c.read_bytes(), length=64)) for split, id_, c in configs]
    if split_column:
        payload["split_column"] = split_column
    return _digest(payload)


def _open_safetensors_folder(folder: Path, labels_csv: str | None, split_column: str | None = None, quiet: bool = True,
                             verify: bool = False) -> Source:
    """The adapters under ``folder``: labels as small in-memory datasets, weights left in their files (read by materialize)."""
    found = adapters.find(folder)
    kinds, label_values, label_paths = _labels_of(found, labels_csv)
    splits_of = _apply_split_column(found, kinds, label_values, split_column)
    notes = []
    if split_column is None and "split" in kinds:
        notes.append("labels column 'split' is stored as a label; pass --split-column split to use it as the split")
    tensors = fileread.scan(found, splits_of, quiet)  # headers only: refuse mixed layouts before reading any weight
    clash = sorted(set(tensors.shapes) & set(kinds))
    if clash:
        raise PipelineError(f"{label_paths[0].name if label_paths else 'a <label>/ folder'} has a label column {clash[0]!r} "
                            "named like a tensor of the adapters; rename it")
    features = datasets.Features({**{c: datasets.Value(kind) for c, kind in kinds.items()}, "file": datasets.Value("string")})
    fingerprint = _source_fingerprint(found, label_paths, split_column, verify, quiet)
    splits = {}
    for split in tensors.splits:  # in memory: a few label columns, no weights, nothing written to a cache
        members = [i for i, s in enumerate(splits_of) if s == split]
        data = {c: [label_values[i].get(c) for i in members] for c in kinds}
        data["file"] = [found.adapters[i].id for i in members]
        splits[split] = datasets.Dataset.from_dict(data, features=features)
    return Source(str(folder), "safetensors", splits, fingerprint, alpha_from=tensors.alpha_from, notes=tuple(notes),
                  files=tensors)
