"""``pipeline verify``: read every chunk of a store, check every checksum, chunk and completion mark.

Every array of the store carries a crc32c checksum per chunk (the last codec of its chain), which
zarr checks on each read; reading every chunk is therefore checking every checksum. A checksum
covers a chunk's bytes, not its position or its existence (zarr reads an absent chunk as fill
values), so every array of a complete piece is also checked against the chunk manifest its mark
recorded (pipeline/store.py): every chunk present, each the one written at its position. Marks are
checked against the data: a complete group must hold the arrays its mark names, at the split's
size; a complete representation must have every chunk's progress flag set. Unreadable metadata
documents and damaged lease files are named, and never stop the check.

Each problem names the piece and the command that repairs it. ``repair`` (``verify --repair``)
makes the normal commands redo exactly the damaged pieces: it clears the complete mark of a
damaged raw or label group and of a damaged run, and the progress flag of a damaged feature chunk,
so that ``materialize``, ``features`` and ``train`` recompute those and nothing else; it deletes
unreadable metadata documents (their pieces are then rebuilt), damaged lease files and orphaned
temporary files. A personal store (``--personal-store``) is checked for what it holds; its base is
verified on its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from . import leases, store
from .commands import command, train_command
from .errors import PipelineError
from .layers import safe_key


@dataclass(frozen=True)
class Problem:
    piece: str  # what is damaged: an array chunk's key, or a group
    what: str  # what is wrong with it
    repair: str  # the command that rebuilds it (after `pipeline verify --repair`)
    # what --repair resets: ("none",), ("group", path, *keys to delete first), ("flag", features group, rep, chunk),
    # ("key", store key to delete), ("node", node to delete with all below it), ("regroup", plain group whose
    # metadata is rewritten), ("lease", lease file key), ("delete", local file)
    reset: tuple

    def line(self) -> str:
        return f"{self.piece}: {self.what}; repair: {self.repair}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    bytes: int = 0  # uncompressed bytes read
    notes: list[str] = field(default_factory=list)  # what was not checked here, and where it is


@dataclass(frozen=True)
class _Read:
    """An array to read chunk by chunk once the marks are checked."""

    array: zarr.Array
    on_bad: object  # on_bad(key, chunk index, what)
    complete: bool  # marked complete: every chunk must be present and match the manifest
    manifest: dict | None = None  # the chunks its mark recorded (None: written before manifests existed)
    legacy: bool = True  # without a manifest, it may predate them (False: an array that never has one)


UNREADABLE = "metadata (zarr.json) unreadable: not JSON, or not zarr metadata"


def _chunk_slices(array: zarr.Array):
    """(chunk key, index, selection) for every chunk of ``array``."""
    for key, index in zip(store.chunk_keys(array), np.ndindex(*array.cdata_shape)):
        selection = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, array.chunks, array.shape))
        yield key, index, selection


def _read_all(read: _Read, report: Report, bar=None) -> None:
    """Check ``read.array``'s chunks against its manifest, then read each present chunk; ``on_bad`` for each bad one."""
    array, on_bad = read.array, read.on_bad
    report.arrays += 1
    skip = set()
    if read.complete:
        for key, index, what in store.chunk_problems(array, read.manifest, read.legacy):
            on_bad(key, index, what)
            skip.add(key)
    else:  # unfinished: chunks not computed yet are absent, and there is nothing to read in them
        skip = {key for key, tail in zip(store.chunk_keys(array), store.chunk_tails(array)) if tail is None}
    for key, index, selection in _chunk_slices(array):
        if key in skip:
            continue
        try:
            values = array[selection]
        except Exception as exc:  # noqa: BLE001 - a damaged chunk raises whatever its codec raises
            on_bad(key, index, f"unreadable chunk ({(str(exc).splitlines() or [type(exc).__name__])[0][:80]})")
            continue
        nbytes = values.nbytes if isinstance(values, np.ndarray) and values.dtype.kind != "O" else 0
        report.chunks += 1
        report.bytes += nbytes
        if bar:
            bar.update(layers=1, nbytes=nbytes)


