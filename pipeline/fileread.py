"""Adapter files read directly: one pass over the headers to plan, then each file's weights read once.

``scan`` reads every file's safetensors header (and its .alpha scalars and peft config), keeping only
compact per-split arrays: each module's rank per adapter and each alpha per adapter. ``read_rows``
opens a batch of files (memory-mapped by safetensors) and gathers the modules' matrices into
(n, rank, in) / (n, out, rank) arrays, zero-padding ragged ranks. No HuggingFace cache, no Arrow
copy: the store is the only thing written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from . import adapters
from .errors import PipelineError, not_storable
from .layers import Module, pair_modules, parse_lora_column

@dataclass(frozen=True)
class FileSplit:
    """One source split of adapter files: which file is each row, and what its header said."""

    files: list[Path]
    ids: list[str]
    ranks: dict[str, np.ndarray]  # module name -> rank per row (int64)
    alphas: dict[str, np.ndarray]  # alpha column -> alpha per row (float32)


@dataclass(frozen=True)
class FileTensors:
    """The tensors of a folder of adapter files: the same names, and dimensions but the rank, in every file."""

    shapes: dict[str, tuple[int, ...]]  # tensor -> shape in the first file
    dtypes: dict[str, frozenset[str]]  # tensor -> the safetensors dtypes it has across files
    modules: tuple[Module, ...]  # the LoRA pairs (alpha: the alpha column, an .alpha tensor or one made from a config)
    alpha_from: dict[str, str]  # alpha column -> tensor | adapter_config.json | lora_adapter_metadata
    splits: dict[str, FileSplit]

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def numpy_dtype(self, tensor: str):
        """The dtype a tensor is read as: float64 if any file has it in F64 (materialize checks the float32 range), float16
        if every file has F16, else float32."""
        kinds = self.dtypes[tensor]
        return np.float16 if kinds == {"F16"} else np.float64 if "F64" in kinds else np.float32


def _open(path: Path, framework: str = "numpy"):
    try:
        return safe_open(str(path), framework=framework)
    except Exception as exc:  # safetensors' own error for a truncated or garbage file
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(f"cannot read safetensors file {path}: {message}; the file is damaged or not in that format") from None


def _schemes(names) -> set[str]:
    return {parsed[0] for parsed in map(parse_lora_column, names) if parsed}


def _refuse_other_names(adapter: adapters.Adapter, names: set[str], first: adapters.Adapter, first_names: set[str]) -> None:
    schemes, first_schemes = _schemes(names), _schemes(first_names)
    if not schemes:
        sample = ", ".join(repr(k) for k in sorted(names)[:2]) or "none"
        raise PipelineError(f"{adapter.file} holds no LoRA tensors (its keys: {sample}{', ...' if len(names) > 2 else ''}); "
                            "it matches no naming scheme: remove it from the source")
    if schemes != first_schemes:
        raise PipelineError(f"the adapters mix naming schemes: {first.id!r} is {'+'.join(sorted(first_schemes))}, {adapter.id!r} "
                            f"is {'+'.join(sorted(schemes))}; keep one scheme per dataset (convert, or split into two sources)")
    raise PipelineError(f"{adapter.id} has different tensor names than {first.id}; keep one naming scheme per folder")


def scan(found: adapters.Found, split_of: list[str], quiet: bool = True) -> FileTensors:
    """Every file's header, once: the checks that need no weight value, and the compact facts materialize plans from."""
    from tqdm import tqdm

    first = found.adapters[0]
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, set[str]] = {}
    modules: list[Module] = []
    config_columns: dict[str, str] = {}  # alpha column made from a config -> module name
    n = len(found.adapters)
    ranks: dict[str, np.ndarray] = {}
    alphas: dict[str, np.ndarray] = {}
    alpha_from: dict[str, str] = {}
    with tqdm(total=n, unit="file", desc="reading headers", disable=quiet or n < 200, file=sys.stderr) as bar:
        for i, adapter in enumerate(found.adapters):
            with _open(adapter.file) as handle:
                names = set(handle.keys())
                if i == 0:
                    if not _schemes(names):
                        _refuse_other_names(adapter, names, adapter, names)
                    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in names}
                    dtypes = {k: set() for k in names}
                    modules = pair_modules(sorted(names))[0]
                    ranks = {m.name: np.zeros(n, np.int64) for m in modules}
                    alphas = {m.alpha: np.zeros(n, np.float32) for m in modules if m.alpha}
                    alpha_from = {m.alpha: "tensor" for m in modules if m.alpha}
                elif names != set(shapes):
                    _refuse_other_names(adapter, names, first, set(shapes))
                own = {}
                for name in names:
                    piece = handle.get_slice(name)
                    shape = tuple(piece.get_shape())
                    if len(shape) != len(shapes[name]):
                        raise PipelineError(f"tensor {name!r} is {len(shape)}-D in {adapter.id} but {len(shapes[name])}-D in "
                                            f"{first.id}; every adapter must have the same tensor layout")
                    dtypes[name].add(piece.get_dtype())
                    own[name] = shape
                own_ranks = {}
                for m in modules:
                    own_ranks[m.name] = _check_pair(adapter, first, m, own, shapes)
                    ranks[m.name][i] = own_ranks[m.name]
                    if m.alpha:
                        alphas[m.alpha][i] = _alpha_value(handle, m.alpha, adapter)
                given, where = adapters.adapter_alphas(adapter, {m.name: own_ranks[m.name] for m in modules if not m.alpha},
                                                       handle.metadata())
            for module, alpha in given.items():
                column = f"{module}.alpha"
                if column not in alphas:  # first adapter to give this module an alpha: the ones before had scale 1 (alpha = r)
                    alphas[column] = ranks[module].astype(np.float32)
                    config_columns[column] = module
                    alpha_from[column] = where
                alphas[column][i] = alpha
            for column, module in config_columns.items():
                if module not in given:
                    alphas[column][i] = own_ranks[module]
            bar.update(1)
    modules = [Module(m.name, m.key, m.scheme, m.down, m.up, m.alpha or (f"{m.name}.alpha" if f"{m.name}.alpha" in config_columns
                                                                         else None)) for m in modules]
    return FileTensors(shapes, {k: frozenset(v) for k, v in dtypes.items()}, tuple(modules), alpha_from,
                       _by_split(found, split_of, ranks, alphas))


