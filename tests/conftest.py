"""Shared helpers and session fixtures: small seeded synthetic datasets, hand-made matrix datasets, stores."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Keep the datasets cache (parquet/arrow sources are turned into Arrow there) out of the user's home,
# and never touch the network. Set before `datasets` is imported anywhere.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="pipeline-tests-hf-"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import zarr  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import loras  # noqa: E402
from cli import main  # noqa: E402
from pipeline.features import FeaturesConfig, compute_features  # noqa: E402
from pipeline.materialize import MaterializeConfig, materialize  # noqa: E402
from pipeline.synthetic import write_synthetic  # noqa: E402
from pipeline.train import TrainConfig, train  # noqa: E402

datasets.disable_progress_bars()


def pytest_report_header(config):
    return f"LoRA file fixtures: {loras.REAL_NOTE}"


# Four modules of the synthetic dataset (attn1/attn2 x to_q/to_v of the first transformer block):
# enough to exercise every path, small enough to keep each test well under a second or two.
SMALL_LAYERS = r"down_blocks\.0\.attentions\.0\."
SMALL_N = 40
SMALL_TRAIN = dict(reps="dw_norms", runs=2, hidden=16, epochs=3, patience=2, quiet=True)  # the trained_small configuration

# Enough adapters for an MLP to learn the synthetic data's planted class signal; two cheap representations.
SIGNAL_N = 400  # 280 train / 39 val / 81 test rows
CHEAP_REPS = "simple_stats,dw_norms"


# --- running things ---------------------------------------------------------------------------------


def run_cli(*args: str):
    """Invoke the `pipeline` click group in-process; returns click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one output line starting with 'error:', no traceback; returns the line."""
    text = result.output
    assert result.exit_code == 2, f"exit code {result.exit_code}, output:\n{text}\nexception: {result.exception!r}"
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def materialize_to(store, source, **options):
    """Run the stage in-process (quiet) and return its Summary."""
    return materialize(MaterializeConfig(store=str(store), source=str(source), quiet=True, **options))


def race_for_lease(zstore, scope: str, racers: int) -> list:
    """``racers`` threads try to take ``scope`` at the same instant; returns the leases that won (held)."""
    import threading

    from pipeline import leases

    contenders = [leases.Lease(zstore, scope) for _ in range(racers)]
    barrier = threading.Barrier(racers)
    won = []

    def go(lease):
        barrier.wait()
        if lease.acquire():
            won.append(lease)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


# --- reading stores ---------------------------------------------------------------------------------


def open_store(path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r")


def store_arrays(path) -> dict[str, np.ndarray]:
    """Every array of a store, by path."""
    root = open_store(path)
    return {name: node[...] for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


def assert_same_arrays(left, right) -> None:
    """Two stores hold the same arrays: same paths, dtypes, shapes and bytes."""
    a, b = store_arrays(left), store_arrays(right)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def file_snapshot(path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under ``path``: equal snapshots mean nothing was written."""
    path = Path(path)
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*")) if p.is_file()}


def raw_groups(path) -> dict[str, bool]:
    """raw/<split>/<module> -> its complete mark."""
    root = open_store(path)
    out = {}
    for split in root["raw"].group_keys():
        for key in root[f"raw/{split}"].group_keys():
            out[f"raw/{split}/{key}"] = bool(root[f"raw/{split}/{key}"].attrs.get("complete", False))
    return out


def source_matrix(ds: datasets.Dataset, column: str, rows) -> np.ndarray:
    """The oracle: rows of a matrix column the plain datasets way, as float32."""
    return np.asarray(ds.select_columns([column])[np.asarray(rows).tolist()][column], dtype=np.float32)


# --- hand-made datasets -----------------------------------------------------------------------------


def matrix_features(columns: dict, dtype: str = "float32", extra: dict | None = None) -> datasets.Features:
    feats = {name: datasets.List(datasets.List(datasets.Value(dtype))) for name in columns}
    feats.update(extra or {})
    return datasets.Features(feats)