def _members(group: zarr.Group) -> tuple[dict, dict, list[str]]:
    """(arrays, groups, names whose metadata is unreadable) of a group, by name.

    Listed from the store's keys, one child at a time: zarr's own listing fails as a whole on one
    damaged zarr.json.
    """
    async def names():
        return [name async for name in group.store.list_dir(group.path)]

    prefix = f"{group.path}/" if group.path else ""
    arrays, groups, damaged = {}, {}, []
    for name in sorted(sync(names())):
        if name == "zarr.json" or not sync(group.store.exists(f"{prefix}{name}/zarr.json")):
            continue
        try:
            node = store.member(group, name)
        except PipelineError:
            damaged.append(name)
            continue
        (arrays if isinstance(node, zarr.Array) else groups)[name] = node
    return arrays, groups, damaged


def _open(root: zarr.Group, path: str, report: Report, command: str, reset: tuple):
    """The node at ``path``, or None; an unreadable one is reported (its repair deletes its metadata)."""
    try:
        return store.member(root, path)
    except PipelineError:
        if not any(p.piece == path for p in report.problems):  # not already named as a plain group
            report.problems.append(Problem(path, UNREADABLE, command, (*reset, f"{path}/zarr.json")))
        return None


def _plain_groups(root: zarr.Group, attrs: dict, report: Report) -> None:
    """Groups that only hold other nodes and carry no attributes: a missing or unreadable zarr.json there
    hides everything below it from zarr's listings and breaks the writers; --repair rewrites it."""
    splits = list(attrs["splits"])
    index = [store.INDEX] if attrs.get("schema_version", 1) >= 2 else []  # index/<split> has marks: _verify_labels
    paths = ["raw", "labels", "features", "runs", *(f"{top}/{s}" for top in ("raw", "features") for s in splits),
             *(f"features/{s}/_progress" for s in splits), *index]
    zstore = root.store

    async def children(path):
        return [name async for name in zstore.list_dir(path) if name != "zarr.json"]

    for path in paths:
        if not sync(children(path)):
            continue  # absent (nothing computed yet, or a personal store's raw/): nothing hidden
        raw = store._get(zstore, f"{path}/zarr.json")
        if raw is None:
            what = "group metadata (zarr.json) missing: deleted"
        else:
            try:
                meta = json.loads(raw)
                ok = isinstance(meta, dict) and meta.get("node_type") == "group" and meta.get("zarr_format") == 3
            except ValueError:
                ok = False
            if ok:
                continue
            what = UNREADABLE
        report.problems.append(Problem(path, what, "none (`pipeline verify --repair` rewrites it)", ("regroup", path)))


def _check_repairable(path: str) -> None:
    try:
        store.check_writable(path)
    except PipelineError as exc:
        reason = re.search(r"\(([^)]*)\)", str(exc))
        raise PipelineError(f"cannot repair {path}: it cannot be written here ({reason.group(1) if reason else exc}); "
                            "nothing was changed: run `pipeline verify` without --repair to see the damage, and ask "
                            "whoever can write the store to repair it") from None


def verify(path: str, progress=None, repair: bool = False) -> Report:
    """Check the whole store; read-only. The marks are checked first, then every chunk is read, with
    ``progress(total_layers=chunks, total_bytes=bytes)`` making the bar (one step per chunk).
    ``repair``: the caller will repair what is found, so a store that cannot be written is refused first."""
    if repair:
        _check_repairable(path)
    if store.root_restorable(path):
        # Nothing else can be checked without the root; --repair restores it, then verify checks the rest.
        return Report([Problem("zarr.json", "the root metadata is missing, unreadable or incomplete", command("verify", path),
                               ("root",))])
    root = store.open_root(path, mode="r")
    attrs = root.attrs.asdict()
    busy = leases.active_holders(root.store)
    report = Report()
    reads: list[_Read] = []
    base = store.base_location(root)
    materialize = command("materialize", path)  # with the store's own source and options: materialize.resume_config
    _plain_groups(root, attrs, report)
    _verify_labels(root, path, attrs, report, reads, busy, materialize)
    if base:
        report.notes.append(f"{path} is a personal store built on {base}: its raw layers, and the features not computed "
                            f"here, are read there and not checked here; verify it on its own: "
                            f"`{command('verify', base)}`")
    else:
        _verify_raw(root, attrs, report, reads, busy, materialize)
    _verify_features(root, path, attrs, report, reads, busy)
    _verify_runs(root, path, report, reads, busy)
    _orphans(path, report)
    _damaged_leases(root, report)
    total_chunks = sum(int(np.prod(r.array.cdata_shape)) for r in reads)
    total_bytes = sum(int(np.prod(r.array.shape)) * r.array.dtype.itemsize for r in reads if r.array.dtype.kind in "biuf")
    bar = progress(total_layers=total_chunks, total_bytes=total_bytes) if progress else None
    try:
        for read in reads:
            _read_all(read, report, bar)
    finally:
        if bar:
            bar.close()
    return report


