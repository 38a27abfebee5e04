"""Benchmark, run by hand on a GPU machine: the prepared GPU check of issue 16, at most 8 minutes on one GPU.

    python bench/gpu.py [--out bench/gpu.json] [--budget 480] [--ablation-part 5000] [--ablation-n 50000]
                        [--work stores/gpu] [--keep] [--smoke]

Writes one JSON file (--out). Each section has its share of --budget (time a section leaves unused goes to
the next ones), stops or skips what does not fit, and records what it skipped and why:
 (a) features: `pipeline features --rep all` on one synthetic store (--n-features adapters, 128 layers) with
     --device cpu and with --device cuda (each a CLI process): seconds and MB/s of raw weights on each, and
     their agreement. Per representation, each column's (layer or module x feature) largest absolute CPU-CUDA
     difference over the adapters, relative to that column's std across adapters (target <= 1e-4). And the
     histogram counts, exactly: no representation stores counts (`frequency` is FFT magnitudes), but
     info_theoretic (and ensemble's part of it) bins every raw tensor into 50 bins
     (representations._histogram_counts), so those counts are compared on CPU and CUDA for the raw A and B
     of every module (the train split's first 256 adapters);
 (b) training steps: pipeline.model.time_steps with R = 10 runs, the original hyper-parameters, and inputs the
     size of a 5,000-adapter store's train split (3,500 rows, the widths of simple_stats and ensemble on every
     layer), on CPU and CUDA: ms per step and, on CUDA, host syncs per step (time_steps counts them under
     torch.cuda.set_sync_debug_mode("error")). Until time_steps exists (issue 16 section 1) the section times
     whole epochs of train_ensemble instead and counts syncs in "warn" mode, per-epoch reads included: it says so;
 (c) training agreement: 10 runs of simple_stats (every layer, the original protocol) on the (a) store, on CPU
     and twice on CUDA: CPU minus CUDA test accuracy with its 95% interval (pipeline.stats.compare, independent
     runs: CUDA dropout draws from CUDA generators), and CUDA run-to-run repeatability (the same seeds twice);
 (d) the full ablation (9 representations x 2 layer sets (all, visual) x 10 runs, the original protocol) end to
     end as CLI processes (materialize, features of the nine, train) at --ablation-part adapters, extrapolated to
     --ablation-n with the growth measured by bench/scale.py (materialize and features N^1, train N^1.06); a
     train stopped by its time box is estimated from the configurations it finished. Writing the synthetic
     dataset is timed apart: it is the input, not the pipeline. --ablation-part 50000 measures it all, if the
     budget allows (it does not in 8 minutes: synthesising 50,000 adapters alone takes minutes).
--smoke: tiny sizes (40 adapters, 4 modules, a few epochs), CUDA parts skipped with a note, well under a minute
on this CPU; tests/test_gpu_bench.py runs it, so that the script cannot rot before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from _data import synthetic_source  # noqa: E402
from _measure import run_measured  # noqa: E402
from scale import ABLATION_CONFIGS, NINE  # noqa: E402

from pipeline import model as model_mod  # noqa: E402
from pipeline import representations, stats  # noqa: E402
from pipeline import store as store_mod  # noqa: E402
from pipeline.hyper import Hyper  # noqa: E402
from pipeline.model import evaluate, train_ensemble  # noqa: E402
from pipeline.results import load_runs  # noqa: E402
from pipeline.train import Setup, load_data  # noqa: E402

FEATURE_TOLERANCE = 1e-4  # a column's largest CPU-CUDA difference, over its spread across adapters
HISTOGRAM_ROWS = 256  # adapters per module whose raw A and B are binned on both devices
GROWTH = {"materialize": 1.0, "features": 1.0, "train": 1.06}  # cost ~ N^k, measured 5k -> 50k
GROWTH_SOURCE = ("bench/scale.py on the 2-core CPU, 5k -> 50k (docs/performance.md): materialize N^1.00, features "
                 "N^0.99, train N^1.06 per run; not measured on a GPU")
SHARES = {"features": 0.30, "train_steps": 0.08, "train_agreement": 0.22, "ablation": 0.36}  # of --budget
# `features --rep all` on the project's 2-core CPU: 22.8 s for 2,000 adapters (docs/performance.md, bench/features.py),
# the "this CPU" of issue 16's target (features on one GPU at least 5x faster)
TWO_CORE_REP_ALL_SECONDS_PER_ADAPTER = 22.8 / 2000
SMOKE_MODULES = r"down_blocks\.0\.attentions\.0\."  # 4 of the 64 modules (tests/conftest.py's SMALL_LAYERS)
SEED = 42  # the first run's seed, as pipeline train's


@dataclass(frozen=True)
class Sizes:
    n_features: int  # adapters of the (a)/(c) store
    modules: str | None  # materialize --modules (None: all 64)
    step_rows: int  # (b): training rows
    step_widths: tuple[int, ...]  # (b): input widths
    steps: int  # (b): steps timed per width and device
    step_hyper: Hyper  # (b): hyper-parameters
    runs: int  # (b), (c): runs trained together
    agreement: Hyper  # (c): hyper-parameters
    ablation_runs: int
    ablation_options: tuple[str, ...]  # (d): train options besides the original protocol's (none in a full run)


# 640 and 8576: the widths of simple_stats and ensemble on 128 layers
FULL = Sizes(2000, None, 3500, (640, 8576), 50, Hyper(), 10, Hyper(), 10, ())
SMOKE = Sizes(40, SMOKE_MODULES, 200, (64,), 5, Hyper(hidden=32), 3, Hyper(hidden=32, epochs=3, patience=2), 2,
              ("--epochs", "2", "--hidden", "16"))


class OutOfTime(Exception):
    """A section's time box ran out (raised from a training loop's epoch hook)."""


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    work: Path
    cuda: bool
    features_store: Path | None = None  # the (a) store with every representation computed on CPU (for (c))


# --- comparisons, importable (tests/test_devices.py uses them on CUDA) ----------------------------------------


def relative_differences(cpu: np.ndarray, cuda: np.ndarray) -> np.ndarray:
    """(n, ...) twice -> (columns,): per column, max over adapters of |cpu - cuda| over the std of cpu (population).

    0 where the column is constant and both agree, inf where it is constant and they differ.
    """
    a = np.asarray(cpu, dtype=np.float64).reshape(len(cpu), -1)
    b = np.asarray(cuda, dtype=np.float64).reshape(len(cuda), -1)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {cpu.shape} and {cuda.shape}")
    if len(a) == 0:
        return np.zeros(a.shape[1])
    diff, spread = np.abs(a - b).max(0), a.std(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(spread > 0, diff / spread, np.where(diff == 0, 0.0, np.inf))


def compare_features(cpu_path: Path, cuda_path: Path) -> dict:
    """Per representation of ``--rep all``: the worst relative difference of a column (and which), columns over
    FEATURE_TOLERANCE; representations not complete in both stores are listed as not compared."""
    a, b = zarr.open_group(str(cpu_path), mode="r"), zarr.open_group(str(cuda_path), mode="r")
    attrs = a.attrs.asdict()
    out = {}
    for rep in representations.resolve("all"):
        axis = [x["name"] for x in attrs["layers" if rep.kind == "tensor" else "modules"]]
        names = rep.feature_names()
        row = {"worst": 0.0, "worst_column": None, "columns": 0, "columns_over": 0}
        for split in attrs["splits"]:
            x, y = a.get(f"features/{split}/{rep.name}"), b.get(f"features/{split}/{rep.name}")
            if x is None or y is None or not (x.attrs.get("complete") and y.attrs.get("complete")):
                row = {"compared": False, "why": f"not complete in both stores ({split})"}
                break
            rel = relative_differences(x[:], y[:])
            row["columns"] += rel.size
            row["columns_over"] += int((rel > FEATURE_TOLERANCE).sum())
            worst = int(np.argmax(rel))
            if rel[worst] > row["worst"]:
                row["worst"] = float(rel[worst])
                row["worst_column"] = f"{split}/{axis[worst // rep.width]}/{names[worst % rep.width]}"
        if "compared" not in row:
            row["ok"] = row["columns_over"] == 0
        out[rep.name] = row
    return out


def histogram_counts_agree(root: zarr.Group, split: str, rows: int = HISTOGRAM_ROWS, device: str = "cuda") -> dict:
    """The 50-bin counts info_theoretic takes of each raw tensor, on CPU and on ``device``, for the raw A and B of every
    module (the first ``rows`` adapters of ``split``): rows compared, rows whose counts differ in any bin."""
    n = min(rows, root.attrs["splits"][split]["n"])
    compared = mismatched = 0
    for module in root.attrs["modules"]:
        group = root[f"raw/{split}/{module['key']}"]
        for role in ("A", "B"):
            flat = torch.from_numpy(store_mod.read_array(group, role, 0, n)).to(torch.float32).flatten(1)
            on_cpu = representations._histogram_counts(flat)
            on_cuda = representations._histogram_counts(flat.to(device)).cpu()
            compared += len(flat)
            mismatched += int((on_cpu != on_cuda).any(1).sum())
    return {"rows": compared, "mismatched_rows": mismatched, "equal": mismatched == 0}


def _no_cuda(ctx: Context) -> str:
    return "every CUDA part: " + ("--smoke runs on the CPU only" if ctx.args.smoke else "no CUDA here")


# --- running stages -----------------------------------------------------------------------------------------


def cli(*args) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *(str(a) for a in args)]


def stage(args: list, timeout: float) -> dict:
    """One `pipeline ...` CLI process, killed at ``timeout`` s: wall seconds, timed_out, error (its last lines)."""
    if timeout < 1:
        return {"seconds": 0.0, "timed_out": True, "error": None, "output": "", "skipped": "no time left"}
    try:
        m = run_measured(cli(*args), ROOT, capture=True, timeout=timeout)
    except SystemExit as exc:  # the command failed: keep its last lines
        return {"seconds": None, "timed_out": False, "error": str(exc)[-1500:], "output": ""}
    return {"seconds": m.seconds, "timed_out": m.timed_out, "error": None, "output": m.output,
            "peak_rss_anon": m.peak.get("RssAnon")}


def _task_seconds(output: str) -> float | None:
    """The stage's own time, as `pipeline features` prints it ("N tasks in X s"): without the process start-up."""
    found = re.findall(r"(\d+) tasks in ([\d.]+) s", output)
    return float(found[-1][1]) if found else None


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "output"}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _modules_option(sizes: Sizes) -> list[str]:
    return ["--modules", sizes.modules] if sizes.modules else []


