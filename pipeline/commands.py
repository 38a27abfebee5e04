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
