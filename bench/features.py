"""Benchmark, run by hand: the original per-sample feature loop vs `pipeline materialize` + `pipeline features`.

    python bench/features.py [--n 2000] [--layers 8] [--device auto] [--svd-batch 64]

On the --n adapter synthetic dataset (rank 1, to_q/to_v: 128 layers; written under stores/bench/ if
missing, else reused), one run measures
 (a) the original loop: for each of the nine original representations, for each layer of each split
     (train_test_split .3 then .67 on the rest, seed 42, with_format("torch")), rep_fn(split[layer][:])
     with a per-sample rep_fn: the numpy oracles of tests/reference.py (written from the
     definitions, float64), one sample after another. Timed on --layers layers, extrapolated linearly
     to all 128 (the output says so);
 (b) `pipeline materialize` then `pipeline features` for the nine (Python API) into a fresh store;
 (c) `pipeline features` alone on that store, recomputing (force): the nine, `--rep all` (every
     representation that is not opt-in) and each of those alone; raw chunk reads are counted by
     wrapping pipeline.features.read_raw, as tests/test_features.py does;
 (d) dw_spectrum vs torch.linalg.svdvals of the dense dW = B @ A at SD shapes, r = 4, on a batch.
The page cache is warmed by one read of the dataset first, so (a) and (b) read from memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # for reference.py alone: the loop (a) times is the oracle the tests check
sys.path.insert(2, str(ROOT / "bench"))

from _data import lora_columns, module_subset, synthetic_source  # noqa: E402
import reference as oracle  # noqa: E402  (tests/reference.py: the per-sample numpy references the tests check us with)
from pipeline import features as features_mod  # noqa: E402
from pipeline import representations, store as store_mod  # noqa: E402
from pipeline.cluster import resolve_device  # noqa: E402
from pipeline.features import FeaturesConfig, compute_features  # noqa: E402
from pipeline.materialize import MaterializeConfig, materialize  # noqa: E402
from pipeline.synthetic import SYNTH_VERSION  # noqa: E402

ORIGINAL_REPS = ("simple_stats", "rank_based", "stats", "spectral", "matrix_norms", "distribution", "frequency",
                 "info_theoretic", "ensemble")
SD_SHAPES = ((1280, 1280), (768, 1280))  # (in, out) of dW: attn1 at width 1280, attn2.to_v 768 -> 1280


def warm_page_cache(path: Path) -> int:
    """Read every file under path once (1 MiB at a time) so that every method reads from memory."""
    nbytes = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                nbytes += len(block)
    return nbytes


# --- (a) the original loop ---------------------------------------------------------------------------


def per_sample(name: str):
    """The original's shape of computation: (n, rows, cols) -> (n, width), one sample at a time."""
    reference = oracle.REFERENCES[name]

    def rep_fn(x: torch.Tensor) -> torch.Tensor:
        rows = [reference(m) for m in x.numpy()]
        return torch.tensor(np.asarray(rows, dtype=np.float64), dtype=torch.float32)

    return rep_fn


def original_loop(source: Path, layers: list[str]) -> dict[str, tuple[float, float]]:
    """Per representation: (seconds in split[layer][:], seconds in rep_fn) over ``layers`` and the three splits."""
    ds = datasets.load_from_disk(str(source))["train"]
    first = ds.train_test_split(test_size=0.3, seed=42)
    second = first["test"].train_test_split(test_size=0.67, seed=42)
    splits = [s.with_format("torch") for s in (first["train"], second["train"], second["test"])]
    seconds = {}
    for name in ORIGINAL_REPS:
        rep_fn, width = per_sample(name), representations.get(name).width
        access = compute = 0.0
        for layer in layers:
            for split in splits:  # the original read every layer again for every representation
                started = time.perf_counter()
                x = split[layer][:]
                read = time.perf_counter()
                features = rep_fn(x)
                compute += time.perf_counter() - read
                access += read - started
                assert features.shape == (len(split), width)
        seconds[name] = (access, compute)
    return seconds


# --- (b), (c) the pipeline ---------------------------------------------------------------------------