def _materialize(ctx: Context, n: int, name: str, deadline: float) -> tuple[Path, dict, float]:
    """The n-adapter synthetic dataset (written once) materialized into work/name: (store, stage result, synth s)."""
    started = time.perf_counter()
    source = synthetic_source(ctx.work, n)
    synth_seconds = time.perf_counter() - started
    path = ctx.work / name
    shutil.rmtree(path, ignore_errors=True)
    result = stage(["materialize", "--source", source, "--store", path, *_modules_option(ctx.sizes), "--quiet"],
                   deadline - time.perf_counter())
    return path, result, synth_seconds


def _deadline_hook(deadline: float):
    def on_epoch(epoch, active):
        if time.perf_counter() > deadline:
            raise OutOfTime(f"stopped at epoch {epoch}: the section's time box ran out")
    return on_epoch


# --- (a) features on CPU and CUDA ---------------------------------------------------------------------------


def features_section(ctx: Context, deadline: float) -> dict:
    out = {"status": "done", "notes": [], "skipped": [], "n": ctx.sizes.n_features,
           "reps": [r.name for r in representations.resolve("all")]}
    store, made, synth_seconds = _materialize(ctx, ctx.sizes.n_features, "features.zarr", deadline)
    out["synth_seconds"], out["materialize"] = synth_seconds, _public(made)
    if made["error"] or made["timed_out"]:
        out["status"] = "skipped"
        out["skipped"].append("everything: materialize did not finish in the section's box")
        return out
    raw = dir_bytes(store / "raw")
    out["raw_bytes"] = raw
    devices = ["cpu", "cuda"] if ctx.cuda else ["cpu"]
    if not ctx.cuda:
        out["skipped"].append(_no_cuda(ctx))
    paths = {}
    for device in devices:
        paths[device] = ctx.work / f"features-{device}.zarr"
        shutil.copytree(store, paths[device])
        left = deadline - time.perf_counter()
        timeout = left / 2 if device == "cpu" and ctx.cuda else left  # keep half for the CUDA run
        result = stage(["features", "--store", paths[device], "--rep", "all", "--device", device], timeout)
        seconds = _task_seconds(result["output"])
        out[device] = {**_public(result), "stage_seconds": seconds,
                       "mb_per_s": raw / seconds / 1e6 if seconds else None}
        if result["timed_out"] or result["error"]:
            out["status"] = "partial"
            out["skipped"].append(f"{device}: features did not finish ({'stopped by the time box' if result['timed_out'] else 'failed'})")
    if out.get("cpu", {}).get("stage_seconds"):
        ctx.features_store = paths["cpu"]
    if ctx.cuda and out.get("cuda", {}).get("stage_seconds") and out["cpu"].get("stage_seconds"):
        out["cuda_speedup"] = out["cpu"]["stage_seconds"] / out["cuda"]["stage_seconds"]  # over this machine's CPU
        if ctx.sizes.modules is None:  # the 2-core figure is for all 128 layers
            out["cuda_speedup_vs_2core_cpu"] = TWO_CORE_REP_ALL_SECONDS_PER_ADAPTER * ctx.sizes.n_features / out["cuda"]["stage_seconds"]
    if ctx.cuda and "cuda" in paths:
        out["agreement"] = {"tolerance": FEATURE_TOLERANCE, "reps": compare_features(paths["cpu"], paths["cuda"])}
        rows = out["agreement"]["reps"].values()
        out["agreement"]["all_ok"] = all(r.get("ok", False) for r in rows)
        out["histogram_counts"] = histogram_counts_agree(zarr.open_group(str(store), mode="r"), "train")
    else:
        out["skipped"].append("agreement and histogram counts: they need CUDA")
    return out


