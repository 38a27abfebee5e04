"""The dask.distributed client a stage runs its tasks on: an existing scheduler, or a LocalCluster."""

from __future__ import annotations

import logging
import os


def scheduler_address(scheduler: str | None) -> str | None:
    """--scheduler, else $DASK_SCHEDULER_ADDRESS, else None (a local cluster)."""
    return scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def client_for(scheduler: str | None, workers: int | None):
    """(client, cluster): the cluster is ours to close, None when we joined an existing scheduler.

    ``workers``: a LocalCluster of that many single-threaded worker processes; neither: one in-process
    worker with a thread per core (no start-up cost; torch releases the GIL in its kernels).
    """
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)  # a task's failure still reaches the user as its exception
    address = scheduler_address(scheduler)
    if address:
        return Client(address), None
    if workers:
        # Workers' own logs off too: a task's failure still arrives as its exception, and at close a
        # worker whose heartbeat meets the closed scheduler would print a traceback (seen under load).
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.CRITICAL)
    else:
        cluster = LocalCluster(n_workers=1, threads_per_worker=os.cpu_count() or 1, processes=False, dashboard_address=None)
    return Client(cluster), cluster
