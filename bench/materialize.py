"""Benchmark, run by hand: the original layer access vs `pipeline materialize` vs the Arrow read bound.

    python bench/materialize.py [--n 5000] [--layers 8] [--memory 1GiB]
    python bench/materialize.py --from-files [--n 5000] [--memory 1GiB]

On a synthetic dataset (rank 1, to_q/to_v: 128 layers, ~400 KB float32 per adapter), one run measures
 (a) the original access: ds.with_format("torch"), then split[layer][:] for each layer of each split;
     timed on --layers layers and extrapolated linearly to all 128 (the output says so);
 (b) `pipeline materialize` into a fresh store, in a subprocess whose peak memory is sampled;
 (c) the bound for any reader: every weight column's Arrow buffers read to float32 numpy, nothing written;
 (d) the bound for any writer: (c), then each split's rows gathered and written to plain .npy files (page cache, like (b): neither syncs).
The page cache is warmed by one read first, so all three read from memory.

--from-files: the same adapters as one folder each (pytorch_lora_weights.safetensors + labels.csv, written
once from the synthetic dataset), materialized from the files and from the save_to_disk dataset, one after
the other in one run: MB/s of each, and the bytes each process wrote (wchar: every write system call, page
cache included; a copy into the HuggingFace cache would show here) against the store's size on disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import datasets
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from _data import lora_columns, module_subset, synthetic_source  # noqa: E402
from _measure import run_measured  # noqa: E402
from cli import parse_size  # noqa: E402
from pipeline.splits import original_split  # noqa: E402


def original_access(path: Path, layers: list[str]) -> float:
    """Seconds for `split[layer][:]` on torch-formatted splits, over ``layers`` and the three splits."""
    ds = datasets.load_from_disk(str(path))["train"]
    first = ds.train_test_split(test_size=0.3, seed=42)
    second = first["test"].train_test_split(test_size=0.67, seed=42)
    splits = [first["train"], second["train"], second["test"]]
    splits = [s.with_format("torch") for s in splits]
    start = time.perf_counter()
    for layer in layers:
        for split in splits:
            tensor = split[layer][:]
            assert tensor.ndim == 3
    return time.perf_counter() - start


def column_float32(ds, column: str) -> np.ndarray:
    """One weight column's Arrow buffers as a (rows, out, in) float32 array: a zero-copy view when it can be."""
    chunks = ds.data.column(column).chunks
    first = chunks[0][0]
    rows, cols = len(first), len(first[0])
    values = np.concatenate([c.flatten().flatten().to_numpy(zero_copy_only=False) for c in chunks])
    return values.astype(np.float32, copy=False).reshape(-1, rows, cols)


def arrow_bound(path: Path) -> tuple[float, int]:
    """Seconds to read every weight column's Arrow buffers into float32 numpy (and bytes read)."""
    ds = datasets.load_from_disk(str(path))["train"]
    nbytes = 0
    start = time.perf_counter()
    for column in lora_columns(ds):
        array = column_float32(ds, column)
        nbytes += array.nbytes
    return time.perf_counter() - start, nbytes


def copy_bound(path: Path, out: Path) -> tuple[float, int]:
    """Seconds to read every weight column, gather each split's rows and write them to plain .npy files.

    The same work as materialize (read, reorder rows into splits, write every byte once) without zarr,
    chunking, checksums or a store: the bound for any materializer on this disk.
    """
    ds = datasets.load_from_disk(str(path))["train"]
    split_rows = list(original_split(ds.num_rows).values())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    nbytes = 0
    start = time.perf_counter()
    for i, column in enumerate(lora_columns(ds)):
        array = column_float32(ds, column)
        for k, indices in enumerate(split_rows):
            part = array[np.asarray(indices)]
            np.save(out / f"{i}-{k}.npy", part)
            nbytes += part.nbytes
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds, nbytes


def run_materialize(source: Path, store: Path, memory: str) -> tuple[float, dict]:
    shutil.rmtree(store, ignore_errors=True)
    measured = run_measured([sys.executable, str(ROOT / "cli.py"), "materialize", "--source", str(source), "--store",
                             str(store), "--memory", memory, "--quiet"], ROOT)
    return measured.seconds, measured.peak


