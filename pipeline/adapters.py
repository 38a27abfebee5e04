"""Adapters as people keep them: find the .safetensors adapters under a folder, their splits and labels.

Layouts (docs/materialize.md shows a tree for each), at any depth below the source folder:

- a file per adapter: ``<name>.safetensors`` (diffusers, kohya/webui with ``.alpha`` tensors, ...);
- a folder per adapter: diffusers' ``pytorch_lora_weights.safetensors``, or peft's
  ``adapter_model.safetensors`` + ``adapter_config.json``; the folder is the adapter;
- optional split folders ``train/``, ``validation/`` (or ``val/``, ``valid/``), ``test/`` right below
  the source, kept as the store's splits;
- labels from a CSV, JSON or JSONL file keyed by the adapter's file or folder name (with or without
  extension, or its path), and/or from the name of the folder an adapter lies in (``<label>/<adapter>``).

Everything here reads names, sizes, headers and the small JSON files only, never a weight value.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipelineError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
ADAPTER_FILES = (DIFFUSERS_FILE, PEFT_FILE)
LABEL_FILES = ("labels.csv", "metadata.csv", "labels.jsonl", "metadata.jsonl", "labels.json", "metadata.json")
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}
FOLDER_LABEL = "label"  # the label column the <label>/ folders give (the imagefolder convention's name)
_KEY_COLUMNS = ("file", "filename", "file_name", "path", "adapter", "model_id", "id")
_SUFFIX = ".safetensors"

LAYOUTS_LOOKED_FOR = (
    "<name>.safetensors files (flat, or in <label>/ folders), a folder per adapter holding "
    f"{DIFFUSERS_FILE} (diffusers) or {PEFT_FILE} + {PEFT_CONFIG} (peft), optionally under train/ val/ test/ "
    "split folders; a save_to_disk folder; parquet/arrow files"
)


@dataclass(frozen=True)
class Adapter:
    """One adapter found under the source folder."""

    file: Path  # its .safetensors file
    id: str  # its file's (or, for a folder adapter, its folder's) path below its split folder, with /
    split: str  # source split: train | validation | test (from its split folder, or train)
    folder: str | None  # the folder it lies in below its split folder, None at the top: a <label>/ folder
    config: Path | None = None  # the peft adapter_config.json that goes with it

    @property
    def name(self) -> str:
        return self.id.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Found:
    """What lies under a source folder: its adapters and labels files, and whether split folders were used."""

    root: Path
    adapters: list[Adapter]
    split_folders: bool
    label_files: dict[str | None, Path] = field(default_factory=dict)  # split (None: all) -> file


# --- finding the adapters -------------------------------------------------------------------------


def _visible(path: Path) -> bool:
    return not path.name.startswith((".", "__"))  # .ipynb_checkpoints, .cache, __MACOSX


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    try:
        children = sorted(p for p in folder.iterdir() if _visible(p))
    except OSError as exc:
        raise PipelineError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return [p for p in children if p.is_dir()], [p for p in children if p.is_file()]


def _walk(folder: Path, base: Path, split: str, out: list[Adapter], seen: set) -> None:
    """Every adapter at or below ``folder``; ids relative to ``base``."""
    real = folder.resolve()
    if real in seen:  # a symlink loop, or one folder linked twice
        return
    seen.add(real)
    folders, files = _entries(folder)
    names = {f.name for f in files}
    standard = [n for n in ADAPTER_FILES if n in names]
    if standard:  # a folder per adapter: the folder is the adapter; what lies below it (checkpoints) is not
        others = sorted(n for n in names if n.endswith(_SUFFIX) and n not in standard)
        if len(standard) > 1 or others:
            raise PipelineError(f"{folder} holds {', '.join(standard + others[:2])}: one adapter or several? keep one "
                                f"{' or '.join(ADAPTER_FILES)} per folder and move the other .safetensors files out")
        config = folder / PEFT_CONFIG if (folder / PEFT_CONFIG).is_file() else None
        if standard[0] == PEFT_FILE and config is None:
            raise PipelineError(f"{folder} holds {PEFT_FILE} but no {PEFT_CONFIG}: peft needs both (its lora_alpha sets the "
                                "scale of dW); copy the adapter's config beside it")
        out.append(_adapter(folder / standard[0], folder, base, split, config))
        return
    for file in files:
        if file.name.endswith(_SUFFIX):
            out.append(_adapter(file, file, base, split, _config_beside(file)))
    for sub in folders:
        _walk(sub, base, split, out, seen)


def _config_beside(file: Path) -> Path | None:
    """A single file linked into a flat folder from a peft folder keeps that folder's adapter_config.json."""
    target = file.resolve()
    if target != file.absolute() and target.name == PEFT_FILE and (target.parent / PEFT_CONFIG).is_file():
        return target.parent / PEFT_CONFIG
    return None