# --- (b) training steps ---------------------------------------------------------------------------------------


def _steps_per_epoch(rows: int, batch: int) -> int:
    return rows // batch + (rows % batch > 1)  # a last batch of one row is skipped


def _epoch_timed_steps(x, y, seeds, hp: Hyper, steps: int) -> dict:
    """Until pipeline.model.time_steps exists: ms per step from whole epochs of train_ensemble (a warm-up epoch
    first), and on CUDA the host syncs counted in "warn" mode, the per-epoch reads included."""
    per_epoch = _steps_per_epoch(len(x), hp.batch_size)
    epochs = max(1, math.ceil(steps / per_epoch))
    hp = replace(hp, epochs=epochs, patience=epochs + 1, plateau_patience=epochs + 1)
    val = slice(0, min(len(x), 500))
    train_ensemble(x, y, x[val], y[val], seeds, replace(hp, epochs=1), "classification", int(y.max()) + 1)  # warm-up
    cuda = x.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        started = time.perf_counter()
        try:
            train_ensemble(x, y, x[val], y[val], seeds, hp, "classification", int(y.max()) + 1)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        seconds = time.perf_counter() - started
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    out = {"ms_per_step": 1000 * seconds / (epochs * per_epoch), "steps": epochs * per_epoch, "runs": len(seeds),
           "device": str(x.device), "how": "fallback: whole epochs of train_ensemble, evaluation included"}
    if cuda:
        out["host_syncs_per_step_including_epoch_reads"] = syncs / (epochs * per_epoch)
    return out


