"""Open a LoRA dataset from where researchers keep it, as HuggingFace datasets plus a fingerprint.

Accepted: a local ``save_to_disk`` folder (Dataset or DatasetDict); a folder or glob of parquet or
arrow files; a folder of ``.safetensors`` adapters with a labels CSV; a hub dataset id; ``zoo:digits``
(the trained zoo of pipeline/zoo.py, built under stores/builtin/ on first use).

A labels CSV is UTF-8 (a byte-order mark is allowed), one row per file; a column's type comes from
all its values (int64 if every value is an integer, float64 if every value is a number, else
string; an empty cell is missing). A damaged or unreadable file is one PipelineError naming it.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open

from .errors import PipelineError
from .provenance import content_hash, digest

LABELS_CSV_NAMES = ("labels.csv", "metadata.csv")


@dataclass(frozen=True)
class Source:
    """An opened source: its splits as datasets (memory-mapped Arrow tables) and what identifies it."""

    uri: str
    kind: str  # save_to_disk | files | safetensors | hub | zoo
    splits: dict[str, datasets.Dataset]
    fingerprint: str


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


def open_source(uri: str, labels_csv: str | None = None, quiet: bool = False) -> Source:
    """Open ``uri``; see the module docstring for what it may be. ``quiet``: no datasets progress bars."""
    kind = _kind_of(uri)
    if labels_csv and kind != "safetensors":  # refuse rather than ignore, and before opening: the user meant these labels
        raise PipelineError(f"--labels-csv is only for a folder of .safetensors adapters, but {uri!r} is a {kind} source "
                            "whose labels are its own columns; drop --labels-csv")
    with _datasets_output(quiet):
        return _open(uri, kind, labels_csv)


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
    return "files" if _data_files(str(path)) else None


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
    if path.exists() or any(ch in uri for ch in "*?[") or uri.startswith((".", "/", "~")):
        raise PipelineError(
            f"source {uri!r} holds no dataset: expected a save_to_disk folder, parquet/arrow files, "
            "or .safetensors adapters with a labels CSV"
        )
    if "/" not in uri:
        raise PipelineError(f"source {uri!r} does not exist; give a local folder, a glob of parquet/arrow files, or a hub id like owner/name")
    return "hub"


def _open(uri: str, kind: str, labels_csv: str | None) -> Source:
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
    if kind == "safetensors":
        return _open_safetensors_folder(path, labels_csv)
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
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
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


# --- a folder of .safetensors adapters plus a labels CSV -------------------------------------------


def _find_labels_csv(folder: Path, labels_csv: str | None) -> Path:
    if labels_csv:
        path = Path(labels_csv).expanduser()
        if not path.exists():
            raise PipelineError(f"labels CSV {labels_csv!r} does not exist")
        if not path.is_file():
            raise PipelineError(f"labels CSV {labels_csv!r} is a folder, not a file; give the path of the CSV file itself")
        return path
    for name in LABELS_CSV_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise PipelineError(f"{folder} holds .safetensors adapters but no labels CSV; add labels.csv (file,<label>,...) or pass --labels-csv")


def _csv_text(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PipelineError(f"labels CSV {path} is UTF-16 encoded, not UTF-8; save it as UTF-8 (CSV UTF-8 in spreadsheet programs)")
    try:
        return data.decode("utf-8-sig")  # -sig: a spreadsheet's byte-order mark must not become part of the first column's name
    except UnicodeDecodeError as exc:
        raise PipelineError(f"labels CSV {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                            "save it as UTF-8") from None


def _read_labels(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(label column names, file name -> that file's label texts); refuses what csv would silently accept."""
    try:
        # blank lines, and the all-empty rows spreadsheets leave below the data, are not rows
        lines = [row for row in csv.reader(io.StringIO(_csv_text(path), newline="")) if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise PipelineError(f"labels CSV {path} is not valid CSV ({exc}); fix it") from None
    if len(lines) < 2:
        raise PipelineError(f"labels CSV {path} has no rows")
    header = [name.strip() for name in lines[0]]
    for i, name in enumerate(header):
        if not name:
            raise PipelineError(f"labels CSV {path}: column {i + 1} of the header has no name; name it or remove it")
        if header.index(name) != i:
            raise PipelineError(f"labels CSV {path} has column {name!r} twice; rename one")
    key = next((i for i, c in enumerate(header) if c.lower() in ("file", "filename", "file_name", "path")), 0)
    labels, line_of = {}, {}
    for number, row in enumerate(lines[1:], start=2):
        if len(row) != len(header):
            raise PipelineError(f"labels CSV {path}: row {number} has {len(row)} fields but the header has {len(header)}; fix that row")
        name = Path(row[key].strip()).name
        if name in labels:
            raise PipelineError(f"labels CSV {path} lists {name!r} twice (rows {line_of[name]} and {number}); keep one row per file")
        labels[name], line_of[name] = [v for i, v in enumerate(row) if i != key], number
    columns = [c for i, c in enumerate(header) if i != key]
    if "file" in columns:
        raise PipelineError(f"labels CSV {path} has a label column named 'file', which holds each row's file name; rename it")
    return columns, labels


_INT = re.compile(r"^[+-]?\d+$")
_INT64 = 2**63


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "_" not in text  # Python reads 1_000 as a number; a CSV means text by it


def column_type(texts: list[str]) -> str:
    """The type of a CSV column from all its values: int64 if all are integers, float64 if all are numbers, else string.

    Empty values are missing and do not vote.
    """
    present = [t.strip() for t in texts if t.strip()]
    if all(_INT.match(t) and -_INT64 <= int(t) < _INT64 for t in present):
        return "int64"
    if all(_is_float(t) for t in present):
        return "float64"
    return "string"


def csv_value(text: str, kind: str):
    """One CSV cell as a value of its column's type (None when empty)."""
    if not text.strip():
        return None
    return int(text) if kind == "int64" else float(text) if kind == "float64" else text


def _load_adapter(path: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:  # numpy and Arrow have no bfloat16; float32 holds it exactly
            tensor = tensor.float()
        out[name] = tensor.numpy()
    return out


def _headers(files: list[Path]) -> dict[str, dict[str, tuple[str, int]]]:
    """file name -> tensor name -> (safetensors dtype, ndim), from the headers only."""
    out = {}
    for path in files:
        with _reading(f"safetensors file {path}"), safe_open(str(path), framework="numpy") as handle:
            out[path.name] = {name: (handle.get_slice(name).get_dtype(), len(handle.get_slice(name).get_shape()))
                              for name in handle.keys()}
    return out


def _tensor_features(headers: dict[str, dict[str, tuple[str, int]]], files: list[Path]) -> dict[str, object]:
    """One Arrow feature per tensor: float16 only if every file stores it as F16 (else Arrow would cut the others)."""
    first = headers[files[0].name]
    for path in files[1:]:
        if set(headers[path.name]) != set(first):
            raise PipelineError(f"{path.name} has different tensor names than {files[0].name}; keep one naming scheme per folder")
        for name, (_, ndim) in headers[path.name].items():
            if ndim != first[name][1]:
                raise PipelineError(f"tensor {name!r} is {ndim}-D in {path.name} but {first[name][1]}-D in {files[0].name}; "
                                    "every adapter must have the same tensor layout")
    features = {}
    for name, (_, ndim) in first.items():
        kinds = {headers[f.name][name][0] for f in files}
        # float64 stays float64 here, so materialize can tell a value too large for float32 from a NaN of the source.
        feature = datasets.Value("float16" if kinds == {"F16"} else "float64" if "F64" in kinds else "float32")
        for _ in range(ndim):
            feature = datasets.List(feature)
        features[name] = feature
    return features


def _open_safetensors_folder(folder: Path, labels_csv: str | None) -> Source:
    files = sorted(folder.glob("*.safetensors"))
    csv_path = _find_labels_csv(folder, labels_csv)
    label_columns, labels = _read_labels(csv_path)
    names = {f.name for f in files}
    missing = sorted(names - set(labels))
    if missing:
        raise PipelineError(f"{len(missing)} adapter file(s) have no row in {csv_path.name}, e.g. {missing[0]!r}; add them or remove the files")
    unknown = sorted(set(labels) - names)
    if unknown:
        raise PipelineError(f"{csv_path.name} names {len(unknown)} file(s) not in {folder}, e.g. {unknown[0]!r}")
    features = _tensor_features(_headers(files), files)  # headers only: refuse mixed layouts before converting anything
    clash = sorted(set(features) & set(label_columns))
    if clash:
        raise PipelineError(f"{csv_path.name} has a label column {clash[0]!r} named like a tensor of the adapters; rename it")
    kinds = {c: column_type([labels[f.name][i] for f in files]) for i, c in enumerate(label_columns)}
    features.update({c: datasets.Value(kind) for c, kind in kinds.items()})
    features["file"] = datasets.Value("string")

    def rows(paths):
        for path in paths:
            row = dict(_load_adapter(Path(path)))
            texts = labels[Path(path).name]
            row.update({c: csv_value(texts[i], kinds[c]) for i, c in enumerate(label_columns)})
            row["file"] = Path(path).name
            yield row

    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    fingerprint = _digest({"kind": "safetensors", "files": stats, "csv": digest(csv_path.read_bytes(), length=64)})
    with _reading(f"the safetensors adapters in {folder}"):
        dataset = datasets.Dataset.from_generator(
            rows, features=datasets.Features(features), gen_kwargs={"paths": [str(f) for f in files]}, fingerprint=fingerprint
        )
    return Source(str(folder), "safetensors", {"train": dataset}, fingerprint)
