"""features and train at run time: non-finite results, workers, schedulers, disk full, task errors, Ctrl-C, the network.

Each test asserts the contract of docs/errors.md: the damage is detected, or the command ends with exit
2 and one `error:` line and the store is byte-identical, or the result is correct (against an oracle).
"""

from __future__ import annotations

import errno
import importlib
import shutil
import socket

import datasets
import numpy as np
import psutil
import pytest
import zarr
from zarr.storage import LocalStore

from conftest import (assert_one_line_error, file_snapshot, lora_rows, materialize_to, run_cli,
                      save_matrix_dataset, store_arrays)
from pipeline import cluster, features, model
from pipeline.errors import PipelineError
from pipeline.features import FeaturesConfig, compute_features
from pipeline.train import TrainConfig

train = importlib.import_module("pipeline.train")  # `pipeline.train` is the function (the public surface); this is the module

REP = "dw_norms"  # a cheap module representation
FAST = ("--runs", "2", "--epochs", "3", "--hidden", "8", "--depth", "1", "--quiet")


# --- builders ----------------------------------------------------------------------------------------


def labelled_dataset(path, n: int = 36):
    """One module, three float labels: ``fine`` (random), ``huge`` (near ±1e308), ``constant`` (all 1.0)."""
    rng = np.random.default_rng(0)
    huge = [(1.5e308 if i % 2 else -1.5e308) * (0.5 + 0.5 * rng.random()) for i in range(n)]
    labels = {"fine": rng.random(n).tolist(), "huge": huge, "constant": [1.0] * n}
    return save_matrix_dataset(path, lora_rows(n, seed=1), extra=labels,
                               extra_features={name: datasets.Value("float64") for name in labels})


def nonfinite_dataset(path, n: int = 12):
    """One module with a NaN weight in every row (kept by materialize --allow-nonfinite), so in every split."""
    rows = lora_rows(n, seed=2)
    for matrix in rows["unet.blk.attn1.to_q.lora.down.weight"]:
        matrix[0, 0] = np.nan
    return save_matrix_dataset(path, rows)


def copy_store(src, dst):
    shutil.copytree(src, dst)
    return dst


def with_features(store, reps: str = REP):
    compute_features(FeaturesConfig(store=str(store), reps=reps, quiet=True))
    return store


def fail_writes_after(monkeypatch, allowed: int, marker: str, code: int = errno.ENOSPC) -> list:
    """LocalStore.set raises OSError(code) for keys containing ``marker`` after ``allowed`` such writes."""
    seen = []
    original = LocalStore.set

    async def set_(self, key, value):
        if marker in key:
            seen.append(key)
            if len(seen) > allowed:
                raise OSError(code, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_)
    return seen


