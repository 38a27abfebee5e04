"""pipeline zoo: really trained adapters of a miniature SD UNet, in synth's format, deterministic and resumable."""

from __future__ import annotations

import json
import re
import sys

import datasets
import numpy as np
import pytest
from conftest import assert_one_line_error, open_store, run_cli

from pipeline.errors import PipelineError
from pipeline.layers import pair_modules
from pipeline.loraws import SCALAR_COLUMNS, features_for
from pipeline.synthetic import sd15_modules
from pipeline.zoo import DIGITS, UNET, ZooConfig, build_zoo, digits, parse_uri, train_adapter, train_base

# A tiny zoo: a base trained for 30 steps, adapters fine-tuned for 6. Seconds, not minutes.
TINY = ZooConfig(n=12, steps=6, lr=1e-2, base_steps=30, base_batch=16)
MODULE = re.compile(r"^unet\.(down_blocks\.\d\.attentions\.\d|mid_block\.attentions\.0|up_blocks\.\d\.attentions\.\d)"
                    r"\.transformer_blocks\.0\.attn[12]\.to_[qv]$")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cache):
    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", TINY, workers=2, cache_dir=cache)


@pytest.fixture(scope="module")
def tiny_ds(tiny):
    return datasets.load_from_disk(str(tiny))["train"]


def _matrices(ds, suffix: str) -> np.ndarray:
    """(n adapters, all of their ``suffix`` matrices flattened and concatenated)."""
    columns = sorted(c for c in ds.column_names if c.endswith(suffix))
    return np.stack([np.concatenate([np.asarray(row[c], np.float32).ravel() for c in columns]) for row in ds.select_columns(columns)])


def test_format_is_synths(tiny, tiny_ds):
    """The same column scheme, feature types and scalar columns as `pipeline synth`; SD's module names."""
    modules, _ = pair_modules(tiny_ds.column_names)
    synth_modules, _ = pair_modules([c for m in sd15_modules() for c in (m.down, m.up)])
    assert {m.scheme for m in modules} == {m.scheme for m in synth_modules}
    assert len(modules) == 28 and all(MODULE.match(m.name) for m in modules)
    assert tiny_ds.column_names[-4:] == list(SCALAR_COLUMNS)
    reference = features_for(sd15_modules())
    for name, feature in tiny_ds.features.items():
        kind = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" if name.startswith("unet.") else name
        assert feature == reference[kind], name
    row = tiny_ds[0]
    widths = {"down_blocks.0": 16, "down_blocks.1": 32, "mid_block": 32, "up_blocks.1": 32, "up_blocks.2": 16}
    for m in modules:
        width = next(w for prefix, w in widths.items() if f"unet.{prefix}." in m.name)
        fan_in = UNET["cross_attention_dim"] if m.name.endswith("attn2.to_v") else width
        assert np.asarray(row[m.down]).shape == (1, fan_in) and np.asarray(row[m.up]).shape == (width, 1), m.name
    assert set(tiny_ds["category_label"]) <= set(DIGITS) and len(tiny_ds) == TINY.n
    assert all(TINY.min_images <= k <= TINY.max_images for k in tiny_ds["num_images"]) and set(tiny_ds["rank"]) == {1}
    assert [f"handwritten {label}" for label in tiny_ds["category_label"]] == tiny_ds["category_name"]


def test_adapters_are_trained_and_differ(tiny_ds):
    """Up matrices start at zero (peft's gaussian init): after training every module's is non-zero, and no two adapters agree."""
    up = _matrices(tiny_ds, ".lora.up.weight")
    columns = sorted(c for c in tiny_ds.column_names if c.endswith(".lora.up.weight"))
    for row in tiny_ds.select_columns(columns):
        assert all(np.abs(np.asarray(row[c])).max() > 0 for c in columns)
    distances = np.linalg.norm(up[:, None] - up[None], axis=-1)
    assert (distances[~np.eye(len(up), dtype=bool)] > 0).all()
    down = _matrices(tiny_ds, ".lora.down.weight")
    assert np.isclose(down.std(), 1.0, atol=0.1)  # gaussian init, std 1/r, moved a little by training


def test_fine_tuning_lowers_the_denoising_loss(cache):
    """More steps on a few images of one digit: the held-out-noise loss on those images falls."""
    base, _ = train_base(TINY)
    adapter = train_adapter(3, ZooConfig(steps=40, lr=1e-2), base)
    assert adapter.loss_after < 0.97 * adapter.loss_before
    untrained = train_adapter(3, ZooConfig(steps=0), base)
    assert untrained.loss_after == untrained.loss_before
    assert all(not up.any() for _, up in untrained.matrices.values())