def train_steps_section(ctx: Context, deadline: float) -> dict:
    sizes = ctx.sizes
    timer = getattr(model_mod, "time_steps", None)
    out = {"status": "done", "notes": [], "skipped": [], "rows": sizes.step_rows, "runs": sizes.runs,
           "hyper": asdict(sizes.step_hyper),
           "measured_by": "pipeline.model.time_steps" if timer else "fallback (pipeline.model.time_steps does not exist yet)",
           "results": []}
    if timer is None:
        out["notes"].append("pipeline.model.time_steps is not there yet (issue 16 section 1): ms per step from whole "
                            "epochs instead, host syncs counted in warn mode including the per-epoch reads")
    if not ctx.cuda:
        out["skipped"].append(_no_cuda(ctx))
    seeds = [SEED + r for r in range(sizes.runs)]
    for width in sizes.step_widths:
        g = torch.Generator().manual_seed(width)
        x, y = torch.randn(sizes.step_rows, width, generator=g), torch.randint(0, 10, (sizes.step_rows,), generator=g)
        for device in ["cpu", "cuda"] if ctx.cuda else ["cpu"]:
            if time.perf_counter() > deadline:
                out["status"] = "partial"
                out["skipped"].append(f"width {width} on {device}: the section's time box ran out")
                continue
            xd, yd = x.to(device), y.to(device)
            if timer is not None:
                result = dict(timer(xd, yd, seeds, sizes.step_hyper, "classification", 10, steps=sizes.steps))
            else:
                result = _epoch_timed_steps(xd, yd, seeds, sizes.step_hyper, sizes.steps)
            out["results"].append({"width": width, **_jsonable(result)})
    return out


