"""The raw LoRA factors of a layer set, as the inputs of the models that learn from them (models.RAW).

``load`` reads, per split, the A and B factors and the scale s (dW = s B A) of the selected modules of the
adapters kept (the labelled ones), from the store's ``raw/`` group (or the shared store a personal store
builds on), never from the source dataset, into one resident ``RawFactors``.

``RawSource`` is a split left in the store: it reads row blocks aligned to the stored chunks (one block is
the same rows of every module), so a pass over it reads each chunk once. ``place`` decides, per split,
whether it is loaded onto the device (it fits the memory budget) or streamed by block (docs/train.md,
"Training from the raw factors").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import zarr

from . import store
from .commands import quoted
from .errors import PipelineError
from .features import module_scale


@dataclass
class RawFactors:
    """One split's factors: per module A (n, r, in), B (n, out, r), scale (n,); float32 tensors on one device."""

    modules: list[str]  # module names, in stored order
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scale: list[torch.Tensor]

    def __len__(self) -> int:
        return self.A[0].shape[0]

    @property
    def width(self) -> int:
        """Numbers per adapter (A and B of every module)."""
        return sum(a[0].numel() + b[0].numel() for a, b in zip(self.A, self.B))

    def to(self, device) -> "RawFactors":
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return RawFactors(self.modules, move(self.A), move(self.B), move(self.scale))

    def rows(self, index: torch.Tensor) -> "RawFactors":
        take = lambda ts: [t[index] for t in ts]  # noqa: E731
        return RawFactors(self.modules, take(self.A), take(self.B), take(self.scale))


def raw_root(root: zarr.Group) -> tuple[zarr.Group, str]:
    """Where the raw factors are: this store, or the shared store a personal one builds on."""
    base = store.base_location(root)
    location = base or store.location_of(root.store)
    return (store.open_root(base, mode="r") if base else root), location


def check(root: zarr.Group, path: str, splits) -> None:
    """Every module's raw group is complete in every split, or one line with the fix."""
    raw, location = raw_root(root)
    for split in splits:
        for module in root.attrs["modules"]:
            group = store.member(raw, f"raw/{split}/{module['key']}")
            if not isinstance(group, zarr.Group) or not group.attrs.get("complete"):
                raise PipelineError(f"raw/{split}/{module['key']} of store {location} is not complete; "
                                    f"run {quoted('materialize', location)}")


def _arrays(module: dict) -> tuple[str, ...]:
    """The arrays of a module's raw group that are read: A and B, and rank and alpha where they vary by adapter."""
    return ("A", "B", *(("rank",) if module.get("rank_varies") else ()), *(("alpha",) if module.get("alpha_varies") else ()))


