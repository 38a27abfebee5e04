"""Open a LoRA dataset from where researchers keep it, as HuggingFace datasets plus a fingerprint.

Accepted: a local ``save_to_disk`` folder (Dataset or DatasetDict); a folder or glob of parquet or
arrow files; a folder of ``.safetensors`` adapters with a labels CSV; a hub dataset id; ``zoo:digits``
(the trained zoo of pipeline/zoo.py, built under stores/builtin/ on first use).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from safetensors import safe_open

from .errors import PipelineError

LABELS_CSV_NAMES = ("labels.csv", "metadata.csv")


@dataclass(frozen=True)
class Source:
    """An opened source: its splits as datasets (memory-mapped Arrow tables) and what identifies it."""

    uri: str
    kind: str  # save_to_disk | files | safetensors | hub | zoo
    splits: dict[str, datasets.Dataset]
    fingerprint: str


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


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


def open_source(uri: str, labels_csv: str | None = None) -> Source:
    """Open ``uri``; see the module docstring for what it may be."""
    if uri.startswith("zoo:"):
        from .zoo import builtin_zoo

        splits = _as_splits(datasets.load_from_disk(str(builtin_zoo(uri))))
        return Source(uri, "zoo", splits, _fingerprint_of(splits, "save_to_disk"))
    path = Path(uri).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        splits = _as_splits(datasets.load_from_disk(str(path)))
        return Source(str(path), "save_to_disk", splits, _fingerprint_of(splits, "save_to_disk"))
    if path.is_dir() and any(path.glob("*.safetensors")):
        return _open_safetensors_folder(path, labels_csv)
    files = _data_files(uri)
    if files:
        return _open_files(uri, files)
    if path.exists() or any(ch in uri for ch in "*?[") or uri.startswith((".", "/", "~")):
        raise PipelineError(
            f"source {uri!r} holds no dataset: expected a save_to_disk folder, parquet/arrow files, "
            "or .safetensors adapters with a labels CSV"
        )
    if "/" not in uri:
        raise PipelineError(f"source {uri!r} does not exist; give a local folder, a glob of parquet/arrow files, or a hub id like owner/name")
    return _open_hub(uri)


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
    loaded = datasets.load_dataset(builder, data_files=by_split)
    splits = _as_splits(loaded)
    stats = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    return Source(uri, "files", splits, _fingerprint_of(splits, "files", stats))


def _open_hub(name: str) -> Source:
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # offline, unknown id, private: all end the same way for the user
        raise PipelineError(f"could not load hub dataset {name!r}: {str(exc).splitlines()[0]}") from None
    splits = _as_splits(loaded)
    return Source(name, "hub", splits, _fingerprint_of(splits, "hub"))


# --- a folder of .safetensors adapters plus a labels CSV -------------------------------------------


def _find_labels_csv(folder: Path, labels_csv: str | None) -> Path:
    if labels_csv:
        path = Path(labels_csv).expanduser()
        if not path.exists():
            raise PipelineError(f"labels CSV {labels_csv!r} does not exist")
        return path
    for name in LABELS_CSV_NAMES:
        if (folder / name).exists():
            return folder / name
    raise PipelineError(f"{folder} holds .safetensors adapters but no labels CSV; add labels.csv (file,<label>,...) or pass --labels-csv")


def _read_labels(path: Path) -> tuple[str, dict[str, dict[str, str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise PipelineError(f"labels CSV {path} has no rows")
    columns = list(rows[0])
    key = next((c for c in columns if c.lower() in ("file", "filename", "file_name", "path")), columns[0])
    return key, {Path(row[key]).name: row for row in rows}


def _csv_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


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


def _adapter_features(sample: dict[str, np.ndarray], labels: dict[str, object]) -> datasets.Features:
    features = {}
    for name, array in sample.items():
        value = datasets.Value("float16" if array.dtype == np.float16 else "float32")
        if array.ndim == 0:
            features[name] = value
        else:
            feature = value
            for _ in range(array.ndim):
                feature = datasets.List(feature)
            features[name] = feature
    for name, value in labels.items():
        features[name] = datasets.Value("int64" if isinstance(value, int) else "float64" if isinstance(value, float) else "string")
    return datasets.Features(features)


def _open_safetensors_folder(folder: Path, labels_csv: str | None) -> Source:
    files = sorted(folder.glob("*.safetensors"))
    csv_path = _find_labels_csv(folder, labels_csv)
    key, labels = _read_labels(csv_path)
    names = {f.name for f in files}
    missing = sorted(names - set(labels))
    if missing:
        raise PipelineError(f"{len(missing)} adapter file(s) have no row in {csv_path.name}, e.g. {missing[0]!r}; add them or remove the files")
    unknown = sorted(set(labels) - names)
    if unknown:
        raise PipelineError(f"{csv_path.name} names {len(unknown)} file(s) not in {folder}, e.g. {unknown[0]!r}")
    names_of = {}
    for path in files:  # headers only: refuse mixed naming schemes before converting anything
        with safe_open(str(path), framework="numpy") as handle:
            names_of[path.name] = set(handle.keys())
    for path in files[1:]:
        if names_of[path.name] != names_of[files[0].name]:
            raise PipelineError(f"{path.name} has different tensor names than {files[0].name}; keep one naming scheme per folder")
    label_columns = [c for c in labels[files[0].name] if c != key]
    first = _load_adapter(files[0])
    first_labels = {c: _csv_value(labels[files[0].name][c]) for c in label_columns}
    features = _adapter_features(first, first_labels)
    features["file"] = datasets.Value("string")

    def rows(paths):
        for path in paths:
            row = dict(_load_adapter(Path(path)))
            row.update({c: _csv_value(labels[Path(path).name][c]) for c in label_columns})
            row["file"] = Path(path).name
            yield row

    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    fingerprint = _digest({"kind": "safetensors", "files": stats, "csv": hashlib.sha256(csv_path.read_bytes()).hexdigest()})
    dataset = datasets.Dataset.from_generator(
        rows, features=features, gen_kwargs={"paths": [str(f) for f in files]}, fingerprint=fingerprint
    )
    return Source(str(folder), "safetensors", {"train": dataset}, fingerprint)
