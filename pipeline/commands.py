"""The commands a message tells the user to run: built in this one place, shell-quoted, exactly as they work.

A command printed by an error, by ``verify`` or by Ctrl-C must run as printed: paths with spaces
or quotes survive copy-and-paste because every argument goes through ``shlex.join``.
"""

from __future__ import annotations

import shlex
from dataclasses import fields

from .errors import PipelineError
from . import models
from .hyper import Hyper


def command(stage: str, store: str, *args) -> str:
    """``pipeline STAGE --store STORE ARGS...``, shell-quoted."""
    return shlex.join(["pipeline", stage, "--store", str(store), *(str(a) for a in args)])


def quoted(stage: str, store: str, *args) -> str:
    """The same, in backquotes, for the middle of a message."""
    return f"`{command(stage, store, *args)}`"


_MATERIALIZE_FLAGS = {  # MaterializeConfig field -> option of `pipeline materialize` (the split: _split_args)
    "source": "--source", "labels_csv": "--labels-csv", "split_column": "--split-column", "min_split": "--min-split",
    "layers": "--modules", "split_seed": "--split-seed", "memory": "--memory", "chunk_mb": "--chunk-mb", "codec": "--codec",
}


def materialize_args(recorded: dict) -> list[str]:
    """The options of a recorded materialize config (root attr ``materialize_config``) as command-line arguments."""
    args: list[str] = []
    for name, flag in _MATERIALIZE_FLAGS.items():
        value = recorded.get(name)
        if value is not None:
            args += [flag, f"{value}B" if name == "memory" else value]
    args += _split_args(recorded.get("test_size"), recorded.get("val_test_size"))
    for label in recorded.get("labels") or ():
        args += ["--label", label]
    if recorded.get("allow_nonfinite"):
        args.append("--allow-nonfinite")
    if recorded.get("verify_source"):
        args.append("--verify-source")
    return args


def _split_args(test_size, val_test_size) -> list:
    """``--val-size V --test-size T`` for a recorded split, or, where those shares would not give back exactly the
    recorded sizes (a store's layout compares them bit for bit), the old spelling that does."""
    if test_size is None or val_test_size is None:  # not recorded: the defaults
        return []
    from .splits import datasets_sizes, shares_of_all  # here: splits imports the datasets library

    shares = shares_of_all(test_size, val_test_size)
    try:
        exact = datasets_sizes(*shares) == (test_size, val_test_size)
    except PipelineError:  # sizes no pair of shares gives back: the old spelling says them as they are
        exact = False
    if exact:
        return ["--val-size", shares[0], "--test-size", shares[1]]
    return ["--test-size", test_size, "--val-test-size", val_test_size]


def train_command(store: str, config: dict, runs: int) -> str:
    """The ``pipeline train`` call that (re)trains a stored configuration (``runs/<digest>`` attrs "config"): its
    representations, layer set, label, model and seed, and each recorded hyper-parameter that is not the default."""
    args = ["--rep", "+".join(r["name"] for r in config["reps"]), "--layers", config["layer_set"],
            "--label", config["label"], "--model", config["model"], "--seed", config["seed"], "--runs", runs]
    if config.get("task") == "regression":  # auto for a float label, but not for an integer one: say it
        args[-2:-2] = ["--task", "regression"]
    model = models.REGISTRY.get(config["model"])
    options = model.options() if model else [f.name for f in fields(Hyper)]  # the fixed ones are not options
    defaults = Hyper()
    for name in options:
        value = config.get(name, getattr(defaults, name))  # not recorded: the configuration was made before it existed
        if value != getattr(defaults, name):
            args += [f"--{name.replace('_', '-')}", value]
    return command("train", store, *args)