def _module_rows(group: zarr.Group, module: dict, rows: np.ndarray, start: int | None = None,
                 stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One module's A, B and scale for ``rows`` (positions in [start, stop), or in the whole split when None),
    read as one slice [start, stop) of each array."""
    def read(name):
        return store.read_array(group, name, start, stop)[rows]

    rank = read("rank") if module.get("rank_varies") else np.full(len(rows), module["rank"])
    if module.get("alpha_varies"):
        alpha = read("alpha")
    else:
        alpha = None if module.get("alpha") is None else module["alpha"]
    return (torch.from_numpy(read("A").astype(np.float32)), torch.from_numpy(read("B").astype(np.float32)),
            torch.from_numpy(module_scale(rank, alpha)))


def load(root: zarr.Group, modules: list[dict], split: str, keep: np.ndarray) -> RawFactors:
    """The factors of ``modules`` (entries of the root ``modules``) for rows ``keep`` of ``split``."""
    raw, _ = raw_root(root)
    parts = [_module_rows(store.member(raw, f"raw/{split}/{module['key']}"), module, keep) for module in modules]
    return RawFactors([m["name"] for m in modules], *(list(t) for t in zip(*parts)))


@dataclass(eq=False)
class RawSource:
    """One split's factors left in the store, for the models that stream them (``models.RAW`` inputs).

    ``blocks()`` are row ranges aligned to the stored chunks of every array read (the lcm of their row chunks),
    so reading a block reads whole chunks and a pass over the blocks reads each chunk once. ``read(blocks)``
    gives their kept rows on ``device``, with their positions in ``keep`` order (the order of the split's
    targets). ``buffer_bytes``: the most float32 bytes of factors a streaming pass holds at once (``place``).
    """

    root: zarr.Group
    entries: list[dict]  # the modules' entries of the root ``modules``, in stored order
    split: str
    keep: np.ndarray  # positions in the split of the rows used (the labelled ones), ascending
    device: str = "cpu"
    buffer_bytes: int = 0

    @property
    def modules(self) -> list[str]:
        return [m["name"] for m in self.entries]

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def width(self) -> int:
        """Numbers per adapter (A and B of every module), as ``RawFactors.width``."""
        return sum(m["rank"] * (m["in"] + m["out"]) for m in self.entries)

    @property
    def row_bytes(self) -> int:
        """float32 bytes of one adapter's factors and scales once read."""
        return 4 * (self.width + len(self.entries))

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def _groups(self) -> list[zarr.Group]:
        raw, _ = raw_root(self.root)
        return [store.member(raw, f"raw/{self.split}/{m['key']}") for m in self.entries]

    def blocks(self) -> list[tuple[int, int]]:
        """The chunk-aligned row ranges [start, stop) of the split that hold kept rows, in stored order."""
        arrays = [group[name] for group, m in zip(self._groups(), self.entries) for name in _arrays(m)]
        n = arrays[0].shape[0]
        step = math.lcm(*(a.chunks[0] for a in arrays))
        starts = np.unique(self.keep // step) * step
        return [(int(s), int(min(s + step, n))) for s in starts]

    def read(self, blocks: list[tuple[int, int]]) -> tuple[RawFactors, np.ndarray]:
        """The kept rows of ``blocks`` (in the order given) on the device, and their positions in ``keep`` order."""
        groups, parts, rows = self._groups(), [], []
        for start, stop in blocks:
            lo, hi = np.searchsorted(self.keep, [start, stop])
            local = self.keep[lo:hi] - start
            parts.append([_module_rows(g, m, local, start, stop) for g, m in zip(groups, self.entries)])
            rows.append(np.arange(lo, hi))
        per_module = [[torch.cat([block[i][k] for block in parts]).to(self.device) for i in range(len(self.entries))]
                      for k in range(3)]
        return RawFactors(self.modules, *per_module), np.concatenate(rows)

    def load(self) -> RawFactors:
        """Every kept row, resident on the device (``load``)."""
        return load(self.root, self.entries, self.split, self.keep).to(self.device)

    def to(self, device) -> "RawSource":
        return replace(self, device=str(device))


def memory_budget(device) -> int:
    """Bytes of raw factors ``place`` keeps resident when ``--raw-memory`` is not given: half the free memory of a
    CUDA device (the other half for the runs' weights, optimiser state and activations), a quarter of the RAM on
    the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def place(sources: dict[str, RawSource], device, budget: int | None = None) -> dict[str, RawFactors | RawSource]:
    """Each split resident on ``device`` (loaded once, a ``RawFactors``) when it fits what is left of ``budget``
    bytes, else a ``RawSource`` streamed in buffers of what is left after the resident splits (at least one block).

    val first (it is evaluated every epoch), then train (read every epoch when streamed), then test (read at the end).
    """
    budget = memory_budget(device) if budget is None else budget
    order = [s for s in ("val", "train", "test") if s in sources] + [s for s in sources if s not in ("val", "train", "test")]
    left, resident = budget, set()
    for split in order:
        if sources[split].nbytes <= left:
            resident.add(split)
            left -= sources[split].nbytes
    return {split: sources[split].to(device).load() if split in resident else replace(sources[split].to(device), buffer_bytes=left)
            for split in sources}