@contextlib.contextmanager
def counting_reads():
    """Count raw chunk reads of pipeline.features (in-process dask threads see the patched function)."""
    counts = {"bytes": 0, "reads": Counter()}
    lock = threading.Lock()
    original = features_mod.read_raw

    def counting(group, role, start, stop):
        array = original(group, role, start, stop)
        with lock:
            counts["bytes"] += array.nbytes
            counts["reads"][(group.path, role, start)] += 1
        return array

    features_mod.read_raw = counting
    try:
        yield counts
    finally:
        features_mod.read_raw = original


def raw_nbytes(path: Path) -> int:
    """Bytes of every raw A and B array of the store, uncompressed."""
    root = store_mod.open_root(path)
    total = 0
    for split in root.attrs["splits"]:
        for module in root.attrs["modules"]:
            for role in ("A", "B"):
                array = root[f"raw/{split}/{module['key']}/{role}"]
                total += int(np.prod(array.shape)) * array.dtype.itemsize
    return total


def run_features(path: Path, reps: str, device: str, force: bool) -> tuple[float, dict]:
    """Seconds for compute_features (dask start-up included, as a user sees it) and its raw reads."""
    with counting_reads() as counts:
        started = time.perf_counter()
        summary = compute_features(FeaturesConfig(store=str(path), reps=reps, device=device, force=force, quiet=True))
        seconds = time.perf_counter() - started
    assert summary.tasks > 0, f"features {reps!r} computed nothing"
    return seconds, counts


# --- (d) dw_spectrum vs the dense SVD ----------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    started = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - started, out


def dense_svdvals(A: torch.Tensor, B: torch.Tensor, chunk: int) -> torch.Tensor:
    """torch.linalg.svdvals(B @ A), chunk adapters at a time: at most chunk dense dW alive (memory bound)."""
    return torch.cat([torch.linalg.svdvals(B[i:i + chunk] @ A[i:i + chunk]) for i in range(0, len(A), chunk)])


def spectrum_vs_svd(device: str, batch: int, rank: int = 4, chunk: int = 8) -> list[tuple]:
    """Per SD shape: (in, out, dw_spectrum s, dense SVD s, max |difference| of the top rank / s_0)."""
    rep = representations.get("dw_spectrum")
    rows = []
    for fan_in, fan_out in SD_SHAPES:
        gen = torch.Generator().manual_seed(0)
        A = torch.randn(batch, rank, fan_in, generator=gen).to(device)  # LoRA-like: A ~ N(0, 1), B small
        B = (1e-3 * torch.randn(batch, fan_out, rank, generator=gen)).to(device)
        scale = torch.ones(batch, device=device)
        rep(A[:1], B[:1], scale[:1])  # warm-up: LAPACK / cuSOLVER initialisation
        dense_svdvals(A[:1], B[:1], 1)
        fast_s, fast = min((_timed(lambda: rep(A, B, scale), device) for _ in range(5)), key=lambda t: t[0])
        dense_s, dense = _timed(lambda: dense_svdvals(A, B, chunk), device)
        error = ((fast[:, :rank] - dense[:, :rank]).abs().amax(1) / dense[:, 0]).max().item()
        rows.append((fan_in, fan_out, fast_s, dense_s, error))
    return rows


# --- the run -----------------------------------------------------------------------------------------


