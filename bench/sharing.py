"""Benchmark, run by hand: the shared store's costs.

    python bench/sharing.py [--n 1000] [--reps all]

1. Local disk against an S3-compatible server (moto's standalone server, started here on 127.0.0.1):
   the same synthetic data, `materialize` then `features --rep <reps>` into a local store and into
   s3://bench/..., one run each, timed as a user sees them (in this process, start-up excluded).
   moto keeps objects in the memory of one Python process: it is a correctness stand-in for S3, not a
   fast one, so this is an upper bound on the overhead of going through fsspec and HTTP, not S3's speed.
2. The overhead of the concurrency mechanism (leases) on an uncontended run, two ways:
   (a) the time spent inside the lease functions (take, check, renew, release), measured in the run;
   (b) the same run with leases replaced by no-ops, against the real one (noisier: a difference of
       two wall times on a shared machine).
   Target: under 5%.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from _data import synthetic_source  # noqa: E402

from pipeline import leases  # noqa: E402
from pipeline.features import FeaturesConfig, compute_features  # noqa: E402
from pipeline.materialize import MaterializeConfig, materialize  # noqa: E402
from pipeline.store import bytes_under  # noqa: E402


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def start_s3() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    return server


def stages(store: str, source: Path, reps: str) -> dict:
    m, summary = timed(materialize, MaterializeConfig(store=store, source=str(source), quiet=True))
    f, _ = timed(compute_features, FeaturesConfig(store=store, reps=reps, quiet=True))
    return {"materialize": m, "features": f, "raw_mb": summary.bytes_written / 1e6}


class LeaseClock:
    """Time spent in the lease functions, by wrapping them in this process."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._saved = {}

    def __enter__(self):
        for owner, name in ((leases.Lease, "acquire"), (leases.Lease, "release"), (leases.Lease, "renew"),
                            (leases, "wait_for")):
            real = getattr(owner, name)
            self._saved[(owner, name)] = real

            def wrapper(*args, _real=real, **kwargs):
                started = time.perf_counter()
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started
                    self.calls += 1

            setattr(owner, name, wrapper)
        return self

    def __exit__(self, *exc):
        for (owner, name), real in self._saved.items():
            setattr(owner, name, real)


class NoLeases:
    """Leases replaced by no-ops: what the run costs without the mechanism."""

    def __enter__(self):
        self._saved = (leases.Lease.acquire, leases.Lease.release, leases.wait_for)
        leases.Lease.acquire = lambda self: True
        leases.Lease.release = lambda self: None
        leases.wait_for = lambda *a, **k: None
        return self

    def __exit__(self, *exc):
        leases.Lease.acquire, leases.Lease.release, leases.wait_for = self._saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--reps", default="all")
    parser.add_argument("--work", default=str(ROOT / "stores" / "bench"))
    args = parser.parse_args()
    print(f"command: python bench/sharing.py --n {args.n} --reps {args.reps}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = synthetic_source(work, args.n)

    local = work / f"sharing-local-n{args.n}.zarr"
    shutil.rmtree(local, ignore_errors=True)
    with LeaseClock() as clock:
        disk = stages(str(local), source, args.reps)
    lease_share = clock.seconds / (disk["materialize"] + disk["features"])

    server = start_s3()
    try:
        url = f"s3://bench/sharing-n{args.n}.zarr"
        s3 = stages(url, source, args.reps)
        s3_bytes = bytes_under(url)
    finally:
        server.kill()
    local_bytes = bytes_under(str(local))

    print(f"\n1. local disk vs S3 server on 127.0.0.1 (moto), {args.n} adapters, {disk['raw_mb']:.0f} MB raw, "
          f"features --rep {args.reps}")
    print("| stage | local (s) | local MB/s | S3 (s) | S3 MB/s | S3 / local |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage in ("materialize", "features"):
        print(f"| {stage} | {disk[stage]:.1f} | {disk['raw_mb'] / disk[stage]:.0f} | {s3[stage]:.1f} | "
              f"{s3['raw_mb'] / s3[stage]:.0f} | {s3[stage] / disk[stage]:.1f}x |")
    print(f"store size: local {local_bytes / 1e6:.0f} MB, S3 {s3_bytes / 1e6:.0f} MB")

    print(f"\n2. lease overhead on an uncontended run (local disk):")
    print(f"  (a) in the lease functions: {clock.seconds:.3f} s in {clock.calls} calls, "
          f"{100 * lease_share:.2f}% of materialize + features ({disk['materialize'] + disk['features']:.1f} s)")
    again = work / f"sharing-noleases-n{args.n}.zarr"
    shutil.rmtree(again, ignore_errors=True)
    shutil.rmtree(local, ignore_errors=True)
    with_leases = stages(str(local), source, args.reps)
    with NoLeases():
        without = stages(str(again), source, args.reps)
    a = with_leases["materialize"] + with_leases["features"]
    b = without["materialize"] + without["features"]
    print(f"  (b) with leases {a:.1f} s, leases as no-ops {b:.1f} s: {100 * (a - b) / b:+.1f}% "
          f"(target < 5%; a difference of two wall times, so noise of a few % either way)")
    shutil.rmtree(local, ignore_errors=True)
    shutil.rmtree(again, ignore_errors=True)


if __name__ == "__main__":
    main()
