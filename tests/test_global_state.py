"""Library calls leave the process as they found it, and reading a stamp loads no stage.

Each check runs in a fresh interpreter: this test session has long since imported everything and set what it likes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SMALL_LAYERS, SMALL_TRAIN

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, *args) -> str:
    """Run ``code`` in a new interpreter (the project on its path, ``args`` in sys.argv); returns its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("module", ["pipeline.info", "pipeline.verify"])
def test_reading_stamps_imports_no_torch(module):
    assert python(f"import sys, {module}; print('torch' in sys.modules)").split() == ["False"]


def test_info_on_a_store_without_features_loads_no_torch(small_store):
    """The representation registry (torch) is loaded only to judge a stored representation's stamp."""
    out = python("""
        import sys
        from pipeline.info import describe
        describe(sys.argv[1])
        print('torch' in sys.modules)
    """, small_store)
    assert out.split() == ["False"]


def test_stages_leave_global_state_as_they_found_it(tmp_path):
    """The distributed log level, matplotlib's backend and zarr's write_empty_chunks default are the user's; a stage
    run quiet prints nothing."""
    out = python(f"""
        import logging, sys
        import matplotlib
        import zarr

        matplotlib.use("svg")  # not Agg, which a report would switch it to
        logging.getLogger("distributed").setLevel(logging.INFO)
        def state():
            return (logging.getLogger("distributed").level, matplotlib.get_backend(),
                    zarr.config.get("array.write_empty_chunks"))
        before = state()

        import pipeline
        from pipeline.features import FeaturesConfig, compute_features
        from pipeline.materialize import MaterializeConfig, materialize
        from pipeline.report import write_report
        from pipeline.synthetic import write_synthetic
        from pipeline.train import TrainConfig, train
        imported = state()

        work = sys.argv[1]
        source = write_synthetic(work + "/source", n=40, rank=1, projections=("q", "v"), seed=0)
        store = work + "/s.zarr"
        materialize(MaterializeConfig(store=store, source=str(source), layers={SMALL_LAYERS!r}, quiet=True))
        compute_features(FeaturesConfig(store=store, reps="dw_norms", quiet=True))  # a local dask cluster
        train(TrainConfig(store=store, **{SMALL_TRAIN!r}))
        write_report(store, work + "/report")
        print(before, imported, state(), sep="\\n")
    """, tmp_path)
    lines = out.splitlines()
    assert len(lines) == 3, out  # nothing else was printed
    before, imported, after = lines
    assert before == imported == after
    assert (tmp_path / "report" / "results.csv").is_file()


def test_every_chunk_is_written_though_zarr_default_skips_fill_values(tmp_path):
    """The integrity guarantee without the process-wide setting: an array the pipeline writes, created or reopened,
    stores a chunk equal to the fill value; the same write through a plain zarr array would leave no file."""
    import numpy as np
    import zarr

    from pipeline import store

    assert zarr.config.get("array.write_empty_chunks") is False  # zarr's default, as this process has it
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    chunk = tmp_path / "s.zarr" / "a" / "c" / "0"
    store.require_array(root, "a", (4,), (2,), "float32", ("model",))[:] = np.zeros(4, np.float32)  # created
    assert chunk.is_file()
    chunk.unlink()
    root["a"][:2] = 0  # plain zarr: a chunk of fill values is not stored
    assert not chunk.exists()
    store.require_array(root, "a", (4,), (2,), "float32", ("model",))[:2] = 0  # reused: written through writable
    assert chunk.is_file()
    assert zarr.config.get("array.write_empty_chunks") is False
