"""The local clusters: dask.distributed servers that open no HTTP port unasked, and workers pinned one per GPU.

Imported only when a local cluster starts.
"""

from __future__ import annotations

import copy

from distributed import LocalCluster, Nanny, Scheduler, Worker
from distributed.deploy.spec import SpecCluster
from distributed.http.routing import RoutingApplication

# distributed starts an HTTP server on every scheduler and worker, whatever ``dashboard_address`` says;
# in process (inproc://) it binds it to all interfaces. These two open one only for an asked dashboard.


class QuietScheduler(Scheduler):
    """A scheduler whose HTTP server (dashboard, metrics) listens only when a dashboard address is given."""

    def start_http_server(self, routes, dashboard_address, default_port=0, ssl_options=None):
        if dashboard_address:
            return super().start_http_server(routes, dashboard_address, default_port, ssl_options)
        self.http_application = RoutingApplication(routes)  # kept for close(); no socket


class QuietWorker(Worker):
    """A worker that opens no HTTP server: the scheduler's dashboard, when asked, is the only web page."""

    def start_http_server(self, routes, dashboard_address, default_port=0, ssl_options=None):
        self.http_application = RoutingApplication(routes)


class QuietNanny(Nanny):
    """A nanny (it opens no HTTP server itself) whose worker process is a QuietWorker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_class=QuietWorker, **kwargs)


class _QuietSpec(SpecCluster):
    def __init__(self, *args, scheduler=None, **kwargs):
        super().__init__(*args, scheduler={**scheduler, "cls": QuietScheduler}, **kwargs)


class QuietLocalCluster(LocalCluster, _QuietSpec):
    """LocalCluster with QuietScheduler: LocalCluster hands its scheduler spec to the next __init__ in the
    MRO, which is _QuietSpec's here (LocalCluster takes a worker class but no scheduler class)."""


class _PinnedSpec(_QuietSpec):
    """Gives worker i of the spec LocalCluster hands on the environment variable CUDA_VISIBLE_DEVICES=visible[i]."""

    def __init__(self, *args, workers=None, **kwargs):
        pinned = {}
        for i, spec in (workers or {}).items():
            spec = copy.deepcopy(spec)
            spec["options"]["env"] = {**spec["options"].get("env", {}), "CUDA_VISIBLE_DEVICES": self.visible[i]}
            pinned[i] = spec
        super().__init__(*args, workers=pinned, **kwargs)


class QuietPinnedCluster(LocalCluster, _PinnedSpec):
    """One single-threaded worker process per entry of ``visible``, started with CUDA_VISIBLE_DEVICES set to it.

    What dask-cuda's LocalCUDACluster does for its workers (and ``dask cuda worker``), for machines without
    dask-cuda: the worker's own GPU is listed first, so that its cuda:0 is that GPU. A worker the nanny
    restarts keeps its variable (the nanny holds it).
    """

    def __init__(self, visible: tuple[str, ...], **kwargs):
        self.visible = tuple(visible)
        super().__init__(n_workers=len(self.visible), threads_per_worker=1, processes=True, worker_class=QuietNanny,
                         **kwargs)


def pinned_cluster(visible: tuple[str, ...], dask_cuda: bool, **kwargs):
    """The local cluster of one worker per GPU: dask-cuda's LocalCUDACluster (quiet), else QuietPinnedCluster."""
    if not dask_cuda:
        return QuietPinnedCluster(visible, **kwargs)
    from dask_cuda import LocalCUDACluster

    class QuietLocalCUDACluster(LocalCUDACluster, _QuietSpec):  # as QuietLocalCluster: the scheduler spec goes through _QuietSpec
        pass

    own = [v.split(",")[0] for v in visible]  # LocalCUDACluster rotates the list itself, worker i's GPU first
    return QuietLocalCUDACluster(CUDA_VISIBLE_DEVICES=own, n_workers=len(own), threads_per_worker=1,
                                 worker_class=QuietWorker, **kwargs)
