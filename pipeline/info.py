"""What a store holds: source, splits, layers, labels, each representation's state, each training
configuration, and sizes. ``summary`` gives it as a JSON-ready dict (``pipeline info --json``),
``describe`` as text. Read-only: it never writes to the store.
"""

from __future__ import annotations

import math

import numpy as np
import zarr

from . import leases, provenance, store
from .commands import quoted
from .errors import PipelineError


def _logical_bytes(root: zarr.Group) -> int:
    """Bytes of every array in the store as uncompressed values (strings count 0)."""
    total = 0
    for name in ("raw", "labels", "features", "runs"):  # not _leases: plain JSON files, no zarr nodes
        group = root.get(name)
        for _, member in group.members(max_depth=None) if group is not None else ():
            if isinstance(member, zarr.Array) and member.dtype.kind in "biuf":
                total += math.prod(member.shape) * member.dtype.itemsize
    return total


def _representations(root: zarr.Group, attrs: dict, path: str, busy: dict) -> dict:
    """Per representation found in the store: its state and stamp per split, and its bytes."""
    fingerprint = attrs["source"]["fingerprint"]
    out: dict = {}
    for split in attrs["splits"]:
        features = store.member(root, f"features/{split}")
        if features is None:
            continue
        for name in sorted(k for k in features.array_keys() if k not in ("layer", "module")):
            array = features[name]
            a = array.attrs.asdict()
            # The registry is the representations' torch functions: loaded only when there is a stamp to judge by it.
            from . import representations

            try:
                state = provenance.rep_state(array, representations.get(name), fingerprint)
            except PipelineError:  # a representation this version does not know (renamed, or from a newer version)
                state = "unknown"
            state = {"partial": "incomplete"}.get(state, state)
            holder = busy.get(f"features/{split}/{name}")
            if holder is not None:
                state = "being computed"
            entry = out.setdefault(name, {"version": a.get("spec", {}).get("version"), "splits": {}, "bytes": 0})
            entry["splits"][split] = {"state": state, "created_by": a.get("created_by"), "created_at": a.get("created_at")}
            if holder is not None:
                entry["splits"][split]["being_computed"] = _holder(holder)
            entry["bytes"] += sum(store.bytes_under(path, f"features/{split}/{sub}") for sub in (name, f"_progress/{name}"))
    for entry in out.values():
        states = {s["state"] for s in entry["splits"].values()}
        entry["state"] = states.pop() if len(states) == 1 else "mixed: " + ", ".join(
            f"{split} {s['state']}" for split, s in entry["splits"].items())
    return out


def _holder(h) -> dict:
    return {"by": h.by, "pid": h.pid, "since": provenance.utc_stamp(h.since), "lease_expires": provenance.utc_stamp(h.expires)}


def _training(root: zarr.Group, busy: dict) -> list[dict]:
    """Each configuration in runs/, labelled as the report labels it, with its hyper-parameters, who trained it and
    when, and who is training it now; then each configuration being trained for the first time (a train lease, and
    no attrs until its first runs are written: a training that fails leaves nothing behind), by its hash."""
    from .report import Config, differences, label_variants

    configs = []
    for digest, group in store.configurations(root):
        a = group.attrs.asdict()
        done = [run.attrs.asdict() for run in store.runs_of(group, complete=True).values()]
        configs.append(Config(digest, a, done, group))
    label_variants(configs)
    out = []
    for c in configs:
        a, done = c.attrs, c.runs
        tests = [r["metrics"]["test"][r["score"]] for r in done]
        out.append({"config_hash": c.digest, "reps": c.reps, "layer_set": a.get("layer_set"), "variant": c.variant,
                    "label": a.get("label"), "model": a.get("model"), "differs": differences(a), "hyper": c.hyper,
                    "runs_done": len(done), "score": done[0]["score"] if done else None,
                    "best_test": max(tests) if tests else None,
                    "mean_test": float(np.mean(tests)) if tests else None,
                    "authors": c.authors, "author": c.authors[0] if c.authors else "", "trained_at": c.trained_at, "written": True,
                    "being_trained": _holder(busy[f"train/{c.digest}"]) if f"train/{c.digest}" in busy else None})
    known = {c.digest for c in configs}
    for scope, holder in busy.items():
        digest = scope.removeprefix("train/")
        if scope.startswith("train/") and digest not in known:
            out.append({"config_hash": digest, "reps": "", "layer_set": None, "variant": "(configuration not written yet)",
                        "label": None, "model": None, "differs": {}, "hyper": {}, "runs_done": 0, "score": None,
                        "best_test": None, "mean_test": None, "authors": [], "author": "", "trained_at": "", "written": False,
                        "being_trained": _holder(holder)})
    return sorted(out, key=lambda t: (t["label"] or "", t["model"] or "", t["variant"], t["layer_set"] or ""))


