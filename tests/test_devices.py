"""Devices on a cluster: which local workers a machine gets (one per GPU), and who resolves --device (the worker).

There is no GPU on the machines these tests were written on. Three fakes stand in for one, each named
where it is used: the GPU ids handed to ``cluster.placement`` (a parameter), ``torch.cuda.device_count``
monkeypatched for ``visible_gpus``, and ``torch.cuda.is_available`` monkeypatched in one process (the
client, or a dask worker through a worker plugin) so that two processes disagree about CUDA. Everything
else is real: real dask clusters of real worker processes, real stores. The tests marked ``cuda`` run
only where CUDA is present, and say so loudly where it is not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import zarr

from conftest import SMALL_TRAIN, assert_one_line_error, file_snapshot, run_cli
from pipeline import cluster, representations
from pipeline.errors import PipelineError
from pipeline.features import FeaturesConfig, compute_features
from pipeline.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "SKIPPED, NOT RUN: needs a CUDA GPU and torch.cuda.is_available() is False here; run `pytest -m cuda` on a GPU machine"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
# These fake a GPU in one process of a CPU machine; where CUDA is real the fake would be the truth, and the tests
# marked cuda check the real thing instead.
fakes_a_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="SKIPPED, NOT RUN: fakes CUDA on a CPU machine; this "
                                 "machine has CUDA (the tests marked cuda run instead)")
EIGHT = tuple(str(i) for i in range(8))


# --- which local cluster: the GPU ids are injected (the only fake: there is no GPU here) ---------------


def test_without_gpus_workers_mean_what_they_say():
    for device in ("auto", "cuda", "cpu"):
        assert cluster.placement(None, device, (), dask_cuda=True) == cluster.Placement("in-process")
        assert cluster.placement(0, device, (), dask_cuda=True) == cluster.Placement("in-process")
        assert cluster.placement(3, device, (), dask_cuda=True) == cluster.Placement("processes", 3)


def test_device_cpu_ignores_the_gpus():
    assert cluster.placement(None, "cpu", EIGHT, dask_cuda=True) == cluster.Placement("in-process")
    assert cluster.placement(4, "cpu", EIGHT, dask_cuda=True) == cluster.Placement("processes", 4)


@pytest.mark.parametrize("device", ["auto", "cuda"])
@pytest.mark.parametrize("dask_cuda", [True, False])
def test_one_worker_per_gpu_by_default_each_seeing_its_own_first(device, dask_cuda):
    where = cluster.placement(None, device, EIGHT, dask_cuda)
    assert (where.kind, where.workers, where.dask_cuda) == ("gpus", 8, dask_cuda)
    assert [v.split(",")[0] for v in where.visible] == list(EIGHT)  # worker i's cuda:0 is GPU i
    assert where.visible[0] == "0,1,2,3,4,5,6,7" and where.visible[3] == "3,4,5,6,7,0,1,2"  # dask-cuda's order
    assert all(sorted(v.split(",")) == sorted(EIGHT) for v in where.visible)


def test_workers_on_gpus_are_pinned_round_robin_and_dask_cuda_only_when_none_is_shared():
    four = cluster.placement(4, "auto", EIGHT, dask_cuda=True)
    assert (four.kind, four.workers, four.dask_cuda) == ("gpus", 4, True)
    assert [v.split(",")[0] for v in four.visible] == ["0", "1", "2", "3"]
    shared = cluster.placement(3, "auto", ("0", "1"), dask_cuda=True)
    assert (shared.kind, shared.workers, shared.dask_cuda) == ("gpus", 3, False)  # LocalCUDACluster: one worker per GPU
    assert shared.visible == ("0,1", "1,0", "0,1")


def test_one_gpu_without_workers_is_this_process_and_gpus_are_named_as_listed():
    assert cluster.placement(None, "auto", ("0",), dask_cuda=True) == cluster.Placement("in-process")
    assert cluster.placement(0, "auto", EIGHT, dask_cuda=True) == cluster.Placement("in-process")
    assert cluster.placement(1, "auto", ("0",), dask_cuda=True) == cluster.Placement("gpus", 1, ("0",), True)
    assert cluster.placement(None, "auto", ("3", "GPU-5a"), dask_cuda=False).visible == ("3,GPU-5a", "GPU-5a,3")


def test_visible_gpus_are_named_as_cuda_visible_devices_names_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the fake: two GPUs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cluster.visible_gpus() == ("0", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert cluster.visible_gpus() == ("4", "6")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cluster.visible_gpus() == ()


def test_an_unknown_device_is_refused_by_the_configs():
    for make in (FeaturesConfig, TrainConfig):
        with pytest.raises(PipelineError, match="unknown device 'gpu'"):
            make(store="s.zarr", device="gpu")


@pytest.mark.slow
def test_a_pinned_cluster_starts_each_worker_with_its_own_gpu_first():
    """The fallback without dask-cuda, on real worker processes: each nanny sets its worker's CUDA_VISIBLE_DEVICES."""
    client, local = cluster.local_client(cluster.placement(None, "auto", ("0", "1"), dask_cuda=False))
    try:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        threads = {w["nthreads"] for w in client.scheduler_info()["workers"].values()}
    finally:
        client.close()
        local.close()
    assert sorted(seen.values()) == ["0,1", "1,0"] and threads == {1}