# --- (c) CPU vs CUDA training, and CUDA run to run -----------------------------------------------------------


def _fit(data, seeds, hp: Hyper, device: str, deadline: float):
    x = {s: torch.from_numpy(data.x[s]).to(device) for s in ("train", "val", "test")}
    y = {s: torch.as_tensor(data.y[s], device=device) for s in ("train", "val")}
    ens = train_ensemble(x["train"], y["train"], x["val"], y["val"], seeds, hp, "classification", len(data.classes),
                         on_epoch=_deadline_hook(deadline))
    with torch.no_grad():
        predictions = evaluate(ens.best, x["test"], ens.depth).argmax(-1).cpu().numpy()
    return ens, predictions


def _accuracy(data, predictions: np.ndarray) -> dict:
    acc = (predictions == data.y["test"][None]).mean(1)
    return {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, "per_run": acc.tolist()}


def train_agreement_section(ctx: Context, deadline: float) -> dict:
    sizes = ctx.sizes
    out = {"status": "done", "notes": [], "skipped": [], "rep": "simple_stats", "layers": "all", "runs": sizes.runs,
           "hyper": asdict(sizes.agreement)}
    if ctx.features_store is None:
        return {**out, "status": "skipped", "skipped": ["everything: no store with CPU features from (a)"]}
    path = str(ctx.features_store)
    data = load_data(store_mod.open_root(path), path, Setup(("simple_stats",), "all"), None)
    seeds = [SEED + r for r in range(sizes.runs)]
    fits = {}
    for name, device in [("cpu", "cpu")] + ([("cuda", "cuda"), ("cuda_again", "cuda")] if ctx.cuda else []):
        try:
            ens, predictions = _fit(data, seeds, sizes.agreement, device, deadline)
        except OutOfTime as exc:
            out["status"] = "partial"
            out["skipped"].append(f"{name} and after: {exc}")
            break
        fits[name] = (ens, predictions)
        out[name] = {"seconds": ens.seconds, "epochs": [len(c) for c in ens.curves["lr"]], "test_accuracy": _accuracy(data, predictions)}
    if not ctx.cuda:
        out["skipped"].append(_no_cuda(ctx))
    if "cpu" in fits and "cuda" in fits:
        c = stats.compare(data.y["test"], fits["cpu"][1], fits["cuda"][1])  # no seeds given: independent runs
        out["cpu_minus_cuda"] = {"difference": c.difference, "low": c.low, "high": c.high, "level": c.level,
                                 "agree": bool(c.low <= 0 <= c.high)}
    if "cuda" in fits and "cuda_again" in fits:
        out["cuda_repeat"] = repeatability(fits["cuda"], fits["cuda_again"])
    return out


def repeatability(first: tuple, second: tuple) -> dict:
    """Two (Ensemble, test predictions) of the same seeds: are they the same run? Largest differences if not."""
    (a, pa), (b, pb) = first, second
    weights = max(float((a.best[k].double() - b.best[k].double()).abs().max()) for k in a.best)
    curves = max(float(np.abs(np.concatenate(a.curves[k]) - np.concatenate(b.curves[k])).max())
                 if all(len(u) == len(v) for u, v in zip(a.curves[k], b.curves[k])) else math.inf for k in a.curves)
    same = bool(np.array_equal(pa, pb))
    return {"identical_predictions": same, "max_best_weight_difference": weights, "max_curve_difference": curves,
            "identical": same and weights == 0 and curves == 0}


# --- (d) the full ablation ------------------------------------------------------------------------------------


def _features_progress(path: Path) -> float:
    """Share of (split, representation, chunk) progress flags set: how far a stopped features run got."""
    root = zarr.open_group(str(path), mode="r")
    done = total = 0
    for split in root.attrs["splits"]:
        progress = root.get(f"features/{split}/_progress")
        for name in progress.array_keys() if progress is not None else ():
            flags = progress[name][:]
            done, total = done + int(flags.sum()), total + flags.size
    return done / total if total else 0.0


