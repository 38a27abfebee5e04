"""The one exception type a user sees: a clear one-line message, printed without a traceback."""


class PipelineError(Exception):
    """A user-facing failure: the message says what is wrong and what to do."""
