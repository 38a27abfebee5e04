"""``pipeline verify``: read every chunk of a store, check every checksum and every completion mark.

Every array of the store carries a crc32c checksum per chunk (the last codec of its chain), which
zarr checks on each read; reading every chunk is therefore checking every checksum. Marks are
checked against the data: a complete raw group must hold its arrays at the split's size, a
complete representation must have every chunk's progress flag set, a complete run its arrays.

Each problem names the piece and the command that repairs it. ``repair`` (``verify --repair``)
makes the normal commands redo exactly the damaged pieces: it clears the complete mark of a
damaged raw or label group and of a damaged run, and the progress flag of a damaged feature chunk,
so that ``materialize``, ``features`` and ``train`` recompute those and nothing else.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from . import leases, store
from .commands import command
from .train import train_command


@dataclass(frozen=True)
class Problem:
    piece: str  # what is damaged: an array chunk's key, or a group
    what: str  # what is wrong with it
    repair: str  # the command that rebuilds it (after `pipeline verify --repair`)
    reset: tuple  # what --repair resets: ("group", path) or ("flag", features group, rep, chunk)

    def line(self) -> str:
        return f"{self.piece}: {self.what}; repair: {self.repair}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    bytes: int = 0  # uncompressed bytes read


def _chunk_slices(array: zarr.Array):
    """(chunk key, selection) for every chunk of ``array``."""
    for index in itertools.product(*(range(n) for n in array.cdata_shape)):
        selection = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, array.chunks, array.shape))
        yield f"{array.path}/c/" + "/".join(map(str, index)), index, selection


def _read_all(array: zarr.Array, report: Report, on_bad, bar=None) -> None:
    """Read ``array`` chunk by chunk; ``on_bad(key, index, message)`` for each chunk that fails its checksum."""
    report.arrays += 1
    for key, index, selection in _chunk_slices(array):
        try:
            values = array[selection]
        except Exception as exc:  # noqa: BLE001 - a damaged chunk raises whatever its codec raises
            on_bad(key, index, f"unreadable chunk ({str(exc).splitlines()[0][:80]})")
            continue
        nbytes = values.nbytes if isinstance(values, np.ndarray) and values.dtype.kind != "O" else 0
        report.chunks += 1
        report.bytes += nbytes
        if bar:
            bar.update(layers=1, nbytes=nbytes)


def _arrays(group: zarr.Group):
    for name in sorted(group.array_keys()):
        yield group[name]


def verify(path: str, progress=None) -> Report:
    """Check the whole store; read-only. The marks are checked first, then every chunk is read, with
    ``progress(total_layers=chunks, total_bytes=bytes)`` making the bar (one step per chunk)."""
    if store.is_damaged_ours(path) and store.root_copy(path) is not None:
        # Nothing else can be checked without the root; --repair restores it, then verify checks the rest.
        return Report([Problem("zarr.json", "the root metadata is missing or unreadable", command("verify", path),
                               ("root",))])
    root = store.open_root(path, mode="r")
    attrs = root.attrs.asdict()
    busy = leases.active_holders(root.store)
    report = Report()
    reads: list = []  # (array, on_bad): what to read once the marks are checked
    _verify_raw(root, path, attrs, report, reads, busy)
    _verify_features(root, path, attrs, report, reads, busy)
    _verify_runs(root, path, report, reads, busy)
    _orphans(path, report)
    total_chunks = sum(int(np.prod(array.cdata_shape)) for array, _ in reads)
    total_bytes = sum(int(np.prod(array.shape)) * array.dtype.itemsize for array, _ in reads if array.dtype.kind in "biuf")
    bar = progress(total_layers=total_chunks, total_bytes=total_bytes) if progress else None
    try:
        for array, on_bad in reads:
            _read_all(array, report, on_bad, bar)
    finally:
        if bar:
            bar.close()
    return report


def _verify_raw(root, path: str, attrs: dict, report: Report, reads: list, busy: dict) -> None:
    materialize = command("materialize", path)  # the store's own source and options: materialize.resume_config
    label_keys = {info.get("key") or store.safe_key(name) for name, info in attrs["labels"].items()}
    expected_of = {}
    for split in attrs["splits"]:
        expected_of[store.index_path(root, split)] = {"row"}
        expected_of[f"labels/{split}"] = label_keys | expected_of.get(f"labels/{split}", set())
    groups = [(path, None) for path in expected_of]
    groups += [(f"raw/{split}/{m['key']}", split) for split in attrs["splits"] for m in attrs["modules"]]
    for group_path, split in groups:
        if not store.group_complete(root, group_path):
            if "materialize" not in busy:
                report.problems.append(Problem(group_path, "never finished (an interrupted materialize)", materialize,
                                               ("none",)))
            continue
        group = root[group_path]
        n = attrs["splits"][group_path.split("/")[1]]["n"]
        names = set(group.array_keys())
        expected = {"A", "B"} if split else expected_of[group_path]
        if not expected <= names:
            report.problems.append(Problem(group_path, f"marked complete but {', '.join(sorted(expected - names))} missing",
                                           materialize, ("group", group_path)))
            continue
        for array in _arrays(group):
            if array.shape[0] != n:
                report.problems.append(Problem(array.path, f"marked complete but has {array.shape[0]} models, not {n}",
                                               materialize, ("group", group_path)))
                continue
            reads.append((array, lambda key, _, what, group_path=group_path: report.problems.append(
                Problem(key, what, materialize, ("group", group_path)))))


def _verify_features(root, path: str, attrs: dict, report: Report, reads: list, busy: dict) -> None:
    for split in attrs["splits"]:
        features = root.get(f"features/{split}")
        if features is None:
            continue
        n = attrs["splits"][split]["n"]
        for name in sorted(k for k in features.array_keys() if k not in ("layer", "module")):
            array = features[name]
            command = f"pipeline features --store {path} --rep {name} --split {split}"
            flags_path = f"_progress/{name}"
            if f"features/{split}/{name}" in busy:
                continue  # being computed: its marks are not final yet
            try:
                flags = features[flags_path][:]
            except Exception:  # noqa: BLE001 - missing or damaged flags: recompute the representation
                report.problems.append(Problem(f"features/{split}/{flags_path}", "progress flags missing or unreadable",
                                               command + " --force", ("none",)))
                continue
            complete = bool(array.attrs.get("complete"))
            if not complete:
                report.problems.append(Problem(array.path, f"never finished ({int(flags.sum())}/{len(flags)} chunks; "
                                               "an interrupted features run)", command, ("none",)))
            elif not flags.all() or array.shape[0] != n:
                report.problems.append(Problem(array.path, "marked complete but chunks are missing", command + " --force",
                                               ("none",)))
                continue

            def bad(key, index, what, features=features, name=name, command=command):
                report.problems.append(Problem(key, what, command, ("flag", features.path, name, index[0])))

            reads.append((array, bad))
        for coordinate in ("layer", "module"):
            if coordinate in features:
                reads.append((features[coordinate], lambda key, _, what, split=split: report.problems.append(
                    Problem(key, what, f"pipeline features --store {path} --split {split} --force", ("none",)))))


def _verify_runs(root, path: str, report: Report, reads: list, busy: dict) -> None:
    runs = root.get("runs")
    for digest in sorted(runs.group_keys()) if runs is not None else []:
        if f"train/{digest}" in busy:
            continue
        group = runs[digest]
        config = group.attrs.get("config")
        keys = sorted(k for k in group.group_keys() if k.startswith("run-"))
        command = train_command(path, config, len(keys)) if config else f"pipeline train --store {path}"
        for key in keys:
            run = group[key]
            run_path = f"runs/{digest}/{key}"
            if not run.attrs.get("complete"):
                report.problems.append(Problem(run_path, "never finished (an interrupted train)", command, ("none",)))
                continue
            missing = {"test_pred", "test_true", "epoch"} - set(run.array_keys())
            if missing:
                report.problems.append(Problem(run_path, f"marked complete but {', '.join(sorted(missing))} missing", command,
                                               ("group", run_path)))
                continue
            for array in _arrays(run):
                reads.append((array, lambda k, _, what, run_path=run_path: report.problems.append(
                    Problem(k, what, command, ("group", run_path)))))


def _orphans(path: str, report: Report) -> None:
    """Temporary files of writes that were killed (zarr writes ``<name>.<uuid>.partial``, then renames it)."""
    local = Path(path)
    if not local.is_dir():
        return
    for orphan in sorted(local.rglob("*.partial")):
        report.problems.append(Problem(orphan.relative_to(local).as_posix(), "orphaned temporary file of a killed write",
                                       "none (`pipeline verify --repair` deletes it)", ("delete", str(orphan))))


def repair(path: str, problems: list[Problem]) -> list[str]:
    """Clear the marks of the damaged pieces so the normal commands redo them; returns those commands, in order."""
    if any(p.reset[0] == "root" for p in problems):
        store.check_writable(path)
        store.restore_root(path)
        return [command("verify", path)]
    root = store.open_root(path, mode="r+")
    for problem in problems:
        kind = problem.reset[0]
        if kind == "group":
            store.mark_incomplete(root, problem.reset[1])
        elif kind == "flag":
            _, features_path, name, chunk = problem.reset
            features = root[features_path]
            features[f"_progress/{name}"][chunk] = 0
            store.update_attrs(features[name], {"complete": False})
        elif kind == "delete":
            Path(problem.reset[1]).unlink(missing_ok=True)
    order = {"pipeline materialize": 0, "pipeline features": 1, "pipeline train": 2, "pipeline verify": 3}
    commands = sorted({p.repair for p in problems if p.repair.startswith("pipeline ")},
                      key=lambda c: (min(v for k, v in order.items() if c.startswith(k)), c))
    return commands