def _adapter(file: Path, unit: Path, base: Path, split: str, config: Path | None) -> Adapter:
    rel = unit.relative_to(base)
    parts = rel.parts
    return Adapter(file, "/".join(parts) if parts else unit.name, split, parts[-2] if len(parts) > 1 else None, config)


def _split_folders(root: Path) -> dict[str, Path]:
    """split -> its folder, for the train/ validation|val|valid/ test/ folders right below ``root``."""
    folders, _ = _entries(root)
    found: dict[str, Path] = {}
    for folder in folders:
        split = SPLIT_FOLDERS.get(folder.name.lower())
        if split is None:
            continue
        if split in found:
            raise PipelineError(f"{root} has two {split} folders, {found[split].name}/ and {folder.name}/; merge them into one")
        found[split] = folder
    return found


def find(root: Path) -> Found:
    """The adapters under ``root`` and its labels files; refuses a layout that is ambiguous."""
    splits = _split_folders(root) if not any((root / n).is_file() for n in ADAPTER_FILES) else {}
    adapters: list[Adapter] = []
    seen: set = set()
    if splits:
        for split, folder in sorted(splits.items(), key=lambda kv: ("train", "validation", "test").index(kv[0])):
            _walk(folder, folder, split, adapters, seen)
        outside: list[Adapter] = []
        folders, files = _entries(root)
        for file in files:
            if file.name.endswith(_SUFFIX):
                outside.append(_adapter(file, file, root, "train", None))
        for folder in folders:
            if folder not in splits.values():
                _walk(folder, root, "train", outside, seen)
        if outside:
            raise PipelineError(f"{root} has split folders ({', '.join(f.name + '/' for f in splits.values())}) and adapters "
                                f"outside them, e.g. {outside[0].id!r}; move every adapter into a split folder")
        empty = [f"{f.name}/" for s, f in splits.items() if not any(a.split == s for a in adapters)]
        if empty and adapters:
            raise PipelineError(f"split folder {empty[0]} of {root} holds no adapters; remove it or add adapters")
    else:
        _walk(root, root, "train", adapters, seen)
    if not adapters:
        raise PipelineError(no_adapters_message(root))
    return Found(root, adapters, bool(splits), _label_files(root, splits))


