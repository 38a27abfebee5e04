"""Read-only, labelled xarray views of a store: features (``open_features``) and raw factors (``open_raw``).

Every view opens the store read-only and works alike on a local, read-only, remote (``s3://...``) or
personal (``--output``) store; a personal store shows its own features and those of the store it
builds on. Arrays stay lazy (dask); what is read eagerly is small: labels, adapter ids, metadata.
Before anything is returned, every chunk of every array a view shows is checked to exist
(``pipeline.store.check_chunks``): zarr would read an absent chunk as zeros, a view refuses it in one line.
docs/api.md walks through them.
"""

from __future__ import annotations

import json
import re

import numpy as np
import xarray as xr
import zarr

from . import store as store_mod
from .commands import quoted
from .errors import PipelineError

ADAPTER = "adapter"  # the stored arrays' first dimension is called "model"; a view calls it what it is
# What the second axis of a representation is, by its kind (docs/api.md).
AXES = {
    "tensor": ("layer", "one row per stored tensor, down (A) and up (B) alike: the source column name, in the "
                        "order of the root 'layers'; layer_module and layer_role (A or B) say which module and factor"),
    "module": ("module", "one row per LoRA module, a function of dW = scale * B @ A: the module name, in the order "
                         "of the root 'modules'"),
}


def open_features(store: str, split: str | list[str] = "train", reps: str | list[str] | None = None) -> xr.Dataset:
    """The complete representations of one or more splits, labelled: an ``xarray.Dataset`` of dask arrays.

    split: a split name, "all" (every split, in the store's order), a list, or "train,test".
    reps: None (every representation complete in those splits and known to this code), a list, or "a,b";
    a named one that is not complete is refused in one line with the command that computes it.

    Each representation is a variable (adapter, layer | module, <rep>_feature); ``<rep>_feature`` holds the
    feature names of its definition (``representations.get(rep).feature_names()``). Coordinates on
    ``adapter``: the stable id (``adapter_ids``), ``split``, ``row`` (in the source split), and every label,
    decoded (categorical ones as class names, their codes and classes in ``flag_values``/``flag_meanings``).
    """
    root = _open(store)
    splits = _splits(root, store, split)
    sources, left_out = _feature_sources(root, store, splits, reps)
    data_vars = {name: _feature_variable(home, location, splits, rep) for name, (location, home, rep) in sources.items()}
    coords = {**_adapter_coords(root, store, splits),
              **_axis_coords(root, {AXES[rep.kind][0] for _, _, rep in sources.values()}),
              **{f"{name}_feature": (f"{name}_feature", np.array(rep.feature_names(), dtype=object))
                 for name, (_, _, rep) in sources.items()}}
    coords.update(_label_coords(root, splits, taken=set(coords) | set(data_vars) | {f"{n}_feature" for n in data_vars}))
    attrs = {"store": str(store), "splits": splits, "source_fingerprint": root.attrs["source"]["fingerprint"]}
    if store_mod.base_location(root):
        attrs["base"] = store_mod.base_location(root)
    if left_out:
        attrs["left_out"] = "; ".join(f"{name}: {why}" for name, why in left_out.items())
    return xr.Dataset(data_vars, coords, attrs)


def open_raw(store: str, split: str | list[str] = "train") -> dict[str, xr.Dataset]:
    """The raw LoRA factors, lazily (dask), for representations of your own: module name -> Dataset.

    Each Dataset has ``A`` (adapter, rank, in) and ``B`` (adapter, out, rank) as stored (ranks that vary are
    zero-padded), ``scale`` (adapter,) with dW = scale * B @ A (alpha / rank when alpha is known, else 1),
    ``true_rank`` and ``alpha`` (NaN when unknown) per adapter, the adapter coordinates of ``open_features``
    (labels are not repeated here: take them from ``open_features(store, split, reps=[])``) and the
    module's entry of the root ``modules`` as attrs. A personal store reads them from its base.
    """
    from .features import module_scale  # torch is imported with it: only when raw factors are asked for

    root = _open(store)
    splits = _splits(root, store, split)
    location = store_mod.base_location(root) or store
    raw = store_mod.open_root(location, mode="r") if location != store else root
    coords = _adapter_coords(root, store, splits)
    out = {}
    for module in root.attrs["modules"]:
        groups = [_complete_group(raw, location, f"raw/{s}/{module['key']}", "materialize") for s in splits]
        rank = np.concatenate([_module_values(g, "rank", module["rank"], module.get("rank_varies")) for g in groups])
        alpha = np.concatenate([_module_values(g, "alpha", module.get("alpha"), module.get("alpha_varies")) for g in groups])
        known = None if module.get("alpha") is None and not module.get("alpha_varies") else alpha
        variables = {
            "A": ((ADAPTER, "rank", "in"), _lazy([g["A"] for g in groups], groups)),
            "B": ((ADAPTER, "out", "rank"), _lazy([g["B"] for g in groups], groups)),
            "scale": (ADAPTER, module_scale(rank, known)),
            "true_rank": (ADAPTER, rank.astype(np.int64)),
            "alpha": (ADAPTER, alpha.astype(np.float32)),
        }
        attrs = {k: v for k, v in module.items() if v is not None}
        out[module["name"]] = xr.Dataset(variables, coords, {**attrs, "store": str(location)})
    return out


