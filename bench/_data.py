"""What the benchmarks share about their data: the synthetic dataset they reuse, its LoRA columns, and
the subset of layers on which the (slow) original approach is timed and then extrapolated."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.layers import parse_lora_column
from pipeline.synthetic import SYNTH_VERSION, write_synthetic


def synthetic_source(work: Path, n: int) -> Path:
    """The n-adapter synthetic dataset under ``work``, written on first use (rank 1, to_q/to_v)."""
    source = Path(work) / f"synth-v{SYNTH_VERSION}-n{n}"
    if not source.exists():
        print(f"writing {n} synthetic adapters to {source} ...", flush=True)
        write_synthetic(source, n)
    return source


def lora_columns(ds) -> list[str]:
    return sorted(c for c in ds.column_names if parse_lora_column(c))


def module_subset(columns: list[str], layers: int) -> list[str]:
    """About ``layers`` columns as whole modules (down and up), evenly spaced over the sorted columns:
    down (A) and up (B) columns, and 320/640/1280-wide blocks, cost very different amounts."""
    pairs = len(columns) // 2
    picked = np.linspace(0, pairs - 1, max(1, layers // 2)).round().astype(int)
    return [columns[2 * i + k] for i in picked for k in (0, 1)]