def no_adapters_message(root: Path) -> str:
    """One line: which layouts were looked for, and what the folder holds instead."""
    suffixes: dict[str, int] = {}
    folders = 0
    for path in root.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path.is_dir():
            folders += 1
        else:
            suffix = path.suffix.lower() or "(no extension)"
            suffixes[suffix] = suffixes.get(suffix, 0) + 1
    common = sorted(suffixes.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    files = sum(suffixes.values())
    held = f"{folders} folder(s) and {files} file(s)" + (f" ({', '.join(f'{n} {s}' for s, n in common)})" if common else "")
    hint = "; .bin adapters: convert them to .safetensors first" if ".bin" in suffixes else ""
    return f"source {str(root)!r} holds no dataset: looked for {LAYOUTS_LOOKED_FOR}; found {held}{hint}"


def _label_files(root: Path, splits: dict[str, Path]) -> dict[str | None, Path]:
    """The labels file of the source (None) or of each split folder (imagefolder keeps metadata.jsonl there)."""
    out: dict[str | None, Path] = {}
    for scope, folder in [(None, root)] + sorted(splits.items()):
        present = [folder / n for n in LABEL_FILES if (folder / n).is_file()]
        if len(present) > 1:
            raise PipelineError(f"{folder} has two labels files, {present[0].name} and {present[1].name}; keep one, or "
                                "pass the one to use with --labels-csv")
        if present:
            out[scope] = present[0]
    if None in out and len(out) > 1:
        other = next(p for s, p in out.items() if s is not None)
        raise PipelineError(f"labels in both {out[None]} and {other}; keep one labels file for the source or one per split folder")
    if out and None not in out and len(out) != len(splits):
        lacking = next(f"{f.name}/" for s, f in splits.items() if s not in out)
        raise PipelineError(f"split folder {lacking} has no labels file but the other split folders do; add one")
    return out


# --- labels files: CSV, JSON, JSONL ---------------------------------------------------------------


@dataclass(frozen=True)
class LabelFile:
    """A labels file read: its label columns, their kinds, and the values of each row by key."""

    path: Path
    columns: list[str]
    kinds: dict[str, str]  # column -> datasets dtype: string | int64 | float64 | bool
    rows: dict[str, list]  # key (as written) -> values, in column order (None: missing)
    line_of: dict[str, int]  # key -> its row (CSV line, JSONL line, JSON record number), for messages


def read_label_file(path: Path) -> LabelFile:
    """Read a labels file by its extension: .json and .jsonl as JSON, anything else as CSV."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _read_json_labels(path, lines=suffix == ".jsonl")
    columns, texts, line_of = _read_csv_labels(path)
    kinds = {c: column_type([row[i] for row in texts.values()]) for i, c in enumerate(columns)}
    rows = {key: [csv_value(v, kinds[c]) for c, v in zip(columns, values)] for key, values in texts.items()}
    return LabelFile(path, columns, kinds, rows, line_of)


def _text(path: Path, what: str) -> str:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PipelineError(f"{what} {path} is UTF-16 encoded, not UTF-8; save it as UTF-8 (CSV UTF-8 in spreadsheet programs)")
    try:
        return data.decode("utf-8-sig")  # -sig: a spreadsheet's byte-order mark must not become part of the first column's name
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                            "save it as UTF-8") from None


def _read_csv_labels(path: Path) -> tuple[list[str], dict[str, list[str]], dict[str, int]]:
    """(label column names, key -> that row's label texts, key -> its line); refuses what csv would silently accept."""
    try:
        # blank lines, and the all-empty rows spreadsheets leave below the data, are not rows
        lines = [row for row in csv.reader(io.StringIO(_text(path, "labels CSV"), newline="")) if any(cell.strip() for cell in row)]
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
    key = next((i for i, c in enumerate(header) if c.lower() in _KEY_COLUMNS[:4]), 0)
    labels: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    for number, row in enumerate(lines[1:], start=2):
        if len(row) != len(header):
            raise PipelineError(f"labels CSV {path}: row {number} has {len(row)} fields but the header has {len(header)}; fix that row")
        name = _normal_key(row[key])
        if name in labels:
            raise PipelineError(f"labels CSV {path} lists {name!r} twice (rows {line_of[name]} and {number}); keep one row per file")
        labels[name], line_of[name] = [v for i, v in enumerate(row) if i != key], number
    columns = [c for i, c in enumerate(header) if i != key]
    if "file" in columns:
        raise PipelineError(f"labels CSV {path} has a label column named 'file', which holds each row's file name; rename it")
    return columns, labels, line_of


def _normal_key(text: str) -> str:
    key = text.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key.rstrip("/")


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


def _json_records(path: Path, lines: bool) -> list[tuple[int, dict]]:
    what = "labels JSONL" if lines else "labels JSON"
    text = _text(path, what)
    try:
        if lines:
            records = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        else:
            loaded = json.loads(text)
            if isinstance(loaded, dict):  # {"a1.safetensors": {"label": "cat"}} or {"a1.safetensors": "cat"}
                loaded = [{"file": k, **(v if isinstance(v, dict) else {FOLDER_LABEL: v})} for k, v in loaded.items()]
            if not isinstance(loaded, list):
                raise PipelineError(f"{what} {path} is neither a list of records nor an object keyed by file; fix it")
            records = list(enumerate(loaded, start=1))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it") from None
    for number, record in records:
        if not isinstance(record, dict):
            raise PipelineError(f"{what} {path}: record {number} is not an object; write one {{\"file\": ..., <label>: ...}} per adapter")
    return records


def _read_json_labels(path: Path, lines: bool) -> LabelFile:
    what = "labels JSONL" if lines else "labels JSON"
    records = _json_records(path, lines)
    if not records:
        raise PipelineError(f"{what} {path} has no rows")
    names = {k for _, r in records for k in r}
    key = next((c for c in _KEY_COLUMNS if c in names), None)
    if key is None:
        raise PipelineError(f"{what} {path} has no key field ({', '.join(_KEY_COLUMNS)}) naming each adapter; add one")
    columns = sorted(names - {key}, key=lambda c: next(i for i, (_, r) in enumerate(records) if c in r))
    rows: dict[str, list] = {}
    line_of: dict[str, int] = {}
    for number, record in records:
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise PipelineError(f"{what} {path}: record {number} has no {key!r} text naming its adapter; add it")
        name = _normal_key(record[key])
        if name in rows:
            raise PipelineError(f"{what} {path} lists {name!r} twice (records {line_of[name]} and {number}); keep one per adapter")
        rows[name], line_of[name] = [record.get(c) for c in columns], number
    kinds = {}
    for i, column in enumerate(columns):
        kinds[column] = _json_kind(path, column, [values[i] for values in rows.values()])
    for values in rows.values():
        for i, column in enumerate(columns):
            if values[i] is not None and kinds[column] == "float64":
                values[i] = float(values[i])
    return LabelFile(path, columns, kinds, rows, line_of)


def _json_kind(path: Path, column: str, values: list) -> str:
    present = [v for v in values if v is not None]
    types = {bool if isinstance(v, bool) else int if isinstance(v, int) else float if isinstance(v, float) else str
             if isinstance(v, str) else object for v in present}
    if object in types:
        raise PipelineError(f"labels file {path}: field {column!r} holds lists or objects; labels are text, numbers or booleans")
    if types <= {str}:
        return "string"
    if types <= {bool}:
        return "bool"
    if types <= {int} and all(-_INT64 <= v < _INT64 for v in present):
        return "int64"
    if types <= {int, float} and all(math.isfinite(v) or math.isnan(v) for v in present):
        return "float64"
    raise PipelineError(f"labels file {path}: field {column!r} mixes {' and '.join(sorted(t.__name__ for t in types))} values; "
                        "give it one type")


# --- matching labels to adapters ------------------------------------------------------------------


def _keys_of(adapter: Adapter, with_split: bool) -> set[str]:
    """The names a labels file may call an adapter by: its path, its name, either without .safetensors, the file's path."""
    keys = {adapter.id, adapter.name, _stem(adapter.id), _stem(adapter.name)}
    if adapter.file.name in ADAPTER_FILES:  # imagefolder's file_name: the file itself, below the split folder
        keys.add(f"{adapter.id}/{adapter.file.name}")
    if with_split:
        keys |= {f"{split}/{k}" for k in set(keys) for split in _split_names(adapter.split)}
    return keys


def _stem(name: str) -> str:
    return name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name


def _split_names(split: str) -> list[str]:
    return [folder for folder, s in SPLIT_FOLDERS.items() if s == split]


def _by_path_suffix(key: str, index: dict[str, list[int]], adapters: list[Adapter]) -> list[int]:
    """The adapters a longer path (absolute, or from elsewhere) names: the longest tail of it that is an adapter's key.
    A tail of the file name alone fits only an adapter with no folder of its own below the split folder: where the
    path's folders and the adapter's disagree (``dog/cat0`` for ``cat/cat0``), it names no adapter."""
    parts = key.split("/")
    for start in range(1, len(parts)):
        tail = "/".join(parts[start:])
        hits = [h for h in index.get(tail, []) if "/" in tail or adapters[h].id == adapters[h].name]
        if hits:
            return hits
    return []


def match_labels(table: LabelFile, adapters: list[Adapter], with_split: bool, where: Path) -> list[list]:
    """Each adapter's row of ``table`` (values in column order); refuses missing, unknown and ambiguous keys."""
    index: dict[str, list[int]] = {}
    for i, adapter in enumerate(adapters):
        for key in _keys_of(adapter, with_split):
            index.setdefault(key, []).append(i)
    row_of: dict[int, str] = {}
    unknown = []
    for key in table.rows:
        hits = sorted(set(index.get(key) or _by_path_suffix(key, index, adapters)))
        if not hits:
            unknown.append(key)
            continue
        if len(hits) > 1:
            ids = ", ".join(f"{adapters[h].split}/{adapters[h].id}" for h in hits[:2])
            raise PipelineError(f"{table.path.name} row {table.line_of[key]} names {key!r}, which fits {len(hits)} adapters "
                                f"({ids}); two adapters share that id: key them by their path")
        if hits[0] in row_of:
            other = row_of[hits[0]]
            raise PipelineError(f"{table.path.name} rows {table.line_of[other]} and {table.line_of[key]} ({other!r} and {key!r}) "
                                f"both name adapter {adapters[hits[0]].id!r}; keep one row per adapter")
        row_of[hits[0]] = key
    missing = [a.id for i, a in enumerate(adapters) if i not in row_of]
    if missing:
        raise PipelineError(f"{len(missing)} adapter file(s) have no row in {table.path.name}, e.g. {missing[0]!r}; "
                            "add them or remove the files")
    if unknown:
        raise PipelineError(f"{table.path.name} names {len(unknown)} file(s) not in {where}, e.g. {unknown[0]!r}")
    return [table.rows[row_of[i]] for i in range(len(adapters))]


def folder_labels(found: Found, have_file: bool) -> list[str] | None:
    """Each adapter's <label>/ folder name, or None when the adapters do not lie in label folders."""
    inside = [a for a in found.adapters if a.folder is not None]
    if not inside:
        return None
    if len(inside) < len(found.adapters):
        if have_file:  # the labels file labels them all; the folders are just where they are kept
            return None
        top = next(a for a in found.adapters if a.folder is None)
        raise PipelineError(f"{len(inside)} adapters lie in <label>/ folders and {len(found.adapters) - len(inside)} do not "
                            f"(e.g. {top.id!r}); put every adapter in a label folder, or give each a row in a labels file")
    return [a.folder for a in found.adapters]


# --- alpha: the LoRA scale, dW = (alpha / r) B A --------------------------------------------------


def _peft_alpha(config: dict, module: str, rank: int, where: str) -> float:
    """The alpha for which alpha / r is peft's scale of ``module``: lora_alpha or its alpha_pattern entry, and
    lora_alpha * sqrt(r) under use_rslora (whose scale is lora_alpha / sqrt(r))."""
    alpha = config.get("lora_alpha", 8)  # peft's LoraConfig default
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise PipelineError(f"{where}: lora_alpha {alpha!r} is not a number; fix the adapter's config")
    return float(alpha) * math.sqrt(rank) if config.get("use_rslora") else float(alpha)


def _check_plain_lora(config: dict, where: str) -> None:
    if config.get("use_dora"):
        raise PipelineError(f"{where} is a DoRA adapter (use_dora): its weight is not B A alone, so it is not read here; "
                            "leave it out of the source")


def _json_config(path: Path) -> dict:
    try:
        config = json.loads(_text(path, "adapter config"))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"adapter config {path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it") from None
    if not isinstance(config, dict):
        raise PipelineError(f"adapter config {path} is not a JSON object; fix it")
    return config


def _metadata_configs(metadata: dict | None, where: str) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` in the safetensors header: prefix ('' for all) -> peft config."""
    text = (metadata or {}).get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError:
        raise PipelineError(f"{where}: its lora_adapter_metadata is not valid JSON; the file is damaged") from None
    if not isinstance(loaded, dict):
        return {}
    if "lora_alpha" in loaded or "r" in loaded:
        return {"": loaded}
    configs: dict[str, dict] = {}
    for key, value in loaded.items():  # diffusers packs each model's config under its prefix: unet.lora_alpha, ...
        prefix, _, name = key.rpartition(".")
        if prefix:
            configs.setdefault(prefix + ".", {})[name] = value
    return configs


def adapter_alphas(adapter: Adapter, ranks: dict[str, int], metadata: dict | None) -> tuple[dict[str, float], str | None]:
    """(module -> alpha, where it came from) from the adapter's peft config or its file's lora_adapter_metadata.

    ``ranks``: module name -> its rank (the down matrix's rows). Modules the config does not cover are absent.
    """
    if adapter.config is not None:
        config = _json_config(adapter.config)
        _check_plain_lora(config, str(adapter.config))
        return {m: _peft_alpha(config, m, r, str(adapter.config)) for m, r in ranks.items()}, PEFT_CONFIG
    configs = _metadata_configs(metadata, str(adapter.file))
    alphas = {}
    for prefix, config in configs.items():
        _check_plain_lora(config, str(adapter.file))
        for module, rank in ranks.items():
            if module.startswith(prefix) and module not in alphas:
                alphas[module] = _peft_alpha(config, module, rank, str(adapter.file))
    return alphas, ("lora_adapter_metadata" if alphas else None)


def os_stat(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, following links: what the fingerprint covers."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
