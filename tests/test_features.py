"""The features stage: one read per raw chunk, exact values, staleness, resume, dask clusters, bad input."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import zarr
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from conftest import SMALL_LAYERS, assert_one_line_error, file_snapshot, lora_rows, materialize_to, run_cli, save_matrix_dataset
from pipeline import features as features_mod
from pipeline import representations
from pipeline.features import FeaturesConfig, compute_features
from pipeline.views import open_features

CHEAP = "simple_stats,matrix_norms,dw_norms,dw_spectrum"


@pytest.fixture(scope="module")
def chunked_store(synth_dir, tmp_path_factory):
    """Four modules of the 40 synthetic adapters, ~8 adapters per chunk, so every split has several chunks."""
    store = tmp_path_factory.mktemp("features") / "chunked.zarr"
    materialize_to(store, synth_dir, layers=SMALL_LAYERS, chunk_mb=0.02)
    return store


@pytest.fixture
def store(chunked_store, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(chunked_store, copy)
    return copy


def run(store, reps=CHEAP, **options):
    return compute_features(FeaturesConfig(store=str(store), reps=reps, quiet=True, **options))


def raw(store, split, key, role):
    return zarr.open_group(str(store), mode="r")[f"raw/{split}/{key}/{role}"][:]


def test_values_equal_the_representation_applied_to_each_raw_tensor(store):
    run(store)
    root = zarr.open_group(str(store), mode="r")
    attrs = root.attrs.asdict()
    layer_index = {layer["name"]: i for i, layer in enumerate(attrs["layers"])}
    for split in attrs["splits"]:
        stored = root[f"features/{split}/matrix_norms"][:]
        module_stored = root[f"features/{split}/dw_norms"][:]
        for i, module in enumerate(attrs["modules"]):
            A, B = (torch.from_numpy(raw(store, split, module["key"], role)) for role in ("A", "B"))
            rep = representations.get("matrix_norms")
            np.testing.assert_allclose(stored[:, layer_index[module["down"]]], rep(A).numpy(), rtol=1e-6)
            np.testing.assert_allclose(stored[:, layer_index[module["up"]]], rep(B).numpy(), rtol=1e-6)
            dw = representations.get("dw_norms")(A, B, torch.ones(len(A)))
            np.testing.assert_allclose(module_stored[:, i], dw.numpy(), rtol=1e-6)


def test_every_raw_chunk_is_read_exactly_once_for_all_representations(store, monkeypatch):
    reads = Counter()
    original = features_mod.read_raw

    def counting(group, role, start, stop):
        reads[(group.path, role, start)] += 1
        return original(group, role, start, stop)

    monkeypatch.setattr(features_mod, "read_raw", counting)
    run(store, reps="all")
    root = zarr.open_group(str(store), mode="r")
    expected = set()
    for split, info in root.attrs["splits"].items():
        for module in root.attrs["modules"]:
            array = root[f"raw/{split}/{module['key']}/A"]
            for start in range(0, info["n"], array.chunks[0]):
                expected |= {(f"raw/{split}/{module['key']}", role, start) for role in ("A", "B")}
    assert set(reads) == expected
    assert set(reads.values()) == {1}


class HostCopies(TorchFunctionMode):
    """Counts, in a CPU run, the copies from the device to the host that the same run would make on a device.

    A tensor is on the device when .to(device) moved it there or a factory made it there (device=), or
    when it was computed from one that is; .cpu(), .numpy(), .tolist(), .item(), bool(), float(), int() of
    one, or a .to(device) of one (the only move there is: the task has one device), copies it to the host.
    """

    TO_HOST = {"cpu", "numpy", "tolist", "item", "__bool__", "__float__", "__int__", "__index__", "__array__"}

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        on_device = any(getattr(t, "_on_device", False) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        moves = name == "to" and ("device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:]))
        out = func(*args, **kwargs)
        if on_device and (name in self.TO_HOST or moves):
            self.copies.append(name)
            mark = False
        else:
            mark = on_device or moves or "device" in kwargs
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                t._on_device = mark
        return out


def test_a_task_copies_its_results_to_the_host_once(store, monkeypatch):
    """Every representation of every module of a chunk, on the device paths: one copy to the host, no other read."""
    monkeypatch.setattr(representations, "_on_host", lambda t: False)  # what runs on CUDA: no numpy sort, no branch on values
    plan = features_mod.plan_tasks(FeaturesConfig(store=str(store), reps="all,dw_quantiles", device="cpu", quiet=True))
    try:
        task = plan.tasks[0]
        assert len(task.modules) == 4 and len(task.reps) == len(representations.REGISTRY)
        with HostCopies() as counted:
            features_mod.run_task(task)
    finally:
        for lease in plan.held:
            lease.release()
    assert counted.copies == ["cpu"]


def _operators(fn) -> int:
    """Operators fn dispatches from Python (the top-level events of torch.profiler: one launch each on a device)."""
    fn()  # warm: lazy initialisation is not the count
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.cpu_parent is None)


@pytest.mark.parametrize("names, shape, on_host", [("all,dw_quantiles", (4, 48, 80), True), ("all,dw_quantiles", (4, 48, 80), False),
                                                    ("all", (8, 640, 1280), False)])
def test_operators_per_module_do_not_grow_with_the_batch(monkeypatch, names, shape, on_host):
    """Every representation of one module, 2 adapters and 16: the same operators (no loop over adapters).

    Off the host at an SD shape too, where dw_stats takes the batch in one step (on the host it steps
    through it in cache-sized steps, ~6 adapters at 640 -> 1280 and r = 8: a CPU speed choice).
    """
    monkeypatch.setattr(representations, "_on_host", lambda t: on_host)
    g = torch.Generator().manual_seed(0)
    r, fan_in, fan_out = shape
    A, B = torch.randn(16, r, fan_in, generator=g), 1e-2 * torch.randn(16, fan_out, r, generator=g)
    scale = 0.5 + torch.rand(16, generator=g)
    reps = representations.resolve(names)
    counts = [_operators(lambda n=n: features_mod.compute_module(A[:n], B[:n], scale[:n], reps)) for n in (2, 16)]
    assert counts[0] == counts[1], counts


def test_a_rerun_skips_up_to_date_representations_without_writing(store):
    run(store)
    before = file_snapshot(store / "features")
    summary = run(store)
    assert summary.tasks == 0 and not summary.computed
    assert sorted(summary.up_to_date["train"]) == sorted(CHEAP.split(","))
    assert file_snapshot(store / "features") == before


def test_a_changed_version_recomputes_that_representation_only(store, monkeypatch):
    run(store)
    before = file_snapshot(store / "features")
    bumped = dataclasses.replace(representations.REGISTRY["dw_norms"], version=99)
    monkeypatch.setitem(representations.REGISTRY, "dw_norms", bumped)
    summary = run(store)
    assert {tuple(v) for v in summary.computed.values()} == {("dw_norms",)}
    after = file_snapshot(store / "features")
    changed = [path for path in after if after[path] != before.get(path)]
    # Only dw_norms' own arrays and its own progress flags, in every split; nothing of the other representation.
    assert {re.sub(r"^[a-z]+/(_progress/)?dw_norms/.*$", "dw_norms", path) for path in changed} == {"dw_norms"}
    assert {path.split("/")[0] for path in changed} == {"train", "val", "test"}
    attrs = zarr.open_group(str(store), mode="r")["features/train/dw_norms"].attrs
    assert attrs["spec"]["version"] == 99 and attrs["complete"] is True


def test_force_recomputes_to_the_same_bytes(store):
    run(store)
    first = {k: v for k, v in _features(store).items()}
    run(store, force=True)
    for name, values in _features(store).items():
        np.testing.assert_array_equal(values, first[name], err_msg=name)


def _features(store):
    root = zarr.open_group(str(store), mode="r")
    return {f"{split}/{name}": root[f"features/{split}/{name}"][:] for split in root.attrs["splits"] for name in CHEAP.split(",")}


def test_an_interrupted_run_resumes_and_ends_identical(store, chunked_store, tmp_path, monkeypatch):
    clean = tmp_path / "clean.zarr"
    shutil.copytree(chunked_store, clean)
    total = run(clean).tasks

    original = features_mod.run_task
    def crash_on_third(task):  # dask serialises the function: the chunk index, not a counter, picks the victim
        if task.split == "train" and task.chunk == 2:
            raise RuntimeError("simulated crash")
        return original(task)

    monkeypatch.setattr(features_mod, "run_task", crash_on_third)
    with pytest.raises(Exception, match="simulated crash"):
        run(store, workers=None)
    monkeypatch.setattr(features_mod, "run_task", original)
    attrs = zarr.open_group(str(store), mode="r")["features/train/simple_stats"].attrs
    assert attrs["complete"] is False

    resumed = run(store).tasks
    assert 0 < resumed < total  # only what the crash left undone
    for name, values in _features(store).items():
        np.testing.assert_array_equal(values, _features(clean)[name], err_msg=name)


@pytest.mark.slow
def test_a_local_cluster_of_two_processes_writes_the_same_bytes(store, chunked_store, tmp_path):
    threaded = tmp_path / "threaded.zarr"
    shutil.copytree(chunked_store, threaded)
    run(threaded)
    run(store, workers=2)
    for name, values in _features(store).items():
        np.testing.assert_array_equal(values, _features(threaded)[name], err_msg=name)


def test_degenerate_weights_give_finite_features(tmp_path):
    rows = lora_rows(6, rank=1, fan_in=5, fan_out=4)
    up = "unet.blk.attn1.to_q.lora.up.weight"
    rows[up] = [np.zeros((4, 1)) for _ in range(6)]  # an untrained peft adapter: B = 0
    rows["unet.blk.attn2.to_q.lora.down.weight"] = [np.full((1, 5), 0.5) for _ in range(6)]  # constant tensors
    rows["unet.blk.attn2.to_q.lora.up.weight"] = [np.full((4, 1), -2.0) for _ in range(6)]
    source = save_matrix_dataset(tmp_path / "degenerate", rows, extra={"label": list("abcabc")},
                                 extra_features={"label": __import__("datasets").Value("string")})
    store = tmp_path / "degenerate.zarr"
    materialize_to(store, source)
    run(store, reps="all,dw_quantiles")
    root = zarr.open_group(str(store), mode="r")
    for name in representations.REGISTRY:
        values = root[f"features/train/{name}"][:]
        assert np.isfinite(values).all(), name


def test_open_features_gives_names_and_labels(store):
    run(store)
    ds = open_features(str(store), "train")
    assert set(CHEAP.split(",")) <= set(ds.data_vars)
    root = zarr.open_group(str(store), mode="r")
    assert list(ds.layer.values) == [layer["name"] for layer in root.attrs["layers"]]
    assert list(ds.module.values) == [m["name"] for m in root.attrs["modules"]]
    classes = root["labels/train/category_label"].attrs["classes"]
    assert list(ds.category_label.values) == [classes[c] for c in root["labels/train/category_label"][:]]
    assert ds.dw_norms.dims == ("adapter", "module", "dw_norms_feature")


def test_list_shows_every_representation():
    result = run_cli("features", "--list")
    assert result.exit_code == 0
    for name, rep in representations.REGISTRY.items():
        assert any(line.split()[0] == name and str(rep.width) in line.split() for line in result.output.splitlines()[1:]), name


def test_unknown_representation_lists_the_valid_ones(store):
    line = assert_one_line_error(run_cli("features", "--store", store, "--rep", "nope", "--quiet"), "nope")
    assert "spectral" in line and "dw_norms" in line


def test_incomplete_materialized_data_names_the_fix(store):
    root = zarr.open_group(str(store), mode="r+")
    key = root.attrs["modules"][0]["key"]
    root[f"raw/train/{key}"].attrs["complete"] = False
    assert_one_line_error(run_cli("features", "--store", store, "--quiet"), f"raw/train/{key}", "pipeline materialize")


def test_a_folder_that_is_not_a_store(tmp_path):
    assert_one_line_error(run_cli("features", "--store", tmp_path / "nothing.zarr", "--quiet"), "pipeline materialize")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_cuda_without_cuda(store):
    assert_one_line_error(run_cli("features", "--store", store, "--device", "cuda", "--quiet"), "CUDA")