def listening(pid_tree: bool = True) -> list[tuple[str, int]]:
    """(ip, port) of every listening inet socket of this process (and its children)."""
    me = psutil.Process()
    procs = [me] + (me.children(recursive=True) if pid_tree else [])
    out = []
    for proc in procs:
        try:
            out += [(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


def answers_http(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.settimeout(1)
        sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            return sock.recv(5) == b"HTTP/"
        except (socket.timeout, ConnectionError):
            return False


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory):
    """The store of labelled_dataset with REP computed; tests that fail must leave it byte-identical."""
    home = tmp_path_factory.mktemp("labelled")
    store = home / "labelled.zarr"
    materialize_to(store, labelled_dataset(home / "ds"))
    return with_features(store)


@pytest.fixture(scope="module")
def featured_small(small_store, tmp_path_factory):
    """A copy of small_store with REP computed: the oracle of features and of train."""
    return with_features(copy_store(small_store, tmp_path_factory.mktemp("oracle") / "small.zarr"))


# --- 1. non-finite and constant targets, non-finite results ----------------------------------------------


def test_label_that_overflows_when_standardised_is_refused(labelled_store):
    before = file_snapshot(labelled_store)
    result = run_cli("train", "--store", labelled_store, "--rep", REP, "--label", "huge", *FAST)
    assert_one_line_error(result, "'huge'", "too large")
    assert file_snapshot(labelled_store) == before


def test_constant_regression_target_is_refused(labelled_store):
    before = file_snapshot(labelled_store)
    result = run_cli("train", "--store", labelled_store, "--rep", REP, "--label", "constant", *FAST)
    assert_one_line_error(result, "'constant'", "constant")
    assert file_snapshot(labelled_store) == before


def test_nonfinite_training_results_are_never_marked_complete(labelled_store, monkeypatch):
    real = model.train_ensemble

    def diverging(*args, **kwargs):  # what an overflow in training looks like: NaN validation scores
        ens = real(*args, **kwargs)
        for curve in ens.curves["val_score"]:
            curve[:] = np.nan
        ens.best_epoch[:] = 0
        return ens

    monkeypatch.setattr(model, "train_ensemble", diverging)
    before = file_snapshot(labelled_store)
    result = run_cli("train", "--store", labelled_store, "--rep", REP, "--label", "fine", *FAST)
    assert_one_line_error(result, "NaN or Inf", "no run was marked complete")
    assert file_snapshot(labelled_store) == before


def test_a_fine_float_label_still_trains(labelled_store, tmp_path):
    store = copy_store(labelled_store, tmp_path / "s.zarr")
    result = run_cli("train", "--store", store, "--rep", REP, "--label", "fine", *FAST)
    assert result.exit_code == 0, result.output
    (group,) = [g for _, g in zarr.open_group(str(store), mode="r")["runs"].groups()]
    assert all(group[f"run-{r:03d}"].attrs["complete"] for r in range(2))


# --- 2. runaway options, workers, schedulers -------------------------------------------------------------


@pytest.mark.parametrize("command", ["features", "train"])
def test_negative_workers_are_refused(small_store, command):
    before = file_snapshot(small_store)
    assert_one_line_error(run_cli(command, "--store", small_store, "--workers", "-1"), "--workers -1")
    assert file_snapshot(small_store) == before


@pytest.mark.parametrize("option, value", [
    ("runs", "99999999999999999999"), ("runs", "0"), ("runs", "1001"), ("epochs", "0"), ("batch-size", "1"),
    ("hidden", "0"), ("depth", "0"), ("dropout", "1"), ("dropout", "-0.1"), ("lr", "0"), ("lr", "inf"), ("lr", "nan"),
    ("weight-decay", "inf"), ("patience", "0"), ("plateau-factor", "1"), ("seed", "-1"),
])
def test_train_options_out_of_range_are_refused(small_store, option, value):
    before = file_snapshot(small_store)
    assert_one_line_error(run_cli("train", "--store", small_store, f"--{option}", value), f"--{option}", "out of range")
    assert file_snapshot(small_store) == before


@pytest.mark.parametrize("args, fragment", [(("features", "--workers", "abc"), "--workers"), (("train", "--runs", "x"), "--runs"),
                                             (("train", "--no-such-option"), "--no-such-option")])
def test_unparsable_options_are_one_line(small_store, args, fragment):
    assert_one_line_error(run_cli(*args, "--store", small_store), fragment, "--help")


def test_the_python_api_refuses_them_too():
    with pytest.raises(PipelineError, match="--runs"):
        TrainConfig(runs=10 ** 20)
    with pytest.raises(PipelineError, match="--workers"):
        TrainConfig(workers=-1)
    with pytest.raises(PipelineError, match="--workers"):
        FeaturesConfig(workers=-3)


def test_unreachable_scheduler_is_refused_before_force_touches_the_store(featured_small, tmp_path, monkeypatch):
    store = copy_store(featured_small, tmp_path / "s.zarr")
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{free.getsockname()[1]}"
    before = file_snapshot(store)
    result = run_cli("features", "--store", store, "--rep", REP, "--force", "--scheduler", address, "--quiet")
    assert_one_line_error(result, f"cannot reach dask scheduler {address}")
    assert file_snapshot(store) == before
    result = run_cli("train", "--store", store, "--rep", REP, "--scheduler", address, *FAST)
    assert_one_line_error(result, f"cannot reach dask scheduler {address}")
    assert file_snapshot(store) == before


def test_dashboard_with_a_remote_scheduler_is_refused(small_store):
    result = run_cli("features", "--store", small_store, "--scheduler", "tcp://127.0.0.1:1", "--dashboard", "--quiet")
    assert_one_line_error(result, "--dashboard")


# --- 3. disk full ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_during_features_keeps_work_and_resumes(small_store, featured_small, tmp_path, monkeypatch, code):
    store = copy_store(small_store, tmp_path / "s.zarr")
    fail_writes_after(monkeypatch, 1, f"/{REP}/c/", code)  # the second chunk of features fails
    result = run_cli("features", "--store", store, "--rep", REP, "--quiet")
    assert_one_line_error(result, "no space left", "rerun")
    monkeypatch.undo()
    assert run_cli("features", "--store", store, "--rep", REP, "--quiet").exit_code == 0
    assert {k: v for k, v in store_arrays(store).items() if k.startswith("features")}.keys() == \
        {k for k in store_arrays(featured_small) if k.startswith("features")}
    for name, values in store_arrays(featured_small).items():
        if name.startswith("features"):
            np.testing.assert_array_equal(store_arrays(store)[name], values, err_msg=name)


def test_disk_full_during_train_keeps_work_and_resumes(featured_small, tmp_path, monkeypatch):
    clean = copy_store(featured_small, tmp_path / "clean.zarr")
    assert run_cli("train", "--store", clean, "--rep", REP, *FAST).exit_code == 0
    store = copy_store(featured_small, tmp_path / "s.zarr")
    fail_writes_after(monkeypatch, 5, "runs/")
    assert_one_line_error(run_cli("train", "--store", store, "--rep", REP, *FAST), "no space left", "rerun")
    monkeypatch.undo()
    assert run_cli("train", "--store", store, "--rep", REP, *FAST).exit_code == 0
    want = {k: v for k, v in store_arrays(clean).items() if k.startswith("runs")}
    got = {k: v for k, v in store_arrays(store).items() if k.startswith("runs")}
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_disk_full_while_writing_the_report_is_one_line(featured_small, tmp_path, monkeypatch):
    from pipeline import figures

    store = copy_store(featured_small, tmp_path / "s.zarr")
    assert run_cli("train", "--store", store, "--rep", REP, *FAST).exit_code == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(figures, "curves_figure", full)
    before = file_snapshot(store)
    assert_one_line_error(run_cli("report", "--store", store, "--out", tmp_path / "rep"), "cannot write the report",
                          "No space left")
    assert file_snapshot(store) == before


# --- 4, 5. errors inside dask tasks ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [(), ("--workers", "1")], ids=["in-process", "worker-process"])
def test_nonfinite_raw_weights_are_named_in_one_line(tmp_path, capfd, workers):
    store = tmp_path / "nan.zarr"
    materialize_to(store, nonfinite_dataset(tmp_path / "ds"), allow_nonfinite=True)
    capfd.readouterr()
    result = run_cli("features", "--store", store, "--rep", REP, "--quiet", *workers)
    assert_one_line_error(result, "raw weights of split", "--allow-nonfinite")
    assert "Compute Failed" not in capfd.readouterr().err


def test_nonfinite_raw_weights_kept_by_a_resume_are_named_in_one_line(tmp_path):
    """materialize refuses the NaN and says to rerun with --allow-nonfinite (finished layers kept); the rerun
    resumes without rewriting the root's options, so each raw group's mark must say how it was written."""
    store, source = tmp_path / "nan.zarr", nonfinite_dataset(tmp_path / "ds")
    first = run_cli("materialize", "--source", source, "--store", store, "--quiet")
    assert_one_line_error(first, "--allow-nonfinite")
    resumed = run_cli("materialize", "--store", store, "--allow-nonfinite", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    result = run_cli("features", "--store", store, "--rep", REP, "--quiet")
    assert_one_line_error(result, "raw weights of split", "--allow-nonfinite")


def test_other_task_errors_are_one_line_naming_the_task(small_store, tmp_path, monkeypatch, capfd):
    store = copy_store(small_store, tmp_path / "s.zarr")

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(features, "compute_module", broken)
    capfd.readouterr()
    result = run_cli("features", "--store", store, "--rep", REP, "--quiet")
    assert_one_line_error(result, "feature task ", " models ", "RuntimeError: boom second line")  # whichever task fails first
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "Traceback" not in err


# --- 6. Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_says_how_to_resume_and_the_rerun_is_correct(small_store, featured_small, tmp_path, monkeypatch):
    from pipeline import progress

    store = copy_store(small_store, tmp_path / "my store.zarr")

    def interrupt(self, layers, nbytes):
        raise KeyboardInterrupt

    monkeypatch.setattr(progress.LayerProgress, "update", interrupt)
    result = run_cli("features", "--store", store, "--rep", REP, "--quiet")
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output and "Aborted" not in result.output, result.output
    assert lines[0].startswith("error: interrupted: `pipeline features`")
    assert f"`pipeline features --store '{store}' --rep {REP} --quiet`" in lines[0]
    monkeypatch.undo()
    assert run_cli("features", "--store", store, "--rep", REP, "--quiet").exit_code == 0
    for name, values in store_arrays(featured_small).items():
        if name.startswith("features"):
            np.testing.assert_array_equal(store_arrays(store)[name], values, err_msg=name)


def test_ctrl_c_during_train_resumes_to_the_clean_result(featured_small, tmp_path, monkeypatch):
    clean = copy_store(featured_small, tmp_path / "clean.zarr")
    assert run_cli("train", "--store", clean, "--rep", REP, "--layers", "all,visual", *FAST).exit_code == 0
    store = copy_store(featured_small, tmp_path / "s.zarr")
    real, calls = train.write_runs, []

    def interrupted(*args, **kwargs):  # Ctrl-C while the second configuration is written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "write_runs", interrupted)
    result = run_cli("train", "--store", store, "--rep", REP, "--layers", "all,visual", *FAST)
    assert result.exit_code == 130 and len(result.output.strip().splitlines()) == 1, result.output
    assert "rerun `pipeline train --store" in result.output
    monkeypatch.undo()
    assert run_cli("train", "--store", store, "--rep", REP, "--layers", "all,visual", *FAST).exit_code == 0
    want = {k: v for k, v in store_arrays(clean).items() if k.startswith("runs")}
    got = {k: v for k, v in store_arrays(store).items() if k.startswith("runs")}
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --- 7. empty names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["materialize", "features", "train", "report", "info", "verify"])
def test_empty_store_is_refused_by_every_command(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_STORE", raising=False)
    assert_one_line_error(run_cli(command, "--store", ""), "--store is empty")
    assert not (tmp_path / "stores").exists()


@pytest.mark.parametrize("splits", [",", " , "])
def test_split_naming_nothing_is_refused(small_store, splits):
    before = file_snapshot(small_store)
    assert_one_line_error(run_cli("features", "--store", small_store, "--split", splits, "--quiet"), "names no split")
    assert file_snapshot(small_store) == before


# --- 8. nothing listens unasked ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [None, 1])
def test_local_cluster_listens_on_loopback_only_without_http(workers):
    before = set(listening())
    client, local = cluster.client_for(None, workers)
    try:
        assert client.submit(lambda x: x + 1, 1).result() == 2
        opened = set(listening()) - before
        assert all(ip == "127.0.0.1" for ip, _ in opened), opened
        assert not [port for _, port in opened if answers_http(port)]
    finally:
        client.close()
        local.close()


def test_dashboard_is_the_only_http_port_and_on_loopback():
    before = set(listening())
    client, local = cluster.client_for(None, None, dashboard=True)
    try:
        opened = set(listening()) - before
        assert all(ip == "127.0.0.1" for ip, _ in opened), opened
        assert [port for _, port in opened if answers_http(port)] == [local.scheduler.http_server.port]
    finally:
        client.close()
        local.close()