# --- --device is resolved by the worker that runs the task -----------------------------------------


@pytest.fixture(scope="module")
def remote():
    """A scheduler with one worker process: the workers of a cluster the client did not start (--scheduler)."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as client:
        yield local.scheduler_address, client


@contextlib.contextmanager
def workers_see_a_gpu(client):
    """The fake of a GPU worker: torch.cuda.is_available() is True on the workers (and only there) meanwhile.

    A worker plugin defined here, so that cloudpickle ships it by value to workers that cannot import tests/.
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class FakeGPU(WorkerPlugin):
        name = "fake-gpu"

        def setup(self, worker):
            import torch

            self.real = torch.cuda.is_available
            torch.cuda.is_available = lambda: True

        def teardown(self, worker):
            import torch

            torch.cuda.is_available = self.real

    client.register_plugin(FakeGPU())
    try:
        yield
    finally:
        client.unregister_worker_plugin("fake-gpu")


def _copy(src, tmp_path, name):
    shutil.copytree(src, tmp_path / name)
    return str(tmp_path / name)


def _run_devices(store: str) -> set[str]:
    """The device recorded in the mark of every run of the store (the device its ensemble trained on)."""
    root = zarr.open_group(store, mode="r")
    return {run.attrs["device"] for _, configuration in root["runs"].groups() for _, run in configuration.groups()}


@pytest.mark.slow
@fakes_a_gpu
def test_auto_is_resolved_on_the_worker_not_on_the_client(remote, trained_small, tmp_path, monkeypatch):
    """A client that sees a GPU (the fake) and CPU workers (real): every task computes on the worker's cpu."""
    address, _ = remote
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the client only: the workers are other processes
    store = _copy(trained_small, tmp_path, "store.zarr")
    summary = compute_features(FeaturesConfig(store=store, reps="dw_norms", device="auto", force=True, scheduler=address,
                                              quiet=True))
    assert summary.tasks > 0 and summary.devices == ["cpu"]
    train(TrainConfig(store=store, device="auto", force=True, scheduler=address, **SMALL_TRAIN))
    assert _run_devices(store) == {"cpu"}


