"""``pipeline train --dry-run``: the grid ``train`` would run, each configuration's hash and runs to train, and
what it would cost (FLOPs from the store's sizes; seconds from the timings of the runs already stored). Reads only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, replace

import numpy as np
import zarr

from . import models, rawdata, store
from .errors import PipelineError
from .train import (SPLITS, Data, Setup, TrainConfig, axis_names, check_fresh, check_splits, check_task, config_dict,
                    config_hash, feature_home, finished_runs, load_labels, plan_grid, resolve_label, select)


@dataclass
class Planned:
    """One configuration of the grid as ``--dry-run`` sees it."""

    setup: Setup
    config_hash: str
    width: int
    finished: int
    todo: int
    flops: float  # of the runs to train, at the expected epoch count
    seconds: float | None  # from the stored runs' timings; None without any


@dataclass
class Plan:
    configurations: list[Planned]
    n: dict  # rows per split
    timed_runs: int  # stored runs the estimate is based on
    seconds_per_gflop: float | None
    timed_by: str = ""  # the model whose stored runs time the estimate; "" for every stored run (none of its own)

    @property
    def todo(self) -> int:
        return sum(p.todo for p in self.configurations)

    @property
    def seconds(self) -> float | None:
        return None if self.seconds_per_gflop is None else sum(p.seconds or 0.0 for p in self.configurations)


def _shapes(root: zarr.Group, names: list[str]) -> tuple:
    """(rank, in, out) of each named raw module."""
    modules = {m["name"]: m for m in root.attrs["modules"]}
    return tuple((modules[n]["rank"], modules[n]["in"], modules[n]["out"]) for n in names if n in modules)


def _timings(root: zarr.Group) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per model: (seconds per GFLOP, share of the epoch budget used) of every finished run stored."""
    rates, used = defaultdict(list), defaultdict(list)
    for _, group in store.configurations(root):
        a = group.attrs.asdict()
        conf = a.get("config") or {}
        if not {"feature_width", "n", "classes", "task"} <= set(a) or "epochs" not in conf:
            continue
        if a["model"] not in models.REGISTRY:
            continue
        size = models.Size(a["feature_width"], _shapes(root, (a.get("layers") or {}).get(models.RAW, [])),
                           len(a["classes"]) if a["task"] == "classification" else 1, a["n"])
        for run in store.runs_of(group, complete=True).values():
            r = run.attrs
            together = r.get("ensemble_size", 1)
            flops = models.get(a["model"]).flops(size, conf, r["epochs"], together) / together
            if flops > 0 and r.get("seconds"):
                rates[a["model"]].append(r["seconds"] / (flops / 1e9))
                if conf["epochs"] > 0:  # the models that take no --epochs record 0
                    used[a["model"]].append(r["epochs"] / conf["epochs"])
    return rates, used


def plan(config: TrainConfig) -> Plan:
    """What ``train`` would do with this config: each configuration's hash, width, finished runs and runs to train,
    and its cost (FLOPs from the store's sizes; seconds from the timings of the runs already stored). Reads only."""
    location = config.output if config.output and store.is_ours(config.output) else config.store
    root = store.open_root(location, mode="r")
    check_splits(root, location)
    config = replace(config, label=resolve_label(root, location, config.label))
    keep, _, task, classes = load_labels(root, location, config.label, config.task)
    check_task(config.model, task, config.label)
    n = {s: int(len(keep[s])) for s in SPLITS}
    by_model, used_by_model = _timings(root)
    # a model's own runs time it (a GL-net step and an MLP step use the machine very differently); else all runs
    timed_by = config.model if by_model.get(config.model) else ""
    rates = by_model[timed_by] if timed_by else [x for v in by_model.values() for x in v]
    used = used_by_model[timed_by] if used_by_model.get(timed_by) else [x for v in used_by_model.values() for x in v]
    rate = float(np.median(rates)) if rates else None
    expected = config.given().epochs * (float(np.median(used)) if used else 1.0)
    hp = asdict(config.hyper())
    out = []
    for setup in plan_grid(root, config):
        layers, width, shapes = {}, 0, ()
        for name in setup.reps:
            if name == models.RAW:
                rawdata.check(root, location, SPLITS)
            else:
                check_fresh(root, location, name)
            names = axis_names(root, name)
            index = select(names, setup.layer_set)
            if len(index) == 0:
                raise PipelineError(f"layer set {setup.layer_set!r} matches none of the {len(names)} names of {name!r}")
            layers[name] = [names[i] for i in index]
            if name == models.RAW:  # the numbers of A and B of each module
                shapes = _shapes(root, layers[name])
                width += sum(r * (fan_in + fan_out) for r, fan_in, fan_out in shapes)
            else:
                shape = feature_home(root, name)[f"features/train/{name}"].shape
                width += len(index) * math.prod(shape[2:])
        data = Data({}, {}, keep, task, classes, layers)
        digest = config_hash(config_dict(root, config, setup, data))
        finished = 0 if config.force else len(finished_runs(root, digest) & set(range(config.runs)))
        todo = config.runs - finished
        size = models.Size(width, shapes, len(classes) if task == "classification" else 1, n)
        flops = models.get(config.model).flops(size, hp, expected, todo)
        out.append(Planned(setup, digest, width, finished, todo, flops, None if rate is None else rate * flops / 1e9))
    return Plan(out, n, len(rates), rate, timed_by)