def _check_group(root, group_path: str, expected: set, n: int | None, command: str, report: Report, reads: list,
                 on_unfinished) -> None:
    """A group marked complete holds the arrays its mark names (``expected`` for marks older than that),
    each with ``n`` models; its arrays are then read in full."""
    group = _open(root, group_path, report, command, ("group", group_path))
    if group is None or not group.attrs.get("complete"):
        if group is not None or not any(p.piece == group_path for p in report.problems):
            on_unfinished()
        return
    arrays, _, damaged = _members(group)
    for name in damaged:
        report.problems.append(Problem(f"{group_path}/{name}", UNREADABLE, command,
                                       ("group", group_path, f"{group_path}/{name}/zarr.json")))
    recorded = group.attrs.get(store.MANIFEST)
    missing = set(recorded if isinstance(recorded, dict) else expected) - set(arrays) - set(damaged)
    if missing:
        report.problems.append(Problem(group_path, f"marked complete but {', '.join(sorted(missing))} missing", command,
                                       ("group", group_path)))
    for name, array in arrays.items():
        if n is not None and (array.ndim == 0 or array.shape[0] != n):
            report.problems.append(Problem(array.path, f"marked complete but has {array.shape[:1] or 'no'} models, not {n}",
                                           command, ("group", group_path)))
            continue
        reads.append(_Read(array, lambda key, _, what, group_path=group_path: report.problems.append(
            Problem(key, what, command, ("group", group_path))), True, store.manifest_of(array, group)))


def _verify_labels(root, path: str, attrs: dict, report: Report, reads: list, busy: dict, materialize: str) -> None:
    keys = {info.get("key") or safe_key(name) for name, info in attrs["labels"].items()}
    bookkeeping = {"row"} | ({"model_id"} if attrs.get("id_column") else set())
    # A personal store's labels are a copy of its base's: remaking the personal store is their repair.
    fix = (f"delete {path} and rerun your command with --personal-store {path}" if store.base_location(root) else materialize)
    for split, info in attrs["splits"].items():
        expected = {f"labels/{split}": keys}
        index = store.index_path(root, split)  # labels/<split> itself in schema 1
        expected[index] = expected.get(index, set()) | bookkeeping
        for group_path, names in expected.items():
            _check_group(root, group_path, names, info["n"], fix, report, reads,
                         lambda group_path=group_path: "materialize" in busy or report.problems.append(
                             Problem(group_path, "never finished (an interrupted materialize)", fix, ("none",))))


def _verify_raw(root, attrs: dict, report: Report, reads: list, busy: dict, materialize: str) -> None:
    for split, info in attrs["splits"].items():
        for m in attrs["modules"]:
            group_path = f"raw/{split}/{m['key']}"
            expected = {"A", "B"} | ({"rank"} if m.get("rank_varies") else set()) | ({"alpha"} if m.get("alpha_varies") else set())
            _check_group(root, group_path, expected, info["n"], materialize, report, reads,
                         lambda group_path=group_path: "materialize" in busy or report.problems.append(
                             Problem(group_path, "never finished (an interrupted materialize)", materialize, ("none",))))


