"""The raw LoRA factors of a layer set, as the inputs of the models that learn from them (models.RAW).

``load`` reads, per split, the A and B factors and the scale s (dW = s B A) of the selected modules of the
adapters kept (the labelled ones), from the store's ``raw/`` group (or the shared store a personal store
builds on), never from the source dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def load(root: zarr.Group, modules: list[dict], split: str, keep: np.ndarray) -> RawFactors:
    """The factors of ``modules`` (entries of the root ``modules``) for rows ``keep`` of ``split``."""
    raw, _ = raw_root(root)
    A, B, scale = [], [], []
    for module in modules:
        group = store.member(raw, f"raw/{split}/{module['key']}")
        a, b = store.read_array(group, "A")[keep], store.read_array(group, "B")[keep]
        n = len(keep)
        rank = store.read_array(group, "rank")[keep] if module.get("rank_varies") else np.full(n, module["rank"])
        if module.get("alpha_varies"):
            alpha = store.read_array(group, "alpha")[keep]
        else:
            alpha = None if module.get("alpha") is None else module["alpha"]
        A.append(torch.from_numpy(a.astype(np.float32)))
        B.append(torch.from_numpy(b.astype(np.float32)))
        scale.append(torch.from_numpy(module_scale(rank, alpha)))
    return RawFactors([m["name"] for m in modules], A, B, scale)
