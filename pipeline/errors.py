"""The one exception type a user sees: a clear one-line message, printed without a traceback; and the messages that
more than one stage gives (a full disk, a weight that cannot be stored)."""

import errno


class PipelineError(Exception):
    """A user-facing failure: the message says what is wrong and what to do."""


def disk_full(exc: OSError, location: str) -> PipelineError | None:
    """The one-line error for a full disk or quota while writing ``location`` (None for other OSErrors)."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None
    return PipelineError(f"no space left while writing {location} ({exc.strerror or 'disk full'}); finished work is kept: "
                         "free space and rerun the same command to resume")


def not_storable(column: str, where: str, stored_dtype, source_finite: bool) -> PipelineError:
    """The one-line error for a weight materialize will not store: NaN or Inf in the source, or (``source_finite``)
    a finite source value out of the stored dtype's range. ``where``: e.g. "source row 12"."""
    if source_finite:
        import numpy as np  # only on this path: errors.py is imported by every command, numpy is not needed for it

        limit = np.finfo(stored_dtype).max
        return PipelineError(f"layer {column!r} has a value out of {np.dtype(stored_dtype)} range (|x| > {limit:g}) in "
                             f"{where}; rescale or fix the data, or rerun with --allow-nonfinite to store it as Inf "
                             "(finished layers are kept)")
    return PipelineError(f"layer {column!r} has NaN or Inf in {where}; fix the data or rerun with --allow-nonfinite "
                         "(finished layers are kept)")
