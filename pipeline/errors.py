"""The one exception type a user sees: a clear one-line message, printed without a traceback; and the full-disk one."""

import errno


class PipelineError(Exception):
    """A user-facing failure: the message says what is wrong and what to do."""


def disk_full(exc: OSError, location: str) -> PipelineError | None:
    """The one-line error for a full disk or quota while writing ``location`` (None for other OSErrors)."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None
    return PipelineError(f"no space left while writing {location} ({exc.strerror or 'disk full'}); finished work is kept: "
                         "free space and rerun the same command to resume")