def _verify_features(root, path: str, attrs: dict, report: Report, reads: list, busy: dict) -> None:
    for split in attrs["splits"]:
        recompute = command("features", path, "--split", split, "--force")
        features = _open(root, f"features/{split}", report, recompute, ("key",))
        if features is None:
            continue
        arrays, _, damaged = _members(features)
        progress = _open(root, f"features/{split}/_progress", report, recompute, ("key",))
        flags_arrays, _, damaged_flags = _members(progress) if progress is not None else ({}, None, [])
        n = attrs["splits"][split]["n"]
        # A coordinate is written once, when absent: its repair deletes it, and any features run of the split rewrites it.
        rewrite = command("features", path, "--split", split, "--rep", next(iter(sorted(flags_arrays)), "all"))
        for name in damaged:  # a representation or coordinate whose zarr.json is garbage: deleted, it is recomputed
            if name in ("layer", "module"):
                report.problems.append(Problem(f"features/{split}/{name}", UNREADABLE, rewrite, ("node", f"features/{split}/{name}")))
                continue
            recompute_rep = command("features", path, "--rep", name, "--split", split)
            report.problems.append(Problem(f"features/{split}/{name}", UNREADABLE, recompute_rep,
                                           ("key", f"features/{split}/{name}/zarr.json")))
        for name in sorted(set(flags_arrays) - set(arrays) - set(damaged)):
            if f"features/{split}/{name}" not in busy:
                report.problems.append(Problem(f"features/{split}/{name}", "array metadata (zarr.json) missing: deleted",
                                               command("features", path, "--rep", name, "--split", split), ("none",)))
        for name in sorted(k for k in arrays if k not in ("layer", "module")):
            array = arrays[name]
            recompute_rep = command("features", path, "--rep", name, "--split", split)
            flags_path = f"_progress/{name}"
            if f"features/{split}/{name}" in busy:
                continue  # being computed: its marks are not final yet
            try:
                flags = store.read(flags_arrays[name]) if name in flags_arrays and name not in damaged_flags else None
            except PipelineError:
                flags = None
            if flags is None:  # missing or damaged flags: recompute the representation
                report.problems.append(Problem(f"features/{split}/{flags_path}", "progress flags missing or unreadable",
                                               recompute_rep + " --force", ("none",)))
                continue
            complete = bool(array.attrs.get("complete"))
            if not complete:
                report.problems.append(Problem(array.path, f"never finished ({int(flags.sum())}/{len(flags)} chunks; "
                                               "an interrupted features run)", recompute_rep, ("none",)))
            elif not flags.all() or array.shape[0] != n:
                report.problems.append(Problem(array.path, "marked complete but chunks are missing", recompute_rep + " --force",
                                               ("none",)))
                continue

            def bad(key, index, what, features=features, name=name, recompute_rep=recompute_rep):
                report.problems.append(Problem(key, what, recompute_rep, ("flag", features.path, name, index[0])))

            reads.append(_Read(array, bad, complete, store.manifest_of(array)))
        for coordinate in ("layer", "module"):
            if coordinate in arrays:
                reads.append(_Read(arrays[coordinate], lambda key, _, what, node=f"features/{split}/{coordinate}", rewrite=rewrite:
                                   report.problems.append(Problem(key, what, rewrite, ("node", node))), True, None, False))


def _saved_configuration(zstore, path: str) -> dict | None:
    """The configuration's attrs as a complete run under ``path`` recorded them in its mark, if one did."""
    async def children():
        return [name async for name in zstore.list_dir(path) if store.run_number(name) is not None]

    for name in sorted(sync(children())):
        raw = store._get(zstore, f"{path}/{name}/zarr.json")
        try:
            saved = json.loads(raw).get("attributes", {}).get("configuration") if raw else None
        except (ValueError, AttributeError):
            continue
        if isinstance(saved, dict) and saved.get("config"):
            return saved
    return None