def adapter_ids(root: zarr.Group, location: str) -> dict[str, np.ndarray]:
    """Per split, the stable id of each adapter (row m of every array of the split), unique over the store.

    The source's id column (``index/<split>/model_id``: a file or model name) when it names every adapter
    of the store once; else the row in the source split (``index/<split>/row``) when rows are unique over
    the store's splits (they come from one source split); else "<source split>/<row>".
    """
    splits = root.attrs["splits"]
    rows = _index_arrays(root, "row")
    names = _index_arrays(root, "model_id")
    if names is not None:
        every = [name for s in splits for name in names[s].tolist()]
        if len(set(every)) == len(every):
            return {s: names[s].astype(object) for s in splits}
    sources = {s: info.get("source_split", s) for s, info in splits.items()}
    keys = [(sources[s], int(r)) for s in splits for r in rows[s]]
    if len({row for _, row in keys}) == len(keys):
        return {s: rows[s].astype(np.int64) for s in splits}
    return {s: np.array([f"{sources[s]}/{int(r)}" for r in rows[s]], dtype=object) for s in splits}


# --- the pieces ---------------------------------------------------------------------------------------


def _index_arrays(root: zarr.Group, name: str) -> dict[str, np.ndarray] | None:
    """The bookkeeping array ``name`` (row, model_id) of every split of the store, or None where a split lacks it."""
    paths = {s: store_mod.index_path(root, s, name) for s in root.attrs["splits"]}
    if any(store_mod.member(root, path) is None for path in paths.values()):
        return None
    return {s: store_mod.read_array(root, path) for s, path in paths.items()}


def _open(location: str) -> zarr.Group:
    return store_mod.open_root(str(location), mode="r")


def _splits(root: zarr.Group, location: str, split) -> list[str]:
    known = list(root.attrs["splits"])
    if isinstance(split, str):
        wanted = known if split.strip() == "all" else [s.strip() for s in split.split(",") if s.strip()]
    else:
        wanted = [str(s) for s in split]
    for name in wanted:
        if name not in known:
            raise PipelineError(f"store {location} has no split {name!r}; it has {', '.join(known)}")
    if not wanted:
        raise PipelineError(f"no split named; store {location} has {', '.join(known)} (or pass 'all')")
    return list(dict.fromkeys(wanted))


def _homes(root: zarr.Group, location: str) -> list[tuple[str, zarr.Group]]:
    """Where features are looked for: the store itself, then the store it builds on (a personal store)."""
    base = store_mod.base_location(root)
    return [(str(location), root)] + ([(base, store_mod.open_root(base, mode="r"))] if base else [])


def _feature_sources(root: zarr.Group, location: str, splits: list[str], reps) -> tuple[dict, dict]:
    """name -> (location, root, Representation) of each representation shown, and name -> why one is left out.

    A representation is read where it is complete in every split asked for and its stored spec is one this
    code knows (its feature names come from that spec): up to date first, the store itself before its base.
    """
    from . import representations  # its registry holds the feature names; it imports torch

    homes = _homes(root, location)
    if reps is None:
        present = {}
        for _, home in homes:
            for split in splits:
                group = store_mod.member(home, f"features/{split}")
                present.update(dict.fromkeys(group.array_keys() if group is not None else ()))
        unknown = sorted(n for n in present if n not in representations.REGISTRY and n not in ("layer", "module"))
        names = [n for n in representations.REGISTRY if n in present] + unknown  # unknown ones are left out, and said so
        asked = False
    else:
        names = [r.strip() for r in reps.split(",") if r.strip()] if isinstance(reps, str) else list(reps)
        asked = True
    chosen, left_out = {}, {}
    for name in dict.fromkeys(names):
        if asked:
            representations.get(name)  # an unknown name: one line listing the valid ones
        best, why = None, "not complete"
        for home_location, home in homes:
            arrays = [store_mod.member(home, f"features/{split}/{name}") for split in splits]
            missing = [s for s, a in zip(splits, arrays) if not isinstance(a, zarr.Array) or not a.attrs.get("complete")]
            if missing:
                why = f"not complete in {', '.join(missing)}"
                continue
            rep = _stored_representation(arrays[0].attrs.asdict())
            if rep is None:
                why = f"stored by another version ({arrays[0].attrs.get('spec')}); recompute it"
                continue
            fresh = all(a.attrs.get("spec_hash") == representations.get(name).spec_hash() for a in arrays)
            if fresh:
                best = (home_location, home, rep)
                break
            best = best or (home_location, home, rep)
        if best is not None:
            chosen[name] = best
        elif asked:
            where = f"store {location}" + (" or its base" if len(homes) > 1 else "")
            raise PipelineError(f"representation {name!r} is {why} in {where}; run {quoted('features', location, '--rep', name)}")
        else:
            left_out[name] = why
    return chosen, left_out