def ablation_section(ctx: Context, deadline: float) -> dict:
    args, sizes = ctx.args, ctx.sizes
    n, target = args.ablation_part, args.ablation_n
    out = {"status": "done", "notes": [], "skipped": [], "n": n, "target_n": target, "reps": list(NINE), "layer_sets": ["all", "visual"],
           "configurations": ABLATION_CONFIGS, "runs": sizes.ablation_runs,
           "protocol": " ".join(sizes.ablation_options) or "original", "stages": {}}
    store, made, out["synth_seconds"] = _materialize(ctx, n, f"ablation-n{n}.zarr", deadline)
    out["stages"]["materialize"] = _public(made)
    if made["error"] or made["timed_out"]:
        return {**out, "status": "skipped", "skipped": ["everything: materialize did not finish in the section's box"]}
    feat = stage(["features", "--store", store, "--rep", ",".join(NINE), "--device", "auto"], deadline - time.perf_counter())
    out["stages"]["features"] = {**_public(feat), "stage_seconds": _task_seconds(feat["output"])}
    seconds = {"materialize": made["seconds"], "features": feat["seconds"]}
    if feat["error"]:
        return {**out, "status": "partial", "skipped": ["train and the end-to-end figure: features failed"]}
    if feat["timed_out"]:
        share = _features_progress(store)
        seconds["features"] = feat["seconds"] / share if share else None
        out["skipped"].append(f"features: stopped by the time box at {share:.0%} of its chunks (its time is extrapolated "
                              "from that); train: not run (no complete features)")
        out["status"] = "partial"
    else:
        tr = stage(["train", "--store", store, "--rep", ",".join(NINE), "--layers", "all,visual", "--runs", sizes.ablation_runs,
                    "--device", "auto", *sizes.ablation_options, "--quiet"], deadline - time.perf_counter())
        runs = load_runs(str(store))
        per_config = (runs.groupby("config_hash").agg(runs=("run", "size"), seconds=("ensemble_seconds", "first"),
                                                      device=("device", "first")) if len(runs) else None)
        finished = 0 if per_config is None else int((per_config["runs"] == sizes.ablation_runs).sum())
        out["stages"]["train"] = {**_public(tr), "configurations_finished": finished,
                                  "ensemble_seconds": [] if per_config is None else per_config["seconds"].round(3).tolist(),
                                  "devices": [] if per_config is None else sorted(set(per_config["device"]))}
        if tr["error"]:
            return {**out, "status": "partial", "skipped": out["skipped"] + ["the end-to-end figure: train failed"]}
        seconds["train"] = tr["seconds"]
        if tr["timed_out"]:
            seconds["train"] = tr["seconds"] * ABLATION_CONFIGS / finished if finished else None
            out["status"] = "partial"
            out["skipped"].append(f"train: stopped by the time box after {finished} of {ABLATION_CONFIGS} configurations (its "
                                  "time is that part's wall time scaled to all of them)")
    out["seconds_at_n"] = seconds
    if any(seconds.get(k) is None for k in GROWTH):
        out["skipped"].append("the end-to-end figure: a stage was neither measured nor estimable")
        return out
    out["end_to_end_at_n"] = sum(seconds[k] for k in GROWTH)
    ratio = target / n
    at_target = {k: seconds[k] * ratio ** GROWTH[k] for k in GROWTH}
    out["at_target"] = {"seconds": at_target, "end_to_end": sum(at_target.values()), "extrapolated": n != target,
                        "growth": GROWTH if n != target else None, "growth_source": GROWTH_SOURCE if n != target else None,
                        "under_10_minutes": sum(at_target.values()) < 600}
    if n != target:
        out["notes"].append(f"extrapolated from {n} to {target} adapters (x{ratio:g}), not measured at {target}")
    return out


# --- the run --------------------------------------------------------------------------------------------------