def test_adapter_rows_follow_its_label():
    """An adapter's images are its label's digit, from the half the base model never saw."""
    data = digits()
    assert not set(data.base_rows) & set(np.concatenate(data.adapter_rows))
    for digit, rows in enumerate(data.adapter_rows):
        assert (data.labels[rows] == digit).all() and len(rows) >= 16


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tiny_ds, tmp_path):
    """From scratch (its own base-model cache) and in this process instead of on two dask workers: the same bytes."""
    again = datasets.load_from_disk(str(build_zoo(tmp_path / "again", TINY, workers=0, cache_dir=tmp_path / "cache")))["train"]
    assert again.data.equals(tiny_ds.data)
    other = ZooConfig(**{**TINY.__dict__, "n": 4, "seed": 1})
    changed = datasets.load_from_disk(str(build_zoo(tmp_path / "other", other, workers=0, cache_dir=tmp_path / "cache")))["train"]
    assert not np.array_equal(_matrices(changed, ".lora.up.weight"), _matrices(tiny_ds.select(range(4)), ".lora.up.weight"))
    summary = json.loads((tiny / "zoo.json").read_text())
    assert summary["config"] == TINY.__dict__ and len(summary["adapters"]["loss_after"]) == TINY.n


def test_interrupted_build_resumes_with_the_same_bytes(tiny_ds, tmp_path, cache):
    """Killed after some adapters: a rerun keeps them, trains only the rest, and gives the clean build's bytes."""
    class Stop(Exception):
        pass

    done = []

    def stopping(stage, total):
        def tick(k):
            done.append(k)
            if stage == "adapters" and len(done) > 4:
                raise Stop
        return tick

    out = tmp_path / "zoo"
    with pytest.raises(Stop):
        build_zoo(out, TINY, workers=0, cache_dir=cache, progress=stopping)
    kept = sorted((tmp_path / ".zoo.partial" / "adapters").glob("*.safetensors"))
    assert 3 <= len(kept) < TINY.n and not out.exists()
    resumed = []
    build_zoo(out, TINY, workers=0, cache_dir=cache, progress=lambda stage, total: resumed.append)
    assert resumed[0] == len(kept)  # the first tick counts the adapters found finished
    assert sum(resumed) == TINY.n
    assert datasets.load_from_disk(str(out))["train"].data.equals(tiny_ds.data)
    assert not (tmp_path / ".zoo.partial").exists()


def test_partial_build_with_other_settings_is_refused(tmp_path, cache):
    (tmp_path / ".zoo.partial").mkdir()
    (tmp_path / ".zoo.partial" / "config.json").write_text(json.dumps(ZooConfig(n=3).__dict__))
    with pytest.raises(PipelineError, match="unfinished zoo with other settings"):
        build_zoo(tmp_path / "zoo", TINY, cache_dir=cache)


def test_zoo_uri_options():
    assert parse_uri("zoo:digits") == ZooConfig()
    assert parse_uri("zoo:digits?n=50&lr=0.01&seed=3") == ZooConfig(n=50, lr=0.01, seed=3)
    for bad, fragment in [("zoo:mnist", "unknown zoo"), ("zoo:digits?size=3", "unknown option 'size'"),
                          ("zoo:digits?n=many", "must be a number")]:
        with pytest.raises(PipelineError, match=fragment):
            parse_uri(bad)


def test_materialize_zoo_source_runs_the_pipeline(tmp_path, monkeypatch, cache):
    """`--source zoo:digits?...` builds the zoo once under the built-in home, then the pipeline runs on it."""
    monkeypatch.setenv("PIPELINE_BUILTIN_HOME", str(tmp_path / "builtin"))
    (tmp_path / "builtin").mkdir()
    (tmp_path / "builtin" / "zoo-base").symlink_to(cache, target_is_directory=True)  # the base trained above
    uri = "zoo:digits?n=10&steps=4&base_steps=30&base_batch=16"
    store = tmp_path / "s.zarr"
    result = run_cli("materialize", "--source", uri, "--store", store, "--quiet")
    assert result.exit_code == 0, result.output
    built = list((tmp_path / "builtin").glob("zoo-digits-v*-n10-*"))
    assert len(built) == 1
    root = open_store(store)
    assert root.attrs["source"]["uri"] == uri and root.attrs["labels"]["category_label"]["classes"] == sorted(
        set(datasets.load_from_disk(str(built[0]))["train"]["category_label"]))
    assert len(root.attrs["modules"]) == 28
    result = run_cli("features", "--store", store, "--rep", "dw_norms,simple_stats", "--quiet")
    assert result.exit_code == 0, result.output
    again = run_cli("materialize", "--source", uri, "--store", store, "--quiet")  # the zoo is reused, the store is complete
    assert again.exit_code == 0 and len(list((tmp_path / "builtin").glob("zoo-digits-v*"))) == 1


def test_cli_zoo_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "there").mkdir()
    assert_one_line_error(run_cli("zoo", "--out", tmp_path / "there", "--n", "2"), "already exists")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    assert_one_line_error(run_cli("zoo", "--out", tmp_path / "new", "--n", "2"), "peft", "pip install")
