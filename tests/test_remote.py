"""Stores at URLs: the whole path (materialize -> features -> train -> report, info, verify) on a real
S3-compatible server on 127.0.0.1 (moto's standalone server), and on fsspec's memory://.

The server is the one `.ci/run` starts (PIPELINE_TEST_S3_ENDPOINT), or one this fixture starts. Credentials
reach the pipeline only through the environment (AWS_*), as they would for a real bucket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from conftest import SMALL_LAYERS, assert_one_line_error, assert_same_arrays, materialize_to, race_for_lease, run_cli
from pipeline.features import FeaturesConfig, compute_features
from pipeline.store import zarr_store
from pipeline.train import TrainConfig, train
from pipeline.verify import verify

TRAIN = dict(reps="dw_norms", runs=2, hidden=16, epochs=3, patience=2, quiet=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on 127.0.0.1 with the AWS_* variables pointing at it; yields a fresh bucket name."""
    pytest.importorskip("s3fs")
    endpoint = os.environ.get("PIPELINE_TEST_S3_ENDPOINT")
    server = None
    if not endpoint:
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            assert time.time() < deadline, f"no S3 server at {endpoint}"
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    for key, value in (("AWS_ACCESS_KEY_ID", "moto"), ("AWS_SECRET_ACCESS_KEY", "moto"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)  # the server accepts any; a real bucket's come from the environment
    import s3fs

    bucket = f"pipeline-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # one per module using the fixture: the server may be shared
    s3fs.S3FileSystem(use_listings_cache=False).mkdir(bucket)
    try:
        yield bucket
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if server is not None:
            server.kill()
            server.wait()


def whole_path(store: str, source) -> None:
    materialize_to(store, source, layers=SMALL_LAYERS, chunk_mb=0.02)
    compute_features(FeaturesConfig(store=store, reps="simple_stats,dw_norms", quiet=True))
    train(TrainConfig(store=store, **TRAIN))


@pytest.fixture(scope="module")
def local_reference(synth_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("remote") / "local.zarr"
    whole_path(str(path), synth_dir)
    return path


def test_the_whole_path_on_s3_equals_local_disk(s3, synth_dir, local_reference, tmp_path):
    url = f"s3://{s3}/team/lora.zarr"
    whole_path(url, synth_dir)
    assert_same_arrays(url, local_reference)
    assert verify(url).problems == []
    result = run_cli("report", "--store", url, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "results.md").read_text().count("dw_norms") >= 1
    info = run_cli("info", "--store", url)
    assert info.exit_code == 0 and "fresh" in info.output and "2 runs" in info.output
    again = run_cli("materialize", "--store", url, "--source", synth_dir, "--layers", SMALL_LAYERS, "--chunk-mb", "0.02", "--quiet")
    assert again.exit_code == 0  # up to date: nothing rewritten
    import s3fs

    keys = s3fs.S3FileSystem(use_listings_cache=False).find(f"{s3}/team/lora.zarr")
    assert keys and not [k for k in keys if "/_leases/" in k]  # no lease left behind


def test_leases_on_s3_are_exclusive_under_a_race(s3):
    zs = zarr_store(f"s3://{s3}/race.zarr")
    for round_ in range(5):
        won = race_for_lease(zs, f"features/train/r{round_}", 6)
        assert len(won) == 1
        won[0].release()


def test_memory_url_runs_the_whole_path(synth_dir, local_reference):
    url = f"memory://pipeline-test-{os.getpid()}/lora.zarr"
    whole_path(url, synth_dir)
    assert_same_arrays(url, local_reference)


def test_a_missing_bucket_is_one_clear_line(s3, synth_dir):
    result = run_cli("materialize", "--store", f"s3://{s3}-missing/x.zarr", "--source", synth_dir, "--quiet")
    assert_one_line_error(result, f"cannot list store s3://{s3}-missing/x.zarr", "bucket does not exist", "credentials")