def _verify_runs(root, path: str, report: Report, reads: list, busy: dict) -> None:
    runs = _open(root, store.RUNS, report, command("train", path), ("key",))
    if runs is None:
        return
    _, groups, damaged = _members(runs)  # listed damage-tolerantly, unlike store.configurations
    for digest in damaged:  # its attributes (the configuration) are lost; each run's mark keeps a copy of them
        saved = _saved_configuration(root.store, store.run_path(digest))
        if saved is not None:
            report.problems.append(Problem(store.run_path(digest), UNREADABLE, "none (`pipeline verify --repair` rewrites "
                                           "it from its runs' marks)", ("reconfig", store.run_path(digest), saved)))
        else:  # runs written before their marks kept it: nothing is deleted, the user knows the options
            report.problems.append(Problem(store.run_path(digest), UNREADABLE, "none automatic: its options were in this file; "
                                           "retrain it with the options you gave `pipeline train`, adding --force",
                                           ("none",)))
    for digest, group in groups.items():
        if f"train/{digest}" in busy:
            continue
        config = group.attrs.get("config")
        _, run_groups, damaged_runs = _members(group)
        keys = sorted(k for k in [*run_groups, *damaged_runs] if store.run_number(k) is not None)
        try:
            retrain = train_command(path, config, len(keys)) if config else command("train", path)
        except (KeyError, TypeError, AttributeError):  # a damaged config: the plain command, with the user's options
            retrain = command("train", path)
        for key in keys:
            run_path = f"{store.run_path(digest)}/{key}"
            _check_group(root, run_path, {"test_pred", "test_true", "epoch"}, None, retrain, report, reads,
                         lambda run_path=run_path: report.problems.append(
                             Problem(run_path, "never finished (an interrupted train)", retrain, ("none",))))


def _orphans(path: str, report: Report) -> None:
    """Temporary files of writes that were killed (zarr writes ``<name>.<uuid>.partial``, then renames it)."""
    if store.is_url(path):
        return
    local = store.local_path(path)
    if not local.is_dir():
        return
    for orphan in sorted(local.rglob("*.partial")):
        report.problems.append(Problem(orphan.relative_to(local).as_posix(), "orphaned temporary file of a killed write",
                                       "none (`pipeline verify --repair` deletes it)", ("delete", str(orphan))))


def _damaged_leases(root: zarr.Group, report: Report) -> None:
    for key in leases.damaged_files(root.store):
        report.problems.append(Problem(key, "damaged lease file (empty, not JSON, or fields missing); commands treat it "
                                            "as expired and take its work over", "none (`pipeline verify --repair` deletes it)",
                                       ("lease", key)))


def repair(path: str, problems: list[Problem]) -> list[str]:
    """Clear the marks of the damaged pieces so the normal commands redo them; returns those commands, in order.

    Unreadable metadata is deleted first, so that the marks can then be written over it.
    """
    _check_repairable(path)
    if any(p.reset[0] == "root" for p in problems):  # restored from the copy in index/; then verify checks the rest
        store.restore_root(path)
        return [command("verify", path)]
    zstore = store.zarr_store(path)
    for problem in problems:
        kind, keys = problem.reset[0], problem.reset[2:] if problem.reset[0] == "group" else problem.reset[1:]
        if kind in ("group", "key", "regroup"):
            for key in keys if kind != "regroup" else [f"{problem.reset[1]}/zarr.json"]:
                sync(zstore.delete(key))
        elif kind == "reconfig":
            store.write_group_metadata(zstore, problem.reset[1], problem.reset[2])
        elif kind == "node":
            sync(zstore.delete_dir(problem.reset[1]))
        elif kind == "lease":
            leases.discard(zstore, problem.reset[1])
        elif kind == "delete":
            Path(problem.reset[1]).unlink(missing_ok=True)
    root = store.open_root(path, mode="r+")
    for problem in sorted(problems, key=lambda p: p.reset[0] != "regroup"):  # parents first
        kind = problem.reset[0]
        if kind == "regroup":
            group = root.require_group(problem.reset[1])
            if problem.reset[1] == store.INDEX:  # it holds the copy of the root attrs: write it again
                store.update_attrs(group, store.index_attrs(root.attrs.asdict()))
        elif kind == "group":
            store.mark_incomplete(root, problem.reset[1])
        elif kind == "flag":
            _, features_path, name, chunk = problem.reset
            features = root[features_path]
            store.writable(features[f"_progress/{name}"])[chunk] = 0  # a chunk of 0s, stored like any other
            store.update_attrs(features[name], {"complete": False, store.MANIFEST: None})
    order = {"pipeline materialize": 0, "pipeline features": 1, "pipeline train": 2, "pipeline verify": 3}
    commands = sorted({p.repair for p in problems if p.repair.startswith("pipeline ")},
                      key=lambda c: (min(v for k, v in order.items() if c.startswith(k)), c))
    return commands
