"""Choose the raw arrays' chunk size and codec: write and read LoRA-like float32 through zarr.

Run by hand: python bench/codecs.py [--mb 256]. Prints write/read MB/s and the compression ratio
for each codec x chunk size on data shaped like the store's raw arrays (A ~ N(0, 1), B ~ 1e-3 N(0, 1)).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

CODECS = {
    "none": [],
    "blosc-lz4-bitshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=4)],
    "blosc-zstd1-bitshuffle": [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle, typesize=4)],
    "zstd-1": [ZstdCodec(level=1)],
}


def bytes_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def one(root: Path, data: np.ndarray, codec: str, chunk_models: int) -> tuple[float, float, float]:
    path = root / f"{codec}-{chunk_models}.zarr"
    array = zarr.create_array(str(path), shape=data.shape, chunks=(chunk_models, *data.shape[1:]), dtype="float32",
                              compressors=[*CODECS[codec], Crc32cCodec()], fill_value=0.0)
    start = time.perf_counter()
    array[:] = data
    write = time.perf_counter() - start
    start = time.perf_counter()
    back = zarr.open_array(str(path))[:]
    read = time.perf_counter() - start
    assert np.array_equal(back, data)
    ratio = data.nbytes / bytes_on_disk(path)
    shutil.rmtree(path)
    return data.nbytes / 1e6 / write, data.nbytes / 1e6 / read, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=256, help="size of the test array per matrix kind")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    width = 1280
    n = args.mb * 2**20 // (4 * width)
    kinds = {"A (down)": rng.standard_normal((n, 1, width), dtype=np.float32),
             "B (up)": (1e-3 * rng.standard_normal((n, width, 1))).astype(np.float32)}
    print(f"zarr {zarr.__version__}; {args.mb} MB per kind; rank 1, width {width}; crc32c on every chunk; page cache warm")
    print(f"{'kind':9} {'codec':24} {'chunk MB':>8} {'write MB/s':>10} {'read MB/s':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for kind, data in kinds.items():
            for codec in CODECS:
                for chunk_mb in (1, 4, 16):
                    chunk_models = max(1, chunk_mb * 2**20 // (4 * width))
                    w, r, ratio = one(Path(tmp), data, codec, chunk_models)
                    print(f"{kind:9} {codec:24} {chunk_mb:8} {w:10.0f} {r:10.0f} {ratio:6.2f}", flush=True)


if __name__ == "__main__":
    main()
