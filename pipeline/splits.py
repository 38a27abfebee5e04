"""Train/val/test row indices: the source's own splits, or the original experiment's split remade."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from .errors import PipelineError
from .layers import safe_key

_ALIASES = {"validation": "val", "valid": "val", "val": "val", "train": "train", "test": "test"}


@dataclass(frozen=True)
class SplitPlan:
    """One stored split: which source split it reads and which of that split's rows, in order."""

    name: str  # train | val | test (or the source's own name)
    source_split: str
    rows: np.ndarray  # int64 row indices into the source split


def original_split(n: int, test_size: float = 0.3, val_test_size: float = 0.67, seed: int = 42) -> dict[str, np.ndarray]:
    """The original experiment's split of ``n`` rows, made by the datasets library itself.

    ``train_test_split`` depends only on the row count and the seed, so running it on a table of
    row numbers gives exactly the rows the full dataset would give, without touching the weights.
    Ten rows or fewer: every split is all rows (as the original did).
    """
    if n <= 10:
        every = np.arange(n, dtype=np.int64)
        return {"train": every, "val": every.copy(), "test": every.copy()}
    table = datasets.Dataset.from_dict({"i": np.arange(n, dtype=np.int64)})
    first = table.train_test_split(test_size=test_size, seed=seed)
    second = first["test"].train_test_split(test_size=val_test_size, seed=seed)
    return {
        "train": np.asarray(first["train"]["i"], dtype=np.int64),
        "val": np.asarray(second["train"]["i"], dtype=np.int64),
        "test": np.asarray(second["test"]["i"], dtype=np.int64),
    }


def plan_splits(sizes: dict[str, int], test_size: float, val_test_size: float, seed: int) -> list[SplitPlan]:
    """Use the source's splits when it has several; split a single one the original way."""
    if not sizes:
        raise PipelineError("the source has no splits")
    if len(sizes) == 1:
        (source_split, n), = sizes.items()
        if n == 0:
            raise PipelineError(f"source split {source_split!r} has no rows")
        made = original_split(n, test_size, val_test_size, seed)
        return [SplitPlan(name, source_split, rows) for name, rows in made.items()]
    plans = []
    for source_split, n in sizes.items():
        name = safe_key(_ALIASES.get(source_split, source_split))  # a split name from the data becomes a store path
        if n == 0:
            raise PipelineError(f"source split {source_split!r} has no rows; remove it or add rows")
        plans.append(SplitPlan(name, source_split, np.arange(n, dtype=np.int64)))
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(plans, key=lambda p: (order.get(p.name, 3), p.name))