def save_matrix_dataset(path, columns: dict[str, list], dtype: str = "float32", extra: dict | None = None,
                        extra_features: dict | None = None) -> Path:
    """A single-split save_to_disk DatasetDict: ``columns`` maps a column to one matrix per row."""
    data = {name: [np.asarray(m).tolist() for m in rows] for name, rows in columns.items()}
    data.update(extra or {})
    features = matrix_features(columns, dtype, extra_features)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features)}).save_to_disk(str(path))
    return Path(path)


def lora_rows(n: int, rank: int = 2, fan_in: int = 6, fan_out: int = 5, seed: int = 0, name: str = "unet.blk.attn1.to_q"):
    """``n`` random (down, up) pairs of one diffusers-named module: {down column: [..], up column: [..]}."""
    rng = np.random.default_rng(seed)
    return {
        f"{name}.lora.down.weight": [rng.standard_normal((rank, fan_in)) / rank for _ in range(n)],
        f"{name}.lora.up.weight": [rng.standard_normal((fan_out, rank)) * 1e-3 for _ in range(n)],
    }


# --- session fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_lora_dir(tmp_path_factory) -> Path:
    """The seven real LoRA files (tests/loras.py), or their generated look-alikes; treat as read-only."""
    return loras.folder(tmp_path_factory.mktemp("real-loras"))[0]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """40 synthetic adapters (64 modules, rank 1, seed 0) in save_to_disk form; treat as read-only."""
    return write_synthetic(tmp_path_factory.mktemp("synth") / "lora40", n=SMALL_N, rank=1, projections=("q", "v"), seed=0)


@pytest.fixture(scope="session")
def synth_ds(synth_dir) -> datasets.Dataset:
    return datasets.load_from_disk(str(synth_dir))["train"]


@pytest.fixture(scope="session")
def synth_store(synth_dir, tmp_path_factory) -> Path:
    """The full store (all 64 modules) of ``synth_dir``, made once; treat as read-only."""
    store = tmp_path_factory.mktemp("stores") / "synth40.zarr"
    materialize_to(store, synth_dir)
    return store


@pytest.fixture(scope="session")
def small_store(synth_dir, tmp_path_factory) -> Path:
    """The store of the four SMALL_LAYERS modules of ``synth_dir``: the clean-run reference."""
    store = tmp_path_factory.mktemp("stores") / "small40.zarr"
    materialize_to(store, synth_dir, layers=SMALL_LAYERS)
    return store


@pytest.fixture(scope="session")
def trained_small(synth_dir, tmp_path_factory) -> Path:
    """The SMALL_LAYERS modules of ``synth_dir`` in several chunks, dw_norms computed, one configuration
    (SMALL_TRAIN) trained: a whole small store; treat as read-only (copy it to damage it)."""
    store = tmp_path_factory.mktemp("stores") / "trained-small.zarr"
    materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    compute_features(FeaturesConfig(store=str(store), reps="dw_norms", quiet=True))
    train(TrainConfig(store=str(store), **SMALL_TRAIN))
    return store


@pytest.fixture(scope="session")
def signal_store(tmp_path_factory) -> Path:
    """A SIGNAL_N-adapter synthetic store with CHEAP_REPS computed, then stripped of raw/ (training must not
    need it). Tests may train into it (each configuration its own runs); copy it to change anything else."""
    home = tmp_path_factory.mktemp("train")
    source = write_synthetic(home / "synth", n=SIGNAL_N, rank=1, projections=("q", "v"), seed=0)
    full = home / "full.zarr"
    materialize_to(full, source)
    compute_features(FeaturesConfig(store=str(full), reps=CHEAP_REPS, quiet=True))
    store = home / "features-only.zarr"
    shutil.copytree(full, store, ignore=lambda folder, names: ["raw"] if Path(folder) == full else [])
    return store