def _jsonable(value):
    """Numbers and containers as JSON takes them: tensors and numpy scalars to Python, NaN/Inf as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def machine(cuda: bool) -> dict:
    out = {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cuda": cuda}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                   cuda_version=torch.version.cuda)
    return out


SECTIONS = (("features", features_section), ("train_steps", train_steps_section),
            ("train_agreement", train_agreement_section), ("ablation", ablation_section))


def run(args: argparse.Namespace, out: Path | None = None) -> dict:
    """Every section in its time box; returns what is written to --out. ``out``: also written after each section
    ("complete": false until the end), so that a run stopped from outside keeps the sections it finished.

    A section that raises is recorded as failed (its exception in one line) and the next one runs."""
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    sizes = SMOKE if args.smoke else FULL
    if args.n_features:
        sizes = replace(sizes, n_features=args.n_features)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, sizes, work, cuda)
    result = {"script": "bench/gpu.py", "command": shlex.join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "smoke": args.smoke, "budget_seconds": args.budget, "machine": machine(cuda), "sizes": asdict(sizes),
              "sections": {}, "skipped": []}
    share = 0.0
    try:
        for name, section in SECTIONS:
            share += SHARES[name]
            deadline = started + args.budget * share
            if time.perf_counter() > deadline - 1:
                result["sections"][name] = {"status": "skipped", "notes": [], "skipped": ["everything: no time left in the budget"]}
            else:
                print(f"[{time.perf_counter() - started:6.1f} s] {name} ...", flush=True)
                try:
                    result["sections"][name] = section(ctx, deadline)
                except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' figures
                    detail = " ".join(str(exc).split())[:500]
                    result["sections"][name] = {"status": "failed", "notes": [], "error": f"{type(exc).__name__}: {detail}",
                                                "skipped": [f"the rest of the section: it raised {type(exc).__name__}"]}
            result["skipped"] += [f"{name}: {what}" for what in result["sections"][name]["skipped"]]
            if out is not None:
                _write(out, {**result, "complete": False, "seconds": time.perf_counter() - started})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - started
    result["targets"] = targets(result["sections"])
    result["complete"] = True
    return _jsonable(result)


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=1) + "\n")


def targets(sections: dict) -> dict:
    """Issue 16's GPU targets, each with the figure measured (None: not measured here) and whether it is met."""
    def get(*keys):
        value = sections
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    speedup = get("features", "cuda_speedup_vs_2core_cpu")
    syncs = [r.get("host_syncs") for r in get("train_steps", "results") or [] if r.get("host_syncs") is not None]
    ablation = get("ablation", "at_target", "end_to_end")
    rows = {
        "features on cuda >= 5x the 2-core CPU (22.8 s per 2,000 adapters, --rep all)": (speedup, None if speedup is None else speedup >= 5),
        "features agree, every column <= 1e-4 of its spread": (get("features", "agreement", "all_ok"),) * 2,
        "histogram counts equal": (get("features", "histogram_counts", "equal"),) * 2,
        "host syncs per training step == 0 (time_steps)": (syncs or None, all(s == 0 for s in syncs) if syncs else None),
        "cpu and cuda test accuracy agree (95% interval of the difference holds 0)": (get("train_agreement", "cpu_minus_cuda", "agree"),) * 2,
        "cuda repeatable (same seeds twice, identical)": (get("train_agreement", "cuda_repeat", "identical"),) * 2,
        "full ablation at 50,000 adapters < 600 s (extrapolated unless measured)": (ablation, get("ablation", "at_target", "under_10_minutes")),
    }
    return {name: {"figure": figure, "met": met} for name, (figure, met) in rows.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "gpu.json"), help="the JSON file written")
    parser.add_argument("--budget", type=float, default=None, help="seconds for every section together (default 480; --smoke 300)")
    parser.add_argument("--n-features", type=int, default=None, help="adapters of the (a)/(c) store (default 2000; --smoke 40)")
    parser.add_argument("--ablation-part", type=int, default=None, help="adapters measured in (d) (default 5000; --smoke 40)")
    parser.add_argument("--ablation-n", type=int, default=50_000, help="adapters (d) is extrapolated to")
    parser.add_argument("--work", default=str(ROOT / "stores" / "gpu"), help="where the datasets and stores go (removed after)")
    parser.add_argument("--keep", action="store_true", help="keep --work")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU only: checks that the script runs")
    args = parser.parse_args(argv)
    args.budget = args.budget or (300.0 if args.smoke else 480.0)
    args.ablation_part = args.ablation_part or (40 if args.smoke else 5000)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    result = run(args, out)
    _write(out, result)
    for note in result["skipped"]:
        print(f"  skipped: {note}")
    print(f"wrote {out} in {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
