"""Where a stage's tasks run: an existing scheduler, or a local cluster that listens on nothing unasked; and on what device.

The one home of two decisions. *Which local cluster* (``placement``): on a machine with GPUs, one worker
process per GPU, each pinned to its own (dask-cuda's ``LocalCUDACluster`` when installed, else a
LocalCluster whose workers get their own ``CUDA_VISIBLE_DEVICES``); otherwise what ``--workers`` says.
*Which device* (``resolve_device``): ``auto`` and ``cuda`` are resolved by the process that runs the
work, i.e. by each task on its worker (``task_device``), never by the client: a CPU login node sends
``auto`` to GPU workers, and each worker uses the device it was started on (cuda:0 within its
``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from dataclasses import dataclass

from .errors import PipelineError

CONNECT_TIMEOUT_S = 10  # an unreachable --scheduler is refused after this long, before the store is touched
MAX_WORKERS = 256  # --workers above this is a typo, not a machine: refuse it rather than spawn processes without end
DASHBOARD_ADDRESS = "127.0.0.1:8787"  # --dashboard: on this machine only (another free port if 8787 is taken)


def check_workers(workers: int | None) -> None:
    """The one rule for --workers of every stage: None (default), 0 (in this process) or 1..MAX_WORKERS."""
    if workers is not None and not 0 <= workers <= MAX_WORKERS:
        raise PipelineError(f"--workers {workers} is out of range; use 1 to {MAX_WORKERS} worker processes, "
                            "0 to run in this process, or omit it")


DEVICES = ("auto", "cpu", "cuda")


def check_device(device: str) -> None:
    """The one rule for --device of every stage: auto, cpu or cuda (resolved later, where the work runs)."""
    if device not in DEVICES:
        raise PipelineError(f"unknown device {device!r}; use auto, cpu or cuda")


def resolve_device(device: str, where: str | None = None) -> str:
    """auto -> "cuda" when this process sees a GPU, else "cpu"; "cuda" refused here when it sees none.

    Called by the process that does the work: a task on its dask worker (``where``: the worker's address,
    named in the refusal), or the client when the work runs on this machine. "cuda" is the process's
    current device, cuda:0 within its ``CUDA_VISIBLE_DEVICES``: a pinned worker's own GPU.
    """
    check_device(device)
    if device == "cpu":
        return device
    import torch

    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        if where:
            raise PipelineError(f"--device cuda but dask worker {where} has no CUDA; start the workers on GPU nodes, one per GPU "
                                "(docs/scaling.md), or use --device auto or cpu")
        raise PipelineError("--device cuda but CUDA is not available here; use --device cpu or auto")
    return device


def task_device(device: str) -> str:
    """The device a task computes on, resolved on the dask worker that runs it (in this process when there is none)."""
    try:
        from distributed import get_worker

        where = get_worker().address
    except (ImportError, ValueError):  # ValueError: not inside a dask task
        where = None
    return resolve_device(device, where)


@dataclass(frozen=True)
class Placement:
    """Where the tasks of a stage run when no scheduler is given.

    kind: "in-process" (this process: features on a thread per core, train one configuration after
    another), "processes" (``workers`` single-threaded CPU worker processes) or "gpus" (``workers``
    worker processes, worker i seeing ``visible[i]`` as its CUDA_VISIBLE_DEVICES: its own GPU first).
    """

    kind: str
    workers: int = 0
    visible: tuple[str, ...] = ()
    dask_cuda: bool = False  # dask-cuda's LocalCUDACluster starts them (else a LocalCluster, CUDA_VISIBLE_DEVICES per worker)


def placement(workers: int | None, device: str, gpus: tuple[str, ...], dask_cuda: bool) -> Placement:
    """The local cluster for ``--workers`` and ``--device`` on a machine whose visible GPUs are ``gpus`` (ids).

    With ``--device cpu`` or no GPU: ``--workers N`` processes, else this process (today's CPU rule). With
    GPUs and ``--device auto|cuda``: one worker per GPU by default, each pinned to its own; ``--workers N``
    workers pinned round-robin (more than the GPUs share them; 0 is this process). One GPU and no
    ``--workers``: this process, which is already that GPU's one worker (no start-up cost, and train keeps
    its per-epoch progress). dask-cuda is used when installed and no GPU is shared (it places at most one
    worker per GPU); without it the same pinning is done by setting each worker's CUDA_VISIBLE_DEVICES.
    """
    check_workers(workers)
    check_device(device)
    if device == "cpu" or not gpus or workers == 0 or (workers is None and len(gpus) == 1):
        return Placement("processes", workers) if workers else Placement("in-process")
    n = workers or len(gpus)
    ids = list(gpus)
    visible = tuple(",".join(ids[i % len(ids):] + ids[:i % len(ids)]) for i in range(n))  # own GPU first, as dask-cuda
    return Placement("gpus", n, visible, dask_cuda and n <= len(gpus))


def visible_gpus() -> tuple[str, ...]:
    """The ids of the GPUs this process sees, as CUDA_VISIBLE_DEVICES names them (0, 1, ... when it is unset)."""
    import torch

    n = torch.cuda.device_count()
    listed = [s.strip() for s in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    return tuple(listed[:n]) if len(listed) >= n else tuple(str(i) for i in range(n))


def dask_cuda_installed() -> bool:
    return importlib.util.find_spec("dask_cuda") is not None


def local_placement(workers: int | None, device: str) -> Placement:
    """``placement`` for this machine: its visible GPUs are counted only when the device may be CUDA."""
    gpus = visible_gpus() if device != "cpu" and workers != 0 else ()
    return placement(workers, device, gpus, bool(gpus) and dask_cuda_installed())


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


def client_for(scheduler: str | None, workers: int | None, dashboard: bool = False, device: str = "cpu"):
    """(client, cluster): the cluster is ours to close, None when we joined an existing scheduler.

    Without a scheduler, the local cluster is ``local_placement(workers, device)``'s: worker processes
    (single-threaded; pinned one per GPU when the device may be CUDA and the machine has GPUs), or one
    in-process worker with a thread per core (no start-up cost; torch releases the GIL in its kernels). A
    local cluster talks over inproc:// or 127.0.0.1 and opens no HTTP port, except the dashboard when
    ``dashboard`` (on 127.0.0.1; its address goes to stderr). A remote scheduler is only connected to:
    its workers are whatever they were started as. The stages open one through ``Session``.
    """
    check_workers(workers)
    address = scheduler_address(scheduler)
    if address and dashboard:
        raise PipelineError(f"--dashboard starts the dashboard of a local cluster; the scheduler at {address} "
                            "serves its own (drop --dashboard, or --scheduler and $DASK_SCHEDULER_ADDRESS)")
    if address:
        return _connect(address), None
    return local_client(local_placement(workers, device), dashboard)


def local_client(where: Placement, dashboard: bool = False):
    """(client, cluster) of a new local cluster placed as ``where`` says."""
    from dask.distributed import Client

    from ._quiet_dask import QuietLocalCluster, QuietNanny, QuietWorker, pinned_cluster

    options = dict(dashboard_address=DASHBOARD_ADDRESS if dashboard else None, silence_logs=logging.CRITICAL)
    with warnings.catch_warnings():  # "Port 8787 is already in use" (a block): the link printed below says where it went
        warnings.simplefilter("ignore", UserWarning)
        if where.kind == "gpus":
            cluster = pinned_cluster(where.visible, where.dask_cuda, host="127.0.0.1", **options)
        elif where.kind == "processes":
            cluster = QuietLocalCluster(n_workers=where.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
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

    def __init__(self, scheduler: str | None, workers: int | None, dashboard: bool = False, device: str = "cpu"):
        self._args = (scheduler, workers, dashboard, device)
        self._client = self.cluster = None
        # Where a local cluster puts its workers (None with a scheduler): decided now, so that a caller can
        # ask whether the work runs in this process before any cluster starts.
        self.placement = None if scheduler_address(scheduler) else local_placement(workers, device)
        self._log_level: int | None = None  # the "distributed" logger's level before the client, while one is open
        if scheduler_address(scheduler):
            self.client()

    @property
    def in_process(self) -> bool:
        """The tasks run in this process (on a thread per core): no scheduler, and no worker processes to start."""
        return self.placement is not None and self.placement.kind == "in-process"

    def client(self):
        if self._client is None:
            logger = logging.getLogger("distributed")
            self._log_level = logger.level
            logger.setLevel(logging.CRITICAL)
            try:
                if self.placement is None:  # a scheduler
                    self._client, self.cluster = client_for(*self._args)
                else:
                    self._client, self.cluster = local_client(self.placement, self._args[2])
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
