"""dask.distributed servers that open no HTTP port unasked (imported only when a local cluster starts)."""

from __future__ import annotations

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
