"""Read-only xarray views of a store: features side by side, with labels and model ids as coordinates."""

from __future__ import annotations

import xarray as xr

from . import store
from .commands import quoted
from .errors import PipelineError


def open_labels(path: str, split: str) -> xr.Dataset:
    """labels/<split> as a Dataset over ``model``; categorical codes carry their classes in attrs."""
    root = _check_split(path, split)
    labels = xr.open_zarr(path, group=f"labels/{split}", consolidated=False)
    index = store.index_path(root, split)
    if index != f"labels/{split}":  # schema 2: the bookkeeping (row, model_id) is beside the labels, not among them
        labels = labels.merge(xr.open_zarr(path, group=index, consolidated=False))
    return labels


def open_features(path: str, split: str, complete_only: bool = True) -> xr.Dataset:
    """features/<split> as one Dataset: a variable per representation, layer/module coordinates, labels on ``model``.

    Representations not marked complete are left out unless ``complete_only`` is False.
    """
    _check_split(path, split)
    try:
        features = xr.open_zarr(path, group=f"features/{split}", consolidated=False)
    except (FileNotFoundError, KeyError):
        raise PipelineError(f"store {path} has no features for split {split!r}; run {quoted('features', path)}") from None
    if complete_only:
        features = features[[name for name in features.data_vars if features[name].attrs.get("complete")]]
    labels = open_labels(path, split)
    root = store.open_root(path)
    for group in {f"features/{split}", f"labels/{split}", store.index_path(root, split)}:
        names = features.data_vars if group.startswith("features/") else root[group].array_keys()
        for name in names:  # xarray would read an absent chunk as zeros: refuse it, in one line
            store.check_chunks(root[f"{group}/{name}"], group=root[group])
    coords = {name: ("model", labels[name].values) for name in labels.data_vars}
    return features.assign_coords(coords)


def _check_split(path: str, split: str):
    root = store.open_root(path)
    splits = root.attrs["splits"]
    if split not in splits:
        raise PipelineError(f"store {path} has no split {split!r}; it has {', '.join(splits)}")
    return root