def _check_pair(adapter, first, m: Module, own: dict, shapes: dict) -> int:
    """The rank of module ``m`` in this file; refuses a shape that differs from the first file's other than by rank."""
    down, up = own[m.down], own[m.up]
    if len(down) != 2 or len(up) != 2:
        raise PipelineError(f"tensor {m.down!r} is not a matrix in {adapter.id} (shape {list(down)}); LoRA factors are 2-D")
    if down[0] < 1:
        raise PipelineError(f"{adapter.id}: module {m.name!r} has rank 0 (an empty matrix); every adapter needs rank >= 1, "
                            "remove that adapter from the source")
    if down[0] != up[1]:
        raise PipelineError(f"{adapter.id}: module {m.name!r} has down rank {down[0]} but up rank {up[1]}; the file is not a "
                            "valid LoRA adapter")
    if down[1] != shapes[m.down][1] or up[0] != shapes[m.up][0]:
        raise PipelineError(f"{adapter.id}: module {m.name!r} is {up[0]}x{down[1]} but {shapes[m.up][0]}x{shapes[m.down][1]} in "
                            f"{first.id}; every adapter must adapt the same model")
    return int(down[0])


def _alpha_value(handle, name: str, adapter) -> float:
    value = np.asarray(handle.get_tensor(name), dtype=np.float64).reshape(-1)
    if value.size != 1 or not np.isfinite(value[0]):
        raise PipelineError(f"{adapter.id}: {name!r} is not one finite number ({value[:3].tolist()}); fix the file")
    return float(value[0])


def _by_split(found, split_of, ranks, alphas) -> dict[str, FileSplit]:
    rows: dict[str, list[int]] = {}
    for i, split in enumerate(split_of):
        rows.setdefault(split, []).append(i)
    order = {"train": 0, "validation": 1, "test": 2}
    out = {}
    for split, members in sorted(rows.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])):
        take = np.asarray(members, np.int64)
        out[split] = FileSplit([found.adapters[i].file for i in members], [found.adapters[i].id for i in members],
                               {m: r[take] for m, r in ranks.items()}, {c: a[take] for c, a in alphas.items()})
    return out


def read_rows(tensors: FileTensors, split: FileSplit, rows: np.ndarray, todo: list[tuple[Module, int, int, int, str]],
              check_finite: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module name -> (A (n, rank, in), B (n, out, rank)) of the files of ``rows``, each file opened once.

    ``todo``: (module, padded rank, in, out, stored dtype) per module. Ranks below the padded one are zero-padded.
    """
    n = len(rows)
    out = {m.name: (np.zeros((n, rank, fan_in), dtype), np.zeros((n, fan_out, rank), dtype)) for m, rank, fan_in, fan_out, dtype in todo}
    bf16 = any("BF16" in tensors.dtypes[t] for m, *_ in todo for t in (m.down, m.up))
    for j, row in enumerate(rows):
        path = split.files[row]
        with _open(path, "pt" if bf16 else "numpy") as handle:
            for m, *_ in todo:
                A, B = out[m.name]
                a, b = _matrix(handle, m.down, path, bf16), _matrix(handle, m.up, path, bf16)
                r = a.shape[0]
                if a.shape[1] != A.shape[2] or b.shape[0] != B.shape[1] or b.shape[1] != r or r > A.shape[1]:
                    raise PipelineError(f"{path} changed since it was planned (module {m.name!r} is now {b.shape[0]}x{a.shape[1]} at "
                                        f"rank {r}); rerun the same command")
                with np.errstate(over="ignore"):  # a float64 value beyond float32: refused below, or kept as Inf
                    A[j, :r] = a
                    B[j, :, :r] = b
                if check_finite and not (np.isfinite(A[j]).all() and np.isfinite(B[j]).all()):
                    raise _nonfinite(m, a, b, A.dtype, f"source row {row} ({split.ids[row]!r})")
    return out


def _matrix(handle, name: str, path: Path, bf16: bool) -> np.ndarray:
    try:
        tensor = handle.get_tensor(name)
    except Exception as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(f"cannot read tensor {name!r} of {path}: {message}; the file changed or is damaged: rerun when "
                            "it is whole") from None
    if bf16:
        import torch

        tensor = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return tensor


def _nonfinite(m: Module, a: np.ndarray, b: np.ndarray, stored, where: str) -> PipelineError:
    """NaN or Inf in the source, or a finite source value that the stored dtype cannot hold: say which."""
    with np.errstate(over="ignore"):
        column = m.down if not np.isfinite(a.astype(stored)).all() else m.up
    source = a if column == m.down else b
    return not_storable(column, where, stored, bool(np.isfinite(source).all()))
