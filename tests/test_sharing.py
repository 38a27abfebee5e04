"""Several processes on one store at once, and SIGKILL at several points: nothing corrupted, nothing lost.

Every process here is a real `python cli.py ...` on a real store; kills are real SIGKILLs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import SMALL_LAYERS, assert_same_arrays, file_snapshot, materialize_to, store_arrays
from pipeline.verify import verify

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--runs", "2", "--hidden", "16", "--epochs", "4", "--patience", "2", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # 4 processes on 2 cores: no spinning threads

pytestmark = pytest.mark.slow


def start(store, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args, "--store", str(store)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def base(synth_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharing") / "base.zarr"
    materialize_to(path, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    return path


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def complete_features(store: Path) -> dict[str, np.ndarray]:
    """Every representation array a reader would take as complete right now."""
    root = zarr.open_group(str(store), mode="r")
    out = {}
    features = root.get("features")
    for split in features.group_keys() if features is not None else ():
        group = features[split]
        for name in group.array_keys():
            try:
                if group[name].attrs.get("complete"):
                    out[f"{split}/{name}"] = group[name][:]
            except (KeyError, ValueError, FileNotFoundError):  # being (re)created at this instant: not complete
                pass
    return out


def test_four_processes_at_once_equal_the_same_commands_one_after_another(base, tmp_path):
    commands = [["features", "--rep", "simple_stats,dw_norms", "--quiet"],
                ["features", "--rep", "dw_norms,matrix_norms", "--quiet"],
                ["train", "--rep", "dw_norms", *TRAIN],
                ["train", "--rep", "dw_norms", *TRAIN]]
    sequential, concurrent = copy(base, tmp_path / "seq.zarr"), copy(base, tmp_path / "conc.zarr")
    for command in commands:
        finish(start(sequential, *command))
    final = complete_features(sequential)

    procs = [start(concurrent, *command) for command in commands[:2]]
    deadline = time.time() + 120
    while not (concurrent / "_leases").exists() and not complete_features(concurrent):  # features under way
        assert time.time() < deadline and all(p.poll() is None for p in procs), "features never started"
        time.sleep(0.02)
    procs += [start(concurrent, *command) for command in commands[2:]]
    seen = set()
    while any(p.poll() is None for p in procs):  # a reader, all along: complete means complete and final
        for name, values in complete_features(concurrent).items():
            np.testing.assert_array_equal(values, final[name], err_msg=f"{name} read as complete before it was")
            seen.add(name)
        time.sleep(0.01)
    for proc in procs:
        finish(proc)
    assert_same_arrays(concurrent, sequential)
    assert not (concurrent / "_leases").exists()
    assert verify(str(concurrent)).problems == []
    root = zarr.open_group(str(concurrent), mode="r")
    digest = next(iter(root["runs"].group_keys()))
    assert sorted(root[f"runs/{digest}"].group_keys()) == ["run-000", "run-001"]
    assert all(root[f"runs/{digest}/run-{r:03d}"].attrs["ensemble_size"] == 2 for r in range(2))  # trained once, together


# --- SIGKILL at several points, then rerun ----------------------------------------------------------


def _count_raw(store: Path) -> int:
    return sum('"complete": true' in p.read_text() for p in store.glob("raw/*/*/zarr.json"))


def _count_feature_chunks(store: Path) -> int:
    return len(list(store.glob("features/*/_progress/*/c/*")))


def _count_runs(store: Path) -> int:
    return sum('"complete": true' in p.read_text() for p in store.glob("runs/*/run-*/zarr.json"))


def _files_of_done(store: Path, stage: str) -> dict:
    """The files of what was complete at the kill: a rerun must not rewrite them."""
    snapshot = file_snapshot(store)
    if stage == "materialize":
        done = {p.parent.relative_to(store).as_posix() for p in store.glob("raw/*/*/zarr.json") if '"complete": true' in p.read_text()}
        return {k: v for k, v in snapshot.items() if any(k.startswith(d + "/") for d in done) and k.endswith(("/c/0/0/0", "/c/1/0/0"))}
    if stage == "features":
        done = [p.relative_to(store).as_posix() for p in store.glob("features/*/_progress/*/c/*")]
        out = {}
        for flag in done:  # features/<split>/_progress/<rep>/c/<i> -> features/<split>/<rep>/c/<i>/0/0
            split, rep, chunk = flag.split("/")[1], flag.split("/")[3], flag.split("/")[5]
            key = f"features/{split}/{rep}/c/{chunk}/0/0"
            if key in snapshot:
                out[key] = snapshot[key]
        return out
    return {k: v for k, v in snapshot.items() if any(k.startswith(d + "/") for d in _done_runs(store))}


def _done_runs(store: Path) -> set[str]:
    """runs/<digest>/run-NNN that a rerun must keep: marked complete, and so is every run of its batch.

    The runs of one batch train as one ensemble and are marked one after another; a kill between two
    of those marks leaves the batch half marked, and the rerun redoes the whole batch (a run's bytes
    depend on the runs it was trained beside: train.with_whole_batches), so its marked runs were not done.
    """
    attrs = {p.parent.relative_to(store).as_posix(): json.loads(p.read_text()).get("attributes", {})
             for p in store.glob("runs/*/run-*/zarr.json")}
    complete = {path for path, a in attrs.items() if a.get("complete")}
    return {path for path in complete
            if all(f"{path.rsplit('/', 1)[0]}/run-{r:03d}" in complete for r in attrs[path].get("batch") or [])}


STAGES = {
    # stage: (command, how far it has got, points to kill at)
    "materialize": (lambda source: ["materialize", "--source", str(source), "--layers", SMALL_LAYERS, "--chunk-mb", "0.02",
                                    "--quiet"], _count_raw, (1, 6)),
    "features": (lambda source: ["features", "--rep", "all", "--quiet"], _count_feature_chunks, (2, 30)),
    "train": (lambda source: ["train", "--rep", "dw_norms,simple_stats,matrix_norms", *TRAIN], _count_runs, (0, 2, 4)),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_at_several_points_then_rerun_equals_a_clean_run(stage, base, synth_dir, tmp_path):
    command, progress, points = STAGES[stage]
    start_from = base
    if stage == "train":  # train needs features
        start_from = copy(base, tmp_path / "with-features.zarr")
        finish(start(start_from, "features", "--rep", "dw_norms,simple_stats,matrix_norms", "--quiet"))
    clean = tmp_path / "clean.zarr"
    if stage != "materialize":
        copy(start_from, clean)
    finish(start(clean, *command(synth_dir)))

    for point in points:
        store = tmp_path / f"killed-at-{point}.zarr"
        if stage != "materialize":
            copy(start_from, store)
        proc = start(store, *command(synth_dir))
        while proc.poll() is None and progress(store) < point:
            time.sleep(0.005)
        if stage == "train" and point == 0:
            time.sleep(1.5)  # in the middle of training the first configuration
        assert proc.poll() is None, f"{stage} finished before the kill at {point}: make the work bigger"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = _files_of_done(store, stage)
        finish(start(store, *command(synth_dir)))  # the rerun takes the dead process's lease over at once
        after = file_snapshot(store)
        assert {k: after.get(k) for k in before} == before, "the rerun rewrote what was complete before the kill"
        assert_same_arrays(store, clean)
        problems = verify(str(store)).problems  # a write killed half-way may leave its temporary file; nothing else
        assert [p for p in problems if p.reset[0] != "delete"] == []


# --- a dask cluster: configurations and chunks as tasks, a worker killed mid-run ----------------------


def test_features_on_a_cluster_are_exact_when_a_worker_is_killed(base, tmp_path):
    import threading

    from dask.distributed import Client, LocalCluster

    from pipeline.features import FeaturesConfig, compute_features

    clean, store = copy(base, tmp_path / "clean.zarr"), copy(base, tmp_path / "store.zarr")
    compute_features(FeaturesConfig(store=str(clean), reps="all", quiet=True))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        errors = []

        def run():
            try:
                compute_features(FeaturesConfig(store=str(store), reps="all", scheduler=cluster.scheduler_address, quiet=True))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        while _count_feature_chunks(store) < 1 and worker.is_alive():
            time.sleep(0.005)
        assert worker.is_alive(), "features finished before the kill"
        os.kill(pids[0], signal.SIGKILL)  # dask reschedules its tasks; its nanny starts a new one
        worker.join(timeout=300)
    assert not errors, errors
    assert_same_arrays(store, clean)


def test_train_on_a_cluster_equals_in_process(base, tmp_path):
    from pipeline.features import FeaturesConfig, compute_features
    from pipeline.train import TrainConfig, train

    local = copy(base, tmp_path / "local.zarr")
    compute_features(FeaturesConfig(store=str(local), reps="dw_norms,simple_stats", quiet=True))
    on_cluster = copy(local, tmp_path / "cluster.zarr")
    options = dict(reps="dw_norms,simple_stats", runs=2, hidden=16, epochs=4, patience=2, quiet=True)
    train(TrainConfig(store=str(local), **options))
    summary = train(TrainConfig(store=str(on_cluster), workers=2, **options))
    assert [r.setup.reps for r in summary.results] == [("dw_norms",), ("simple_stats",)] and summary.trained == 4
    # dask workers run torch on one thread, this process on two: sums in another order, the last bit may differ
    a, b = store_arrays(on_cluster), store_arrays(local)
    assert sorted(a) == sorted(b)
    for name in a:
        if a[name].dtype.kind == "f":
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
