"""The dask.distributed client of a stage: an existing scheduler, or a LocalCluster that listens on nothing unasked."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from .errors import PipelineError

CONNECT_TIMEOUT_S = 10  # an unreachable --scheduler is refused after this long, before the store is touched
MAX_WORKERS = 256  # --workers above this is a typo, not a machine: refuse it rather than spawn processes without end
DASHBOARD_ADDRESS = "127.0.0.1:8787"  # --dashboard: on this machine only (another free port if 8787 is taken)


def check_workers(workers: int | None) -> None:
    """The one rule for --workers of every stage: None (default), 0 (in this process) or 1..MAX_WORKERS."""
    if workers is not None and not 0 <= workers <= MAX_WORKERS:
        raise PipelineError(f"--workers {workers} is out of range; use 1 to {MAX_WORKERS} worker processes, "
                            "0 to run in this process, or omit it")


def scheduler_address(scheduler: str | None) -> str | None:
    """--scheduler, else $DASK_SCHEDULER_ADDRESS, else None (a local cluster)."""
    return scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def _connect(address: str):
    from dask.distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError, TypeError) as exc:  # timeouts are OSErrors; a malformed address a ValueError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"cannot reach dask scheduler {address} ({detail}); check --scheduler and "
                            "$DASK_SCHEDULER_ADDRESS, or leave both unset to run on a local cluster") from None


def client_for(scheduler: str | None, workers: int | None, dashboard: bool = False):
    """(client, cluster): the cluster is ours to close, None when we joined an existing scheduler.

    ``workers``: a LocalCluster of that many single-threaded worker processes; neither: one in-process
    worker with a thread per core (no start-up cost; torch releases the GIL in its kernels). A local
    cluster talks over inproc:// or 127.0.0.1 and opens no HTTP port, except the dashboard when
    ``dashboard`` (on 127.0.0.1; its address goes to stderr). A remote scheduler is only connected to.
    The stages open one through ``Session``.
    """
    from dask.distributed import Client

    from ._quiet_dask import QuietLocalCluster, QuietNanny, QuietWorker

    check_workers(workers)
    address = scheduler_address(scheduler)
    if address and dashboard:
        raise PipelineError(f"--dashboard starts the dashboard of a local cluster; the scheduler at {address} "
                            "serves its own (drop --dashboard, or --scheduler and $DASK_SCHEDULER_ADDRESS)")
    if address:
        return _connect(address), None
    options = dict(dashboard_address=DASHBOARD_ADDRESS if dashboard else None, silence_logs=logging.CRITICAL)
    with warnings.catch_warnings():  # "Port 8787 is already in use" (a block): the link printed below says where it went
        warnings.simplefilter("ignore", UserWarning)
        if workers:
            cluster = QuietLocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                        worker_class=QuietNanny, **options)
        else:  # inproc://: no socket at all
            cluster = QuietLocalCluster(n_workers=1, threads_per_worker=os.cpu_count() or 1, processes=False,
                                        worker_class=QuietWorker, **options)
    if dashboard:
        print(f"dask dashboard: http://127.0.0.1:{cluster.scheduler.http_server.port}/status", file=sys.stderr)  # the user asked for it: say where
    return Client(cluster), cluster


class Session:
    """A stage's dask client, made once and closed at exit: the one way the stages (features, train, zoo) use dask.

    A remote scheduler is reached at construction, so an unreachable one is refused before the caller
    changes anything in the store; a local cluster starts on first use (not at all when nothing is to do).
    While a client is open the "distributed" logger is quiet: task failures reach the user as their
    exception (one line, by the CLI), and distributed's own "Compute Failed" blocks and close-time
    tracebacks would only bury it. Its level is given back at close.
    """

    def __init__(self, scheduler: str | None, workers: int | None, dashboard: bool = False):
        self._args = (scheduler, workers, dashboard)
        self._client = self.cluster = None
        self._log_level: int | None = None  # the "distributed" logger's level before the client, while one is open
        if scheduler_address(scheduler):
            self.client()

    @property
    def local(self) -> bool:
        """The tasks run on a cluster this process started (known once ``client()`` was called)."""
        return self.cluster is not None

    def client(self):
        if self._client is None:
            logger = logging.getLogger("distributed")
            self._log_level = logger.level
            logger.setLevel(logging.CRITICAL)
            try:
                self._client, self.cluster = client_for(*self._args)
            except BaseException:
                self._restore_log_level()
                raise
        return self._client

    def close(self) -> None:
        try:
            if self._client is not None:
                self._client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            self._client = self.cluster = None
            self._restore_log_level()

    def _restore_log_level(self) -> None:
        if self._log_level is not None:
            logging.getLogger("distributed").setLevel(self._log_level)
            self._log_level = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
