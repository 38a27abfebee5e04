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


MIN_SPLIT_ROWS = 1  # an empty split is refused; a one-row split is what the original made of 11 rows, so it stays
_DIGITS = 12  # shares are rounded to this many decimals when converted: 0.099 + 0.201 is 0.3, not 0.30000000000000004


def _is_share(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < 1  # nan fails 0 < nan


def shares_of_all(test_size: float, val_test_size: float) -> tuple[float, float]:
    """(val, test) as shares of all rows, from the datasets library's two sizes: ``test_size``, the share of
    all rows held out of train, and ``val_test_size``, the share of those that go to test (the rest: val)."""
    return round(test_size * (1 - val_test_size), _DIGITS), round(test_size * val_test_size, _DIGITS)


def datasets_sizes(val_size: float, test_size: float) -> tuple[float, float]:
    """The datasets library's two sizes (held-out share, share of it that goes to test) that give val and
    test these shares of all rows: the inverse of ``shares_of_all``. Refuses shares that leave no split."""
    for option, value in (("--val-size", val_size), ("--test-size", test_size)):
        if not _is_share(value):
            raise PipelineError(f"{option} {value!r} is not a share of the rows strictly between 0 and 1 (e.g. 0.1)")
    held = round(val_size + test_size, _DIGITS)
    share = round(test_size / held, _DIGITS) if held < 1 else 1.0
    if not (held < 1 and 0 < share < 1):
        empty = "train" if held >= 1 else "val"
        raise PipelineError(f"--val-size {val_size} and --test-size {test_size} leave no row in {empty}; "
                            "choose shares that add up to less than 1")
    return held, share


def check_split_options(test_size: float, val_test_size: float, seed: int) -> None:
    """Refuse split options the datasets library would reject with a traceback, or quietly misread."""
    for option, value in (("--test-size", test_size), ("--val-test-size", val_test_size)):
        if not _is_share(value):
            raise PipelineError(f"{option} {value!r} is not a share strictly between 0 and 1 (e.g. 0.3)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PipelineError(f"--split-seed {seed!r} is not a whole number >= 0")


def original_split(n: int, test_size: float = 0.3, val_test_size: float = 0.67, seed: int = 42) -> dict[str, np.ndarray]:
    """The original experiment's split of ``n`` rows, made by the datasets library itself.

    ``test_size`` rows are held out of train (``train_test_split(test_size=0.3)``), and ``val_test_size``
    of them go to test, the rest to val (``train_test_split(test_size=0.67)`` of the held-out part): shares
    of all rows of about 0.7 / 0.099 / 0.201 (``shares_of_all``; ``pipeline materialize --val-size --test-size``).

    ``train_test_split`` depends only on the row count and the seed, so running it on a table of
    row numbers gives exactly the rows the full dataset would give, without touching the weights.
    Ten rows or fewer: every split is all rows (as the original did). More: every split must get
    at least ``MIN_SPLIT_ROWS`` rows, else the sizes are refused (the library's own rounding decides).
    """
    check_split_options(test_size, val_test_size, seed)
    if n <= 10:
        every = np.arange(n, dtype=np.int64)
        return {"train": every, "val": every.copy(), "test": every.copy()}
    val_size, test_share = shares_of_all(test_size, val_test_size)
    too_small = (f"--val-size {val_size} and --test-size {test_share} leave {{}} of the {n} rows; "
                 f"choose sizes that leave rows in each of train, val and test")
    table = datasets.Dataset.from_dict({"i": np.arange(n, dtype=np.int64)})
    try:
        first = table.train_test_split(test_size=test_size, seed=seed)
        second = first["test"].train_test_split(test_size=val_test_size, seed=seed)
    except ValueError:  # the library refuses a size that rounds to no row at all (e.g. a held-out part of one row)
        raise PipelineError(too_small.format("no row in one split")) from None
    made = {
        "train": np.asarray(first["train"]["i"], dtype=np.int64),
        "val": np.asarray(second["train"]["i"], dtype=np.int64),
        "test": np.asarray(second["test"]["i"], dtype=np.int64),
    }
    for name, rows in made.items():
        if len(rows) < MIN_SPLIT_ROWS:
            raise PipelineError(too_small.format(f"{len(rows)} row(s) in {name}"))
    return made


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


SMALL_SPLIT = 10  # fewer adapters than this in a split: its accuracy is mostly noise, so materialize says so


def split_warnings(splits: list[SplitPlan], classes_in: dict[str, dict[str, set]], min_split: int | None) -> list[str]:
    """What is odd about the splits, one line each: a split of fewer than ``SMALL_SPLIT`` (or ``min_split``) adapters,
    every row in every split (10 rows or fewer), a class with no adapter in some split.

    ``classes_in``: label -> split -> the classes present (only class-like labels: a name per adapter is not one).
    ``min_split`` set: each of these is an error (PipelineError) instead of a warning.
    """
    notes = []
    threshold = min_split if min_split is not None else SMALL_SPLIT
    sizes = {s.name: len(s.rows) for s in splits}
    if len(splits) == 3 and all(len(s.rows) == len(splits[0].rows) and (s.rows == splits[0].rows).all() for s in splits) \
            and len(splits[0].rows) <= 10 and splits[0].source_split == splits[1].source_split:
        notes.append(f"the source has {len(splits[0].rows)} adapters (10 or fewer): every adapter is in train, val and test, "
                     "as the original experiment did, so val and test accuracy measure memorisation, not generalisation")
    small = [f"{name} {n}" for name, n in sizes.items() if n < threshold]
    if small:
        notes.append(f"split(s) with fewer than {threshold} adapters ({', '.join(small)}): their accuracy is mostly noise; "
                     "add adapters, or choose --test-size / --val-test-size (or your own splits) that leave more")
    for label, present in classes_in.items():
        every = set().union(*present.values())
        for split, have in present.items():
            missing = sorted(every - have)
            if missing:
                shown = ", ".join(repr(c) for c in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                notes.append(f"label {label!r}: class {shown} has no adapter in split {split!r}; that split cannot score it")
    if min_split is not None and notes:
        raise PipelineError(f"{notes[0]} (refused: --min-split {min_split}; lower it or leave it out to go on with a warning)")
    return notes
