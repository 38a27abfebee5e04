"""``pipeline train --dry-run``: the grid ``train`` would run, each configuration's hash and runs to train, and
what it would cost (FLOPs from the store's sizes; seconds from the timings of the runs already stored). Reads only.
"""

from __future__ import annotations

import math
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

    @property
    def todo(self) -> int:
        return sum(p.todo for p in self.configurations)

    @property
    def seconds(self) -> float | None:
        return None if self.seconds_per_gflop is None else sum(p.seconds or 0.0 for p in self.configurations)


LBFGS_EVALUATIONS = 300  # a typical count for the linear probe's whole grid (pipeline/linear_probe.py; at most ~MAX_ITER)


def _parameters(width: int, classes: int, hp: dict) -> int:
    """Weights of one run's network (the matmul FLOPs per row are twice this)."""
    if hp["depth"] == 0:
        return width * classes
    return width * hp["hidden"] + (hp["depth"] - 1) * hp["hidden"] ** 2 + hp["hidden"] * classes


def _flops(width: int, classes: int, hp: dict, model: str, n: dict, epochs: float, runs: int, voter_values: int = 0) -> float:
    """FLOPs of training ``runs`` runs of one configuration. Epoch-trained models: about 6 per weight per training
    row (forward and backward) and 2 per validation row, per epoch, per run. The deterministic models fit once for
    all runs: linear, about 4 per weight per training row per L-BFGS evaluation, for each C of its grid; knn-vote,
    about 3 per voter value (``voter_values`` per adapter) per pair of an adapter and a training adapter, for
    the train and val splits twice (its curves, then the metrics) and test twice (best, last)."""
    from .linear_probe import GRID

    if runs == 0:
        return 0.0
    if model == "linear":
        return len(GRID) * (width + 1) * classes * 4 * n["train"] * LBFGS_EVALUATIONS
    if model == "knn-vote":
        return 3 * voter_values * n["train"] * 2 * (n["train"] + n["val"] + n["test"])
    return runs * _parameters(width, classes, hp) * (6 * n["train"] + 2 * n["val"]) * epochs


def _voter_values(root: zarr.Group, names: list[str]) -> int:
    """Numbers knn-vote compares per adapter: r singular values of each of A, B and B A per module."""
    rank = {m["name"]: m["rank"] for m in root.attrs["modules"]}
    return 3 * sum(rank[name] for name in names if name in rank)


def _timings(root: zarr.Group) -> tuple[list[float], list[float]]:
    """(seconds per GFLOP, share of the epoch budget used) of every finished run stored."""
    rates, used = [], []
    for _, group in store.configurations(root):
        a = group.attrs.asdict()
        conf = a.get("config") or {}
        if not {"feature_width", "n", "classes", "task"} <= set(a) or "epochs" not in conf:
            continue
        classes = len(a["classes"]) if a["task"] == "classification" else 1
        values = _voter_values(root, (a.get("layers") or {}).get(models.RAW, []))
        for run in store.runs_of(group, complete=True).values():
            r = run.attrs
            size = r.get("ensemble_size", 1)
            flops = _flops(a["feature_width"], classes, conf, a["model"], a["n"], r["epochs"], size, values) / size
            if flops > 0 and r.get("seconds"):
                rates.append(r["seconds"] / (flops / 1e9))
                if conf["epochs"] > 0:  # the models that take no --epochs record 0
                    used.append(r["epochs"] / conf["epochs"])
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
    rates, used = _timings(root)
    rate = float(np.median(rates)) if rates else None
    expected = config.epochs * (float(np.median(used)) if used else 1.0)
    hp = asdict(config.hyper())
    out = []
    for setup in plan_grid(root, config):
        layers, width = {}, 0
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
                modules = root.attrs["modules"]
                width += sum(modules[i]["rank"] * (modules[i]["in"] + modules[i]["out"]) for i in index)
            else:
                shape = feature_home(root, name)[f"features/train/{name}"].shape
                width += len(index) * math.prod(shape[2:])
        data = Data({}, {}, keep, task, classes, layers)
        digest = config_hash(config_dict(root, config, setup, data))
        finished = 0 if config.force else len(finished_runs(root, digest) & set(range(config.runs)))
        todo = config.runs - finished
        values = _voter_values(root, layers.get(models.RAW, []))
        flops = _flops(width, len(classes) if task == "classification" else 1, hp, config.model, n, expected, todo, values)
        out.append(Planned(setup, digest, width, finished, todo, flops, None if rate is None else rate * flops / 1e9))
    return Plan(out, n, len(rates), rate)