def _stored_representation(attrs: dict):
    """The representation a stored array's spec describes, or None when this code does not compute it."""
    from . import representations

    try:
        return representations.from_spec(attrs.get("spec"))
    except PipelineError:
        return None


def _feature_variable(home: zarr.Group, location: str, splits: list[str], rep) -> xr.Variable:
    arrays = [home[f"features/{split}/{rep.name}"] for split in splits]
    axis, about = AXES[rep.kind]
    first = arrays[0].attrs.asdict()
    attrs = {"spec": json.dumps(first.get("spec"), sort_keys=True), "spec_hash": first.get("spec_hash", ""),
             "version": rep.version, "kind": rep.kind, "invariance": rep.invariance, "axis": f"{axis}: {about}",
             "code_version": str(first.get("code_version", "")), "created_by": str(first.get("created_by", "")),
             "created_at": str(first.get("created_at", "")), "store": location}
    return xr.Variable((ADAPTER, axis, f"{rep.name}_feature"), _lazy(arrays), attrs)


def _lazy(arrays: list[zarr.Array], groups: list[zarr.Group] | None = None):
    """One dask array over the splits' arrays, after checking that every chunk of each exists."""
    import dask.array as da

    for array, group in zip(arrays, groups or [None] * len(arrays)):
        store_mod.check_chunks(array, group=group)
    parts = [da.from_zarr(array) for array in arrays]
    return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)


def _complete_group(root: zarr.Group, location: str, path: str, command: str) -> zarr.Group:
    group = store_mod.member(root, path)
    if not isinstance(group, zarr.Group) or not group.attrs.get("complete"):
        raise PipelineError(f"{path} of store {location} is not complete; run {quoted(command, location)}")
    return group


def _module_values(group: zarr.Group, name: str, constant, varies: bool) -> np.ndarray:
    n = group["A"].shape[0]
    if varies:
        return store_mod.read_array(group, name)
    return np.full(n, np.nan if constant is None else constant, dtype=np.float64)


def _adapter_coords(root: zarr.Group, location: str, splits: list[str]) -> dict:
    ids, rows, names = adapter_ids(root, location), _index_arrays(root, "row"), _index_arrays(root, "model_id")
    coords = {
        ADAPTER: (ADAPTER, np.concatenate([ids[s] for s in splits]),
                  {"description": "stable id: the source's id column, else the row in the source split"}),
        "split": (ADAPTER, np.array([s for s in splits for _ in range(len(ids[s]))], dtype=object)),
        "row": (ADAPTER, np.concatenate([rows[s] for s in splits]).astype(np.int64), {"description": "row index in the source split"}),
    }
    if names is not None:
        every = np.concatenate([names[s] for s in splits]).astype(object)
        if not np.array_equal(every, coords[ADAPTER][1]):  # the id column does not name adapters once: shown beside the id
            coords["model_id"] = (ADAPTER, every)
    return coords


def _axis_coords(root: zarr.Group, dims: set[str]) -> dict:
    modules = {m["key"]: m["name"] for m in root.attrs["modules"]}
    coords = {}
    if "layer" in dims:
        layers = root.attrs["layers"]
        coords["layer"] = ("layer", np.array([layer["name"] for layer in layers], dtype=object))
        owners = [modules.get(layer["module"], layer["module"]) for layer in layers]
        coords["layer_module"] = ("layer", np.array(owners, dtype=object))
        coords["layer_role"] = ("layer", np.array([layer["role"] for layer in layers], dtype=object),
                                {"description": "A: the down factor (r, in); B: the up factor (out, r)"})
    if "module" in dims:
        coords["module"] = ("module", np.array([m["name"] for m in root.attrs["modules"]], dtype=object))
    return coords


def _label_coords(root: zarr.Group, splits: list[str], taken: set[str]) -> dict:
    """Every label as a coordinate on ``adapter``; categorical codes decoded to class names (None: missing).

    A label whose name another coordinate has (``row``, ``split``, ...) is shown as ``label_<name>``.
    """
    coords = {}
    for label, info in root.attrs["labels"].items():
        values = np.concatenate([store_mod.read_array(root, store_mod.label_path(root, s, label)) for s in splits])
        attrs = {"kind": info["kind"], "column": info.get("column", label)}
        if info["kind"] == "categorical":
            classes = list(info["classes"])
            names = np.array([*classes, None], dtype=object)
            values = names[np.where(values >= 0, values, len(classes))]
            attrs.update(classes=classes, flag_values=list(range(len(classes))),
                         flag_meanings=" ".join(_cf_word(c) for c in classes), missing_code=-1,
                         description="class names; the stored codes are the flag_values (index into classes), -1 missing")
        name = label if label not in taken else f"label_{label}"
        coords[name] = (ADAPTER, values, attrs)
    return coords


def _cf_word(name: str) -> str:
    """A class name as one CF flag_meanings word: characters outside [A-Za-z0-9_.+@-] become '_'."""
    return re.sub(r"[^A-Za-z0-9_.+@-]", "_", str(name)) or "_"
