"""Read-only tables of a store's training results: ``load_runs`` (one row per finished run) and ``load_predictions``.

Every configuration is its own set of rows, keyed by its config hash: nothing is merged by representation.
A personal (``--output``) store shows its own runs and those of the store it builds on. Only runs whose
complete mark is written are read (docs/train.md: ``runs/<config hash>/run-NNN``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import zarr

from . import store as store_mod
from .commands import quoted
from .errors import PipelineError
from .views import adapter_ids

# The columns every load_runs frame has, in this order, before the flattened metrics (<split>_<metric>).
RUN_COLUMNS = ("config_hash", "run", "seed", "name", "reps", "layer_set", "label", "task", "model", "trained_by",
               "trained_at", "store")
PREDICTION_COLUMNS = ("config_hash", "run", "seed", "name", "label", "adapter", "row", "y_true", "y_pred", "true", "pred",
                      "correct")
# What load_runs takes from a run's mark besides its metrics; "epochs" (epochs run) would clash with the maximum.
_RUN_FIELDS = {"score": "score", "best_epoch": "best_epoch", "epochs": "epochs_run", "device": "device", "seconds": "seconds",
               "ensemble_seconds": "ensemble_seconds", "ensemble_size": "ensemble_size"}


@dataclass(frozen=True)
class _Run:
    """One finished run: where it is stored, its configuration (the runs/<hash> attrs) and its complete mark."""

    store: str
    config_hash: str
    configuration: dict
    mark: dict
    group: zarr.Group  # runs/<hash>/run-NNN


def load_runs(store: str) -> pd.DataFrame:
    """One row per finished run: its configuration, who trained it and when, and every stored metric.

    Columns: RUN_COLUMNS, then every entry of the configuration (hyper-parameters such as ``lr``, ``hidden``,
    ``depth``, ``epochs`` (the maximum), ``batch_size``; ``base_seed``, ``layers_hash``, ``train_version``,
    ``rep_spec_hashes``, ...), the run's own record (``best_epoch``, ``epochs_run``, ``seconds``, ``device``,
    ...), and the metrics flattened: ``test_accuracy``, ``val_f1``, ``last_epoch_test_accuracy``, ... (``r2``,
    ``mae``, ``rmse`` for a regression). ``reps`` is "a+b" for concatenated representations.
    """
    rows = [(_run_row(run), _run_metrics(run)) for run in _finished_runs(store)]
    if not rows:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    frame = pd.DataFrame([{**row, **values} for row, values in rows])
    frame["trained_at"] = pd.to_datetime(frame["trained_at"], utc=True, errors="coerce")
    metrics = sorted({name for _, values in rows for name in values})
    rest = [c for c in frame.columns if c not in RUN_COLUMNS and c not in metrics]
    frame = frame[[*RUN_COLUMNS, *rest, *metrics]]
    return frame.sort_values(["label", "model", "reps", "layer_set", "config_hash", "run"], kind="stable").reset_index(drop=True)


def load_predictions(store: str, config: str | list[str] | None = None, runs: int | list[int] | None = None) -> pd.DataFrame:
    """Each finished run's prediction for every test adapter, with the true label: one row per (run, adapter).

    config: a config hash (or an unambiguous prefix of one), a list of them, or None for every configuration;
    runs: a run number, a list, or None for all. Columns: PREDICTION_COLUMNS; ``adapter`` is the id of
    ``open_features`` (so the two join), ``y_true``/``y_pred`` are class codes (or values, for a regression),
    ``true``/``pred`` the class names and ``correct`` whether they agree (NA for a regression).
    """
    finished = _finished_runs(store)
    wanted = _config_hashes(store, finished, config)
    numbers = None if runs is None else {int(runs)} if isinstance(runs, (int, np.integer)) else {int(r) for r in runs}
    chosen = [r for r in finished if r.config_hash in wanted and (numbers is None or r.mark.get("run") in numbers)]
    if not chosen:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    root = store_mod.open_root(store, mode="r")
    ids = adapter_ids(root, store)["test"]
    rows_of = store_mod.read_array(root, store_mod.index_path(root, "test", "row"))
    frames = [_predictions(run, ids, rows_of) for run in chosen]
    return pd.concat(frames, ignore_index=True)[list(PREDICTION_COLUMNS)]


# --- walking runs/ -----------------------------------------------------------------------------------------


def _finished_runs(location: str) -> list[_Run]:
    """Every finished run of the store at ``location`` and of the store it builds on, in (hash, run) order.

    Walks runs/ through the store's one parser of it (``store.configurations``, ``runs_of``). A run that both stores hold (the same configuration trained in each) is
    read from the store itself, as its features are.
    """
    root = store_mod.open_root(location, mode="r")
    homes = [(str(location), root)]
    base = store_mod.base_location(root)
    if base:
        homes.append((base, store_mod.open_root(base, mode="r")))
    found: dict[tuple[str, int], _Run] = {}
    for home_location, home in homes:
        with store_mod.damaged_metadata_is_one_line(home_location, "runs/"):
            for digest, group in store_mod.configurations(home):
                for run, node in store_mod.runs_of(group, complete=True).items():
                    mark = node.attrs.asdict()
                    # A lost runs/<hash>/zarr.json is restored from the copy every run's mark carries.
                    configuration = group.attrs.asdict() or mark.get("configuration", {})
                    found.setdefault((digest, run), _Run(home_location, digest, configuration, mark, node))
    return [found[key] for key in sorted(found)]


def _run_row(run: _Run) -> dict:
    conf, mark = run.configuration, run.mark
    config = dict(conf.get("config", {}))
    reps = conf.get("reps") or [r["name"] for r in config.get("reps", [])]
    row = {"config_hash": run.config_hash, "run": mark.get("run"), "seed": mark.get("seed"), "name": conf.get("name"),
           "reps": "+".join(reps), "layer_set": conf.get("layer_set"), "label": conf.get("label"), "task": conf.get("task"),
           "model": conf.get("model"), "trained_by": mark.get("by"), "trained_at": mark.get("at"), "store": run.store}
    for key, value in config.items():
        if key == "reps":
            row["rep_spec_hashes"] = "+".join(r.get("spec_hash", "") for r in value)
        elif key == "seed":
            row["base_seed"] = value  # run r is trained with seed base_seed + r
        elif key not in row:
            row[key] = value
    row["feature_width"] = conf.get("feature_width")
    row.update({f"n_{split}": n for split, n in (conf.get("n") or {}).items()})
    row.update({column: mark[key] for key, column in _RUN_FIELDS.items() if key in mark})
    return row


def _run_metrics(run: _Run) -> dict:
    """Every metric of a run, flattened: metrics {split: {name}} -> <split>_<name>, last_epoch_<split>_<name>."""
    out = {}
    for prefix, key in (("", "metrics"), ("last_epoch_", "last_epoch_metrics")):
        for split, values in (run.mark.get(key) or {}).items():
            out.update({f"{prefix}{split}_{name}": value for name, value in values.items()})
    return out


def _config_hashes(location: str, finished: list[_Run], config) -> set[str]:
    known = sorted({r.config_hash for r in finished})
    if config is None:
        return set(known)
    asked = [config] if isinstance(config, str) else [str(c) for c in config]
    out = set()
    for prefix in asked:
        matches = [h for h in known if h.startswith(prefix)]
        if len(matches) != 1:
            what = "no finished run" if not matches else f"{len(matches)} configurations ({', '.join(matches[:4])})"
            raise PipelineError(f"config {prefix!r} matches {what} in store {location}; "
                                f"{quoted('info', location)} lists them (or pipeline.load_runs)")
        out.add(matches[0])
    return out


def _predictions(run: _Run, ids: np.ndarray, rows_of: np.ndarray) -> pd.DataFrame:
    index = store_mod.read_array(run.group, "test_index")
    y_true = store_mod.read_array(run.group, "test_true")
    y_pred = store_mod.read_array(run.group, "test_pred")
    classification = run.configuration.get("task") == "classification"
    frame = pd.DataFrame({"config_hash": run.config_hash, "run": run.mark.get("run"), "seed": run.mark.get("seed"),
                          "name": run.configuration.get("name"), "label": run.configuration.get("label"),
                          "adapter": ids[index], "row": rows_of[index], "y_true": y_true, "y_pred": y_pred})
    if classification:
        classes = np.asarray(run.configuration.get("classes", []), dtype=object)
        frame["true"], frame["pred"] = classes[y_true], classes[y_pred]
        frame["correct"] = y_true == y_pred
    else:
        frame["true"] = frame["pred"] = None
        frame["correct"] = pd.NA
    return frame