def _machine(device: str) -> str:
    gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other jobs on the cores skew every number below
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(load average {load}); python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); device {device}{gpu}")


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="adapters in the synthetic dataset")
    parser.add_argument("--layers", type=int, default=8, help="layers timed for the original loop (extrapolated)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device of (b), (c), (d)")
    parser.add_argument("--svd-batch", type=int, default=64, help="adapters per shape in (d)")
    parser.add_argument("--work", default=str(ROOT / "stores" / "bench"), help="where the dataset and store go")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"machine: {_machine(device)}", flush=True)

    work = Path(args.work)
    source = synthetic_source(work, args.n)
    ds = datasets.load_from_disk(str(source))["train"]
    columns = lora_columns(ds)
    nine = ",".join(ORIGINAL_REPS)
    warm_page_cache(source)

    print("(b) materialize + features (nine) into a fresh store ...", flush=True)
    path = work / f"features-v{SYNTH_VERSION}-n{args.n}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    materialize(MaterializeConfig(store=str(path), source=str(source), quiet=True))
    b_materialize = time.perf_counter() - started
    b_features, _ = run_features(path, nine, device, force=False)
    b_seconds = b_materialize + b_features
    raw = raw_nbytes(path)

    print("(c) features alone on that store: the nine, all, each alone ...", flush=True)
    c_seconds, _ = run_features(path, nine, device, force=True)
    all_seconds, all_counts = run_features(path, "all", device, force=True)
    singles = {}
    for rep in representations.resolve("all"):
        seconds, counts = run_features(path, rep.name, device, force=True)
        singles[rep.name] = (rep.kind, seconds, counts["bytes"] / raw)

    subset = module_subset(columns, args.layers)
    print(f"(a) original loop on {len(subset)} layers ...", flush=True)
    a_subset = original_loop(source, subset)
    factor = len(columns) / len(subset)
    a_access = sum(a for a, _ in a_subset.values()) * factor
    a_compute = sum(c for _, c in a_subset.values()) * factor
    a_seconds = a_access + a_compute
    a_measured = sum(a + c for a, c in a_subset.values())

    print(f"(d) dw_spectrum vs dense SVD, batch {args.svd_batch} ...", flush=True)
    svd_rows = spectrum_vs_svd(device, args.svd_batch)

    print(f"\ndataset: {ds.num_rows} adapters, {len(columns)} layers; store raw weights {raw / 1e6:.0f} MB "
          f"(each split once)")
    print(f"(a) original loop, per-sample numpy rep_fn on split[layer][:]: {a_measured:.1f} s "
          f"for {len(subset)} layers x 3 splits x 9 representations, extrapolated linearly to {len(columns)} layers: "
          f"{a_seconds:.1f} s (reading {a_access:.1f} s, computing {a_compute:.1f} s)")
    print(f"(b) materialize {b_materialize:.1f} s + features (nine) {b_features:.1f} s = {b_seconds:.1f} s")
    print(f"(c) features alone, --force: nine {c_seconds:.1f} s; --rep all ({len(singles)} representations) "
          f"{all_seconds:.1f} s")

    print(f"\n| {'representation':15} | kind   | (a) original, extrapolated (s) | (c) alone (s) | "
          f"raw bytes read / raw byte |")
    print("|---|---|---:|---:|---:|")
    for name, (kind, seconds, ratio) in singles.items():
        a_rep = f"{sum(a_subset[name]) * factor:.1f}" if name in a_subset else "-"
        print(f"| {name:15} | {kind:6} | {a_rep} | {seconds:.2f} | {ratio:.2f} |")
    print(f"| --rep all       |        | | {all_seconds:.2f} | {all_counts['bytes'] / raw:.2f} |")

    print("\n| dW (in -> out), r = 4 | dw_spectrum (s) | svdvals(B @ A) (s) | speedup | max |diff| / s_0 |")
    print("|---|---:|---:|---:|---:|")
    for fan_in, fan_out, fast_s, dense_s, error in svd_rows:
        print(f"| {fan_in} -> {fan_out} | {fast_s:.4f} | {dense_s:.2f} | {dense_s / fast_s:.0f}x | {error:.1e} |")

    slowest = max(singles, key=lambda name: singles[name][1])
    all_ratio = all_seconds / singles[slowest][1]
    read_ratio = all_counts["bytes"] / raw
    repeated = max(all_counts["reads"].values())
    speedup = min(dense_s / fast_s for _, _, fast_s, dense_s, _ in svd_rows)
    print(f"\na/b = {a_seconds / b_seconds:.1f}x (target >= 20: {_verdict(a_seconds / b_seconds >= 20)})   "
          f"a/c = {a_seconds / c_seconds:.1f}x")
    print(f"--rep all / slowest single ({slowest}, {singles[slowest][1]:.2f} s) = {all_ratio:.2f}x "
          f"(target <= 2: {_verdict(all_ratio <= 2)})")
    print(f"--rep all raw bytes read per raw byte = {read_ratio:.3f}, each chunk read at most {repeated}x "
          f"(target 1.0: {_verdict(read_ratio == 1.0 and repeated == 1)})")
    print(f"dw_spectrum vs dense SVD, smallest speedup = {speedup:.0f}x (target >= 20: {_verdict(speedup >= 20)})")


if __name__ == "__main__":
    main()
