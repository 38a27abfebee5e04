"""The published lora-ws dataset format, written directly in ``save_to_disk``'s layout.

One row per adapter: a ``list<list<float32>>`` column per safetensors key (``<module>.lora.down.weight``
(rank, in) and ``<module>.lora.up.weight`` (out, rank)), then ``category_label``, ``category_name``,
``num_images`` and ``rank``. ``pipeline synth`` and ``pipeline zoo`` both write it through ``write_dataset``,
so their datasets are column for column alike; both built-in datasets (the synthetic one and ``zoo:digits``) are
made once under ``builtin_home()``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

SHARD_BYTES = 500 * 2**20  # save_to_disk's default shard size
SCALAR_COLUMNS = ("category_label", "category_name", "num_images", "rank")
BUILTIN_HOME = "stores/builtin"


def builtin_home() -> Path:
    """Where the built-in datasets are generated once, then reused: $PIPELINE_BUILTIN_HOME, else stores/builtin."""
    return Path(os.environ.get("PIPELINE_BUILTIN_HOME") or BUILTIN_HOME)


@dataclass(frozen=True)
class LoraModule:
    name: str  # e.g. unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    in_features: int
    out_features: int

    @property
    def down(self) -> str:
        return f"{self.name}.lora.down.weight"

    @property
    def up(self) -> str:
        return f"{self.name}.lora.up.weight"


def features_for(modules: list[LoraModule]) -> datasets.Features:
    matrix = datasets.List(datasets.List(datasets.Value("float32")))
    features = {}
    for module in modules:
        features[module.down] = matrix
        features[module.up] = matrix
    features.update(category_label=datasets.Value("string"), category_name=datasets.Value("string"),
                    num_images=datasets.Value("int64"), rank=datasets.Value("int64"))
    return datasets.Features(features)


def matrix_column(values: np.ndarray) -> pa.Array:
    """(n, rows, cols) float -> list<list<float>> without a Python loop."""
    n, rows, cols = values.shape
    inner = pa.ListArray.from_arrays(np.arange(0, n * rows * cols + 1, cols, dtype=np.int32), pa.array(values.reshape(-1)))
    return pa.ListArray.from_arrays(np.arange(0, n * rows + 1, rows, dtype=np.int32), inner)


def row_bytes(modules: list[LoraModule], rank: int) -> int:
    """Bytes of one adapter's matrices as float32 (the bulk of a row)."""
    return 4 * rank * sum(m.in_features + m.out_features for m in modules)


def write_dataset(out: Path, batches: Iterable[pa.Table], n_batches: int, batch_rows: int, modules: list[LoraModule],
                  rank: int, fingerprint: str, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``batches`` (tables in ``features_for(modules)`` column order) as a one-split DatasetDict.

    The shards go straight into the ``save_to_disk`` layout (``train/data-XXXXX-of-YYYYY.arrow`` plus its
    JSON) in a ``.<name>.partial`` folder renamed to ``out`` at the end, so every byte is written once
    and ``out`` is either whole or absent. ``extra_files`` (name -> text) are written beside the split.
    """
    features = features_for(modules)
    work = out.parent / f".{out.name}.partial-dataset"
    shutil.rmtree(work, ignore_errors=True)
    split_dir = work / "train"
    split_dir.mkdir(parents=True)
    try:
        per_shard = max(1, SHARD_BYTES // (batch_rows * row_bytes(modules, rank)))  # batches per shard
        n_shards = max(1, -(-n_batches // per_shard))
        names = [f"data-{i:05d}-of-{n_shards:05d}.arrow" for i in range(n_shards)]
        batches = iter(batches)
        for shard, name in enumerate(names):
            with ArrowWriter(features=features, path=str(split_dir / name)) as writer:
                for _ in range(min(per_shard, n_batches - shard * per_shard)):
                    writer.write_table(next(batches))
                writer.finalize()
        _write_split_json(split_dir, names, features, fingerprint)
        (work / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
        for name, text in (extra_files or {}).items():
            (work / name).write_text(text)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _write_split_json(split_dir: Path, data_files: list[str], features: datasets.Features, fingerprint: str) -> None:
    """The two JSON files ``Dataset.save_to_disk`` writes beside its shards, with the same keys."""
    state = {"_data_files": [{"filename": name} for name in data_files], "_fingerprint": fingerprint,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (split_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(datasets.DatasetInfo(features=features))
    (split_dir / "dataset_info.json").write_text(json.dumps({key: info[key] for key in sorted(info)}, indent=2))
