"""The commands a message tells the user to run: built in this one place, shell-quoted, exactly as they work.

A command printed by an error, by ``verify`` or by Ctrl-C must run as printed: paths with spaces
or quotes survive copy-and-paste because every argument goes through ``shlex.join``.
"""

from __future__ import annotations

import shlex


def command(stage: str, store: str, *args) -> str:
    """``pipeline STAGE --store STORE ARGS...``, shell-quoted."""
    return shlex.join(["pipeline", stage, "--store", str(store), *(str(a) for a in args)])


def quoted(stage: str, store: str, *args) -> str:
    """The same, in backquotes, for the middle of a message."""
    return f"`{command(stage, store, *args)}`"


_MATERIALIZE_FLAGS = {  # MaterializeConfig field -> option of `pipeline materialize`
    "source": "--source", "labels_csv": "--labels-csv", "split_column": "--split-column", "min_split": "--min-split", "layers": "--layers", "test_size": "--test-size",
    "val_test_size": "--val-test-size", "split_seed": "--split-seed", "memory": "--memory", "chunk_mb": "--chunk-mb",
    "codec": "--codec",
}


def materialize_args(recorded: dict) -> list[str]:
    """The options of a recorded materialize config (root attr ``materialize_config``) as command-line arguments."""
    args: list[str] = []
    for name, flag in _MATERIALIZE_FLAGS.items():
        value = recorded.get(name)
        if value is not None:
            args += [flag, f"{value}B" if name == "memory" else value]
    for label in recorded.get("labels") or ():
        args += ["--label", label]
    if recorded.get("allow_nonfinite"):
        args.append("--allow-nonfinite")
    if recorded.get("verify_source"):
        args.append("--verify-source")
    return args