@pytest.mark.slow
@fakes_a_gpu
def test_auto_on_a_cpu_client_means_cuda_on_a_gpu_worker(remote, trained_small, tmp_path):
    """The login-node case: a CPU client (real), workers that see a GPU (the fake). The tasks go for CUDA, which
    this CPU build of torch then cannot give them: the error is the proof that the worker chose cuda."""
    address, client = remote
    store = _copy(trained_small, tmp_path, "store.zarr")
    with workers_see_a_gpu(client):
        with pytest.raises(PipelineError, match=r"training task dw_norms \[all\] .* Torch not compiled with CUDA enabled"):
            train(TrainConfig(store=store, force=True, scheduler=address, **SMALL_TRAIN))
        with pytest.raises(PipelineError, match="feature task .* Torch not compiled with CUDA enabled"):
            compute_features(FeaturesConfig(store=store, reps="dw_norms", force=True, scheduler=address, quiet=True))
    summary = compute_features(FeaturesConfig(store=store, reps="dw_norms", force=True, scheduler=address, quiet=True))
    assert summary.devices == ["cpu"]  # the plugin is gone: the same worker resolves auto to its cpu again


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a worker without CUDA; this machine has CUDA")
def test_cuda_from_a_cpu_client_is_refused_by_a_worker_without_cuda_only(remote, trained_small, tmp_path):
    """The client does not refuse --device cuda for a cluster (it has no GPU; the workers might): the worker does."""
    address, _ = remote
    store = _copy(trained_small, tmp_path, "store.zarr")
    for stage in ("train", "features"):  # train first: the failed features leave dw_norms partly computed
        line = assert_one_line_error(run_cli(stage, "--store", store, "--rep", "dw_norms", "--device", "cuda", "--force",
                                             "--scheduler", address, "--quiet"), "--device cuda but dask worker tcp://")
        assert "has no CUDA" in line


def test_cuda_in_this_process_without_cuda_is_refused_before_the_store_changes(trained_small, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the message shown where CUDA is absent; this machine has CUDA")
    store = _copy(trained_small, tmp_path, "store.zarr")
    before = file_snapshot(store)
    for stage in ("features", "train"):
        assert_one_line_error(run_cli(stage, "--store", store, "--device", "cuda", "--force", "--quiet"),
                              "--device cuda but CUDA is not available here")
    assert file_snapshot(store) == before


# --- on CUDA, where there is one ----------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_features_on_cuda_equal_features_on_cpu(small_store, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu as gpu_bench  # bench/gpu.py: the one comparison, shared with the GPU check

    on_cpu, on_cuda = _copy(small_store, tmp_path, "cpu.zarr"), _copy(small_store, tmp_path, "cuda.zarr")
    assert compute_features(FeaturesConfig(store=on_cpu, reps="all", device="cpu", quiet=True)).devices == ["cpu"]
    assert compute_features(FeaturesConfig(store=on_cuda, reps="all", device="cuda", quiet=True)).devices == ["cuda"]
    a, b = zarr.open_group(on_cpu, mode="r"), zarr.open_group(on_cuda, mode="r")
    for split in a.attrs["splits"]:
        for rep in representations.resolve("all"):
            worst = gpu_bench.relative_differences(a[f"features/{split}/{rep.name}"][:], b[f"features/{split}/{rep.name}"][:])
            assert worst.max() <= gpu_bench.FEATURE_TOLERANCE, (split, rep.name, float(worst.max()))
    counts = gpu_bench.histogram_counts_agree(a, "train")
    assert counts["equal"], counts


@pytest.mark.cuda
@needs_cuda
def test_a_short_train_on_cuda(trained_small, tmp_path):
    store = _copy(trained_small, tmp_path, "store.zarr")
    summary = train(TrainConfig(store=store, device="cuda", force=True, **SMALL_TRAIN))
    assert summary.trained == SMALL_TRAIN["runs"]
    assert {d.split(":")[0] for d in _run_devices(store)} == {"cuda"}
    assert all(0 <= r.test_score <= 1 for r in summary.results)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SKIPPED, NOT RUN: needs two or more CUDA GPUs "
                    f"(this machine has {torch.cuda.device_count()})")
def test_one_worker_per_gpu_each_on_its_own_device():
    with cluster.Session(None, None, device="auto") as session:
        seen = session.client().run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"),
                                              str(__import__("torch").cuda.get_device_properties(0).uuid)))
    assert len(seen) == torch.cuda.device_count()
    assert len({uuid for _, uuid in seen.values()}) == len(seen)  # each worker's cuda:0 is another GPU