def files_source(source: Path, work: Path) -> Path:
    """The adapters of ``source`` as one diffusers folder each, with a labels.csv; written on first use."""
    from safetensors.numpy import save_file

    folder = work / f"{source.name}-files"
    if (folder / "labels.csv").exists():
        return folder
    print(f"writing the adapters of {source} as one folder each under {folder} ...", flush=True)
    ds = datasets.load_from_disk(str(source))["train"]
    columns = lora_columns(ds)
    rows = ["file,category_label"]
    for start in range(0, ds.num_rows, 500):  # 500 adapters at a time: bounded memory
        part = ds.select(range(start, min(ds.num_rows, start + 500)))
        arrays = {c: column_float32(part, c) for c in columns}
        labels = part["category_label"]
        for j in range(part.num_rows):
            name = f"adapter_{start + j:06d}"
            (folder / name).mkdir(parents=True, exist_ok=True)
            save_file({c: np.ascontiguousarray(arrays[c][j]) for c in columns}, str(folder / name / "pytorch_lora_weights.safetensors"))
            rows.append(f"{name},{labels[j]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def from_files(args, work: Path) -> None:
    source = synthetic_source(work, args.n)
    files = files_source(source, work)
    ds = datasets.load_from_disk(str(source))["train"]
    n_split = sum(len(v) for v in original_split(ds.num_rows).values())
    arrow_bound(source)  # both sources warm in the page cache, as in the main benchmark
    for path in files.rglob("*.safetensors"):
        path.read_bytes()
    cache = work / "hf-cache"  # a fresh datasets cache: bytes written there count against the method that writes them
    results = {}
    for name, src in (("save_to_disk", source), ("files", files)):
        store = work / f"bench-{name}-n{args.n}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        env_cmd = ["env", f"HF_DATASETS_CACHE={cache}", sys.executable, str(ROOT / "cli.py"), "materialize", "--source", str(src),
                   "--store", str(store), "--memory", args.memory, "--quiet"]
        measured = run_measured(env_cmd, ROOT)
        cached = _store_bytes(cache) if cache.exists() else 0
        results[name] = (measured, _store_bytes(store), cached)
    mb = sum(column_float32(ds.select(range(1)), c).nbytes for c in lora_columns(ds)) * n_split / 1e6
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"{ds.num_rows} adapters, {len(lora_columns(ds))} layers; {mb:.0f} MB of weights written to the store (each row once per split)")
    for name, (measured, store_bytes, cached) in results.items():
        print(f"{name:>13}: {measured.seconds:.1f} s ({mb / measured.seconds:.0f} MB/s); wrote {measured.io.get('wchar', 0) / 1e6:.0f} MB "
              f"(store {store_bytes / 1e6:.0f} MB on disk, {measured.io.get('wchar', 0) / max(store_bytes, 1):.2f}x; HF cache "
              f"{cached / 1e6:.0f} MB); peak anonymous memory {measured.peak.get('RssAnon', 0) / 2**30:.2f} GiB")
    f, d = results["files"][0], results["save_to_disk"][0]
    print(f"files / save_to_disk throughput = {d.seconds / f.seconds * 100:.0f}% (target >= 70%); files bytes written / store = "
          f"{f.io.get('wchar', 0) / max(results['files'][1], 1):.2f}x (target <= 1.05x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="adapters in the synthetic dataset")
    parser.add_argument("--layers", type=int, default=8, help="layers timed for the original access (extrapolated)")
    parser.add_argument("--memory", default="1GiB", help="materialize --memory budget")
    parser.add_argument("--work", default=str(ROOT / "stores" / "bench"), help="where the dataset and store go")
    parser.add_argument("--from-files", action="store_true", help="the adapters as one folder each vs the save_to_disk dataset")
    args = parser.parse_args()

    work = Path(args.work)
    if args.from_files:
        return from_files(args, work)
    source = synthetic_source(work, args.n)
    ds = datasets.load_from_disk(str(source))["train"]
    columns = lora_columns(ds)
    n_split = sum(len(v) for v in original_split(ds.num_rows).values())

    arrow_bound(source)  # warm the page cache so every method reads from memory
    c_seconds, nbytes = arrow_bound(source)
    d_seconds, d_bytes = copy_bound(source, work / f"copy-n{args.n}")
    b_seconds, peaks = run_materialize(source, work / f"bench-n{args.n}.zarr", args.memory)
    subset = module_subset(columns, args.layers)
    a_subset = original_access(source, subset)
    a_seconds = a_subset * len(columns) / len(subset)

    mb = nbytes / 1e6
    mb_b = mb * n_split / ds.num_rows  # materialize writes each row once per split it belongs to
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"dataset: {ds.num_rows} adapters, {len(columns)} layers, {mb:.0f} MB float32 of weights")
    print(f"(a) original with_format('torch') split[layer][:]: {a_subset:.1f} s for {len(subset)} layers x 3 splits, "
          f"extrapolated linearly to {len(columns)} layers: {a_seconds:.1f} s ({mb / a_seconds:.1f} MB/s, "
          f"{a_seconds / len(columns) * 1000 / ds.num_rows * 1000:.0f} ms per layer per 1,000 adapters)")
    print(f"(b) pipeline materialize (whole run, subprocess): {b_seconds:.1f} s ({mb_b / b_seconds:.0f} MB/s); "
          f"peak anonymous memory {peaks.get('RssAnon', 0) / 2**30:.2f} GiB, peak RSS incl. mapped dataset "
          f"{peaks.get('VmRSS', 0) / 2**30:.2f} GiB; budget {args.memory}")
    print(f"(c) Arrow buffers -> float32 numpy, nothing written: {c_seconds:.2f} s ({mb / c_seconds:.0f} MB/s)")
    print(f"(d) read + gather into splits + write plain .npy files, no zarr: {d_seconds:.2f} s "
          f"({d_bytes / 1e6 / d_seconds:.0f} MB/s)")
    print(f"a/b = {a_seconds / b_seconds:.1f}x   b/c throughput = {(mb_b / b_seconds) / (mb / c_seconds) * 100:.0f}%   "
          f"b/d throughput = {(mb_b / b_seconds) / (d_bytes / 1e6 / d_seconds) * 100:.0f}%")
    budget = parse_size(args.memory)
    print(f"peak anonymous memory within budget + 1 GiB: {peaks.get('RssAnon', 0) <= budget + 2**30}")


if __name__ == "__main__":
    main()