def summary(path: str) -> dict:
    root = store.open_root(path)
    try:
        return _summary(path, root)
    except (ValueError, TypeError) as exc:  # zarr met a zarr.json that is not JSON or not metadata, listing a group
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:60]
        raise PipelineError(f"store {path} has unreadable metadata ({type(exc).__name__}: {first}); run "
                            f"{quoted('verify', path)} to name it, then {quoted('verify', path, '--repair')}") from None


def _summary(path: str, root: zarr.Group) -> dict:
    attrs = root.attrs.asdict()
    modules, splits = attrs["modules"], attrs["splits"]
    complete = sum(store.group_complete(root, f"raw/{split}/{m['key']}") for split in splits for m in modules)
    disk = store.bytes_under(path)
    logical = _logical_bytes(root)
    busy = leases.active_holders(root.store)
    return {
        "store": str(path),
        "format": attrs["format"], "schema_version": attrs["schema_version"],
        "base": attrs.get("base"),
        "source": attrs["source"],
        "splits": {name: info["n"] for name, info in splits.items()},
        "modules": len(modules), "layers": 2 * len(modules),
        "ranks": sorted({m["rank"] for m in modules}),
        "chunk_models": attrs["chunk_models"],
        "raw_complete": f"{complete}/{len(splits) * len(modules)}",
        "labels": {name: {"kind": info["kind"], **({"classes": info["classes"]} if "classes" in info else {})}
                   for name, info in attrs["labels"].items()},
        "being_materialized": _holder(busy["materialize"]) if "materialize" in busy else None,
        "representations": _representations(root, attrs, path, busy),
        "training": _training(root, busy),
        "bytes_on_disk": disk,
        "bytes_uncompressed": logical,
        "compression_ratio": logical / disk if disk else None,
        "ignored_columns": attrs.get("ignored_columns", []),
    }


def describe(path: str) -> str:
    s = summary(path)
    source = s["source"]
    lines = [
        f"store    {s['store']}  (format {s['format']} v{s['schema_version']})",
        f"source   {source['uri']}  [{source['kind']}, fingerprint {source['fingerprint'][:12]}]",
        *([f"base     {s['base']['store']}  (raw layers and shared features are read there)"] if s["base"] else []),
        "splits   " + ", ".join(f"{name} {n}" for name, n in s["splits"].items()),
        f"layers   {s['layers']} tensors in {s['modules']} modules, rank {'/'.join(map(str, s['ranks']))}, "
        f"{s['chunk_models']} models per chunk",
        f"complete {s['raw_complete']} (split, module) groups",
    ]
    if s["being_materialized"]:
        lines.append(f"busy     being materialized by {s['being_materialized']['by']} since {s['being_materialized']['since']}")
    for name, info in s["labels"].items():
        extra = f" {len(info['classes'])} classes: {', '.join(info['classes'][:10])}" if "classes" in info else ""
        lines.append(f"label    {name} ({info['kind']}){extra}")
    if s["ignored_columns"]:
        lines.append(f"ignored  {len(s['ignored_columns'])} non-LoRA column(s): {', '.join(s['ignored_columns'][:5])}")
    for name, rep in s["representations"].items():
        stamp = next(iter(rep["splits"].values()))
        busy = next((v["being_computed"] for v in rep["splits"].values() if "being_computed" in v), None)
        who = f"by {busy['by']} since {busy['since']}" if busy else f"by {stamp['created_by']} at {stamp['created_at']}"
        lines.append(f"feature  {name:15} v{rep['version']}  {rep['state']:10} {rep['bytes'] / 1e6:8.1f} MB  {who}")
    for t in s["training"]:
        if not t["written"]:
            lines.append(f"training {t['config_hash']}  being trained by {t['being_trained']['by']} since "
                         f"{t['being_trained']['since']} (what it is: in its attrs once its first runs are written)")
            continue
        best = f"best test {t['score']} {t['best_test']:.3f}, mean {t['mean_test']:.3f}" if t["runs_done"] else "no run done"
        busy = f"  being trained by {t['being_trained']['by']} since {t['being_trained']['since']}" if t["being_trained"] else ""
        who = f"  by {', '.join(t['authors'])} at {t['trained_at']}" if t["authors"] else ("  by -" if t["runs_done"] else "")
        lines.append(f"trained  {t['variant']:15} [{t['layer_set']}] {t['label']} {t['model']}  "
                     f"{t['runs_done']} runs  {best}{who}  ({t['config_hash']}){busy}")
    ratio = f", compression {s['compression_ratio']:.2f}x" if s["compression_ratio"] else ""
    lines.append(f"size     {s['bytes_on_disk'] / 1e6:.0f} MB on disk, {s['bytes_uncompressed'] / 1e6:.0f} MB "
                 f"uncompressed{ratio}")
    return "\n".join(lines)
