"""bench/gpu.py, the prepared GPU check: its smoke mode runs end to end on this CPU, so the script cannot rot
before a GPU is lent; its comparison and time box do what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402  (bench/gpu.py)

SECTIONS = ("features", "train_steps", "train_agreement", "ablation")


def test_relative_differences_are_per_column_over_the_spread():
    cpu = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 5.0], [4.0, 1.0, 5.0]])  # column stds: sqrt(8/3), 0, 0
    cuda = cpu + np.array([[0.0, 0.0, 0.0], [1e-3, 0.0, 1e-6], [-2e-3, 0.0, 0.0]])
    rel = gpu.relative_differences(cpu, cuda)
    np.testing.assert_allclose(rel[0], 2e-3 / np.sqrt(8 / 3), rtol=1e-12)
    assert rel[1] == 0.0 and rel[2] == np.inf  # constant columns: equal is 0, different is inf
    assert gpu.relative_differences(cpu.reshape(3, 1, 3), cuda.reshape(3, 1, 3)).shape == (3,)  # (n, layer, feature)
    with pytest.raises(ValueError):
        gpu.relative_differences(cpu, cuda[:, :2])


def test_the_cuda_comparisons_run_on_two_cpu_results(trained_small, tmp_path):
    """What (a) and (c) do with CUDA results, given CPU ones on both sides (CUDA is absent here): all equal."""
    import shutil

    import zarr

    from conftest import SMALL_TRAIN
    from pipeline import store as store_mod
    from pipeline.train import Setup, TrainConfig, load_data

    other = tmp_path / "other.zarr"
    shutil.copytree(trained_small, other)
    reps = gpu.compare_features(trained_small, other)
    assert reps["dw_norms"] == {"worst": 0.0, "worst_column": None, "columns": reps["dw_norms"]["columns"],
                                "columns_over": 0, "ok": True} and reps["dw_norms"]["columns"] > 0
    assert reps["simple_stats"] == {"compared": False, "why": "not complete in both stores (train)"}  # not computed
    counts = gpu.histogram_counts_agree(zarr.open_group(str(trained_small), mode="r"), "train", rows=8, device="cpu")
    assert counts["equal"] and counts["rows"] == 8 * 2 * 4  # 8 adapters x (A, B) x 4 modules

    data = load_data(store_mod.open_root(str(trained_small)), str(trained_small), Setup(("dw_norms",), "all"), None)
    hp = TrainConfig(**SMALL_TRAIN).hyper()
    fits = [gpu._fit(data, [1, 2], hp, "cpu", deadline=float("inf")) for _ in range(2)]
    assert gpu.repeatability(*fits) == {"identical_predictions": True, "max_best_weight_difference": 0.0,
                                        "max_curve_difference": 0.0, "identical": True}
    with pytest.raises(gpu.OutOfTime):
        gpu._fit(data, [1, 2], hp, "cpu", deadline=0.0)


def test_a_budget_too_small_for_anything_skips_every_section_and_says_so(tmp_path):
    result = gpu.run(gpu.parse_args(["--smoke", "--budget", "0.5", "--work", str(tmp_path / "work")]))
    assert all(result["sections"][name]["status"] == "skipped" for name in SECTIONS)
    assert result["skipped"] == [f"{name}: everything: no time left in the budget" for name in SECTIONS]
    assert not (tmp_path / "work").exists()  # removed without --keep


def test_a_section_that_raises_is_recorded_and_the_next_ones_run(tmp_path, monkeypatch):
    def boom(ctx, deadline):
        raise RuntimeError("no\n GPU")

    def fine(ctx, deadline):
        return {"status": "done", "notes": [], "skipped": []}

    monkeypatch.setattr(gpu, "SECTIONS", (("features", boom), *((name, fine) for name in SECTIONS[1:])))
    out = tmp_path / "gpu.json"
    result = gpu.run(gpu.parse_args(["--smoke", "--work", str(tmp_path / "work")]), out)
    assert result["sections"]["features"] == {"status": "failed", "notes": [], "error": "RuntimeError: no GPU",
                                              "skipped": ["the rest of the section: it raised RuntimeError"]}
    assert [result["sections"][name]["status"] for name in SECTIONS[1:]] == ["done"] * 3
    written = json.loads(out.read_text())  # after each section, so that a run killed from outside keeps its figures
    assert written["complete"] is False and list(written["sections"]) == list(SECTIONS)


def test_the_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert result["complete"] is True and result["smoke"] is True and [name for name in SECTIONS if sections[name]["status"] == "done"] == list(SECTIONS)
    features = sections["features"]
    assert features["cpu"]["stage_seconds"] > 0 and features["raw_bytes"] > 0 and "cuda" not in features
    steps = sections["train_steps"]["results"]
    assert [(r["width"], r["device"], r["runs"]) for r in steps] == [(64, "cpu", 3)] and steps[0]["ms_per_step"] > 0
    agreement = sections["train_agreement"]["cpu"]
    assert len(agreement["test_accuracy"]["per_run"]) == 3 and 0 <= agreement["test_accuracy"]["mean"] <= 1
    ablation = sections["ablation"]
    assert ablation["stages"]["train"]["configurations_finished"] == 18 == ablation["configurations"]
    assert ablation["at_target"]["extrapolated"] is True and ablation["at_target"]["end_to_end"] > ablation["end_to_end_at_n"]
    # the CUDA parts are skipped, and the JSON says so; their targets have no figure
    assert "features: every CUDA part: --smoke runs on the CPU only" in result["skipped"]
    assert result["targets"]["histogram counts equal"] == {"figure": None, "met": None}
    assert result["machine"]["cuda"] is False
