"""Benchmark, run by hand: how every stage's cost grows with the number of adapters.

    python bench/scale.py [--sizes 1000,5000,20000,50000] [--train-reps simple_stats,stats,dw_spectrum]
                          [--runs 10] [--original-sizes 1000,5000] [--bound 4GiB] [--keep]

For each size N, a synthetic lora-ws dataset (rank 1, to_q/to_v) is written under stores/scale/, then
each stage runs as its own subprocess (`python cli.py ...`), measured by bench/_measure.py (wall time,
peak RssAnon and VmRSS, bytes through read/write): synth, materialize, `features --rep all`, and
`train` (--runs runs of each --train-reps representation, every layer). At each --original-sizes N
the original approach is measured in the same run: feature extraction by bench/features.py's
original loop (with_format("torch"), split[layer][:], per-sample rep_fn for the nine; timed on
--layers layers and extrapolated to 128) and training by bench/train.py's original loop (one run of
each --train-reps representation that is one of the nine, times --runs).

Printed: a table per stage and size; time and memory growth exponents between sizes; bytes read by
`features` per raw byte in the store; the projected full ablation (9 representations x 2 layer sets
(all, visual) x 10 runs) of the pipeline and of the original at every size and extrapolated to 50,000
with the measured growth. Results are appended to bench/results/scale.json; docs/scale.png is drawn
from them (time and peak memory per stage against N, with the ideal linear line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from _data import lora_columns, module_subset  # noqa: E402
from _measure import run_measured  # noqa: E402

from cli import parse_size  # noqa: E402
from pipeline.synthetic import SYNTH_VERSION  # noqa: E402

NINE = ("simple_stats", "rank_based", "stats", "spectral", "matrix_norms", "distribution", "frequency",
        "info_theoretic", "ensemble")
STAGES = ("synth", "materialize", "features", "train")
ABLATION_CONFIGS = len(NINE) * 2  # 9 representations x 2 layer sets (all, visual)


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_size(n: int, args, work: Path) -> dict:
    source, store = work / f"synth-v{SYNTH_VERSION}-n{n}", work / f"scale-n{n}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(Path(f"{store}.report"), ignore_errors=True)
    stages = {}
    if source.exists():
        stages["synth"] = None  # reused: not measured
    else:
        print(f"[{n}] synth ...", flush=True)
        stages["synth"] = run_measured(cli("synth", "--out", str(source), "--n", str(n), "--quiet"), ROOT)
    print(f"[{n}] materialize ...", flush=True)
    stages["materialize"] = run_measured(cli("materialize", "--source", str(source), "--store", str(store),
                                             "--memory", args.memory, "--quiet"), ROOT)
    raw = dir_bytes(store / "raw")
    print(f"[{n}] features --rep all ...", flush=True)
    stages["features"] = run_measured(cli("features", "--store", str(store), "--rep", "all", "--quiet"), ROOT)
    features_bytes = dir_bytes(store / "features")
    print(f"[{n}] train {args.train_reps} x {args.runs} runs ...", flush=True)
    stages["train"] = run_measured(cli("train", "--store", str(store), "--rep", args.train_reps, "--layers", "all",
                                       "--runs", str(args.runs), "--quiet"), ROOT)
    startup = run_measured(cli("features", "--list"), ROOT, capture=True).io.get("rchar", 0)
    row = {"n": n, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "raw_bytes": raw, "startup_rchar": startup, "features_bytes": features_bytes, "source_bytes": dir_bytes(source),
           "train_configs": len(args.train_reps.split(",")), "runs": args.runs,
           "stages": {name: None if m is None else {"seconds": m.seconds, "peak": m.peak, "io": m.io}
                      for name, m in stages.items()}}
    if n in args.original_sizes:
        row["original"] = measure_original(source, store, n, args)
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
    return row


def measure_original(source: Path, store: Path, n: int, args) -> dict:
    """The original approach at this size: extraction per representation (extrapolated) and training."""
    import datasets

    import features as features_bench
    import train as train_bench

    print(f"[{n}] original extraction, {args.layers} layers x 9 representations ...", flush=True)
    columns = lora_columns(datasets.load_from_disk(str(source))["train"])
    subset = module_subset(columns, args.layers)
    per_rep = features_bench.original_loop(source, subset)
    factor = len(columns) / len(subset)
    extraction = {rep: (access + compute) * factor for rep, (access, compute) in per_rep.items()}

    original_reps = [r for r in args.train_reps.split(",") if r in NINE]
    print(f"[{n}] original training, 1 run of {', '.join(original_reps)} ...", flush=True)
    training = train_bench.original_seconds_per_run(store, original_reps)
    return {"extraction_seconds": extraction, "extrapolated_from_layers": len(subset),
            "train_seconds_per_run": training}


def growth(rows: list[dict], stage: str, key) -> list[str]:
    """Exponent k in cost ~ N^k between consecutive sizes (1 = linear)."""
    out = []
    for a, b in zip(rows, rows[1:]):
        ma, mb = a["stages"].get(stage), b["stages"].get(stage)
        if ma and mb and key(ma) > 0 and key(mb) > 0:
            out.append(f"{a['n']}->{b['n']}: {math.log(key(mb) / key(ma)) / math.log(b['n'] / a['n']):.2f}")
    return out


def projected(row: dict) -> dict:
    """Full ablation at this size: 9 reps x 2 layer sets x 10 runs, pipeline and (where measured) original."""
    s = row["stages"]
    train_per_run = s["train"]["seconds"] / (row["train_configs"] * row["runs"])
    pipeline = s["materialize"]["seconds"] + s["features"]["seconds"] + ABLATION_CONFIGS * 10 * train_per_run
    out = {"pipeline": pipeline}
    if "original" in row:
        o = row["original"]
        # per (representation, layer set): read + compute its layers (all: 128, visual: 64), then 10 runs
        extraction = sum(o["extraction_seconds"].values()) * (1 + 0.5)
        per_run = sum(o["train_seconds_per_run"].values()) / len(o["train_seconds_per_run"])
        out["original"] = extraction + ABLATION_CONFIGS * 10 * per_run
    return out


def report(rows: list[dict], bound: int) -> None:
    print(f"\n| N | stage | time (s) | peak RssAnon (GiB) | peak VmRSS (GiB) | read (GB) | written (GB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        for stage in STAGES:
            m = row["stages"].get(stage)
            if m is None:
                continue
            gib = lambda k: m["peak"].get(k, 0) / 2**30  # noqa: E731
            print(f"| {row['n']} | {stage} | {m['seconds']:.1f} | {gib('RssAnon'):.2f} | {gib('VmRSS'):.2f} | "
                  f"{m['io'].get('rchar', 0) / 1e9:.2f} | {m['io'].get('wchar', 0) / 1e9:.2f} |")
    print("\ngrowth exponents (cost ~ N^k; 1 = linear):")
    for stage in STAGES:
        t = growth(rows, stage, lambda m: m["seconds"])
        mem = growth(rows, stage, lambda m: m["peak"].get("RssAnon", 0))
        if t:
            print(f"  {stage:12} time {', '.join(t)};  peak memory {', '.join(mem)}")
    print("\nfeatures --rep all, bytes read per raw byte in the store ((rchar - start-up rchar) / raw; start-up is "
          "what `pipeline features --list` reads: Python modules and libraries):")
    for row in rows:
        net = row['stages']['features']['io'].get('rchar', 0) - row.get("startup_rchar", 0)
        print(f"  N={row['n']}: {net / row['raw_bytes']:.3f} (raw {row['raw_bytes'] / 1e9:.2f} GB)")
    worst = max(m["peak"].get("RssAnon", 0) for row in rows for m in row["stages"].values() if m)
    print(f"\npeak anonymous memory over every stage and size: {worst / 2**30:.2f} GiB "
          f"(bound {bound / 2**30:.1f} GiB: {'met' if worst <= bound else 'MISSED'})")

    print("\nprojected full ablation (9 representations x 2 layer sets x 10 runs):")
    for row in rows:
        p = projected(row)
        line = f"  N={row['n']}: pipeline {p['pipeline'] / 3600:.2f} h"
        if "original" in p:
            line += f", original {p['original'] / 3600:.2f} h, original/pipeline {p['original'] / p['pipeline']:.1f}x"
        print(line)
    with_original = [r for r in rows if "original" in r]
    if len(with_original) >= 2:
        a, b = with_original[-2], with_original[-1]
        pa, pb = projected(a), projected(b)
        for who in ("pipeline", "original"):
            k = math.log(pb[who] / pa[who]) / math.log(b["n"] / a["n"])
            at50k = pb[who] * (50_000 / b["n"]) ** k
            print(f"  {who} extrapolated to N=50,000 with the growth measured {a['n']}->{b['n']} (N^{k:.2f}): "
                  f"{at50k / 3600:.1f} h")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ns = [r["n"] for r in rows]
    for stage in STAGES:
        pts = [(r["n"], r["stages"][stage]) for r in rows if r["stages"].get(stage)]
        if not pts:
            continue
        x = [n for n, _ in pts]
        t = [m["seconds"] for _, m in pts]
        mem = [m["peak"].get("RssAnon", 0) / 2**30 for _, m in pts]
        line = axes[0].plot(x, t, "o-", label=stage)[0]
        axes[0].plot(x, [t[0] * n / x[0] for n in x], ":", color=line.get_color(), alpha=0.6)
        axes[1].plot(x, mem, "o-", color=line.get_color(), label=f"{stage} (anon)")
        axes[1].plot(x, [m["peak"].get("VmRSS", 0) / 2**30 for _, m in pts], "--", color=line.get_color(), alpha=0.5)
    axes[0].set(xscale="log", yscale="log", xlabel="adapters", ylabel="wall time (s)",
                title="time per stage (dotted: linear from the smallest)")
    axes[1].set(xscale="log", xlabel="adapters", ylabel="peak RSS (GiB)",
                title="peak memory per stage (solid: RssAnon; dashed: VmRSS)")
    for ax in axes:
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,20000,50000")
    parser.add_argument("--original-sizes", default="1000,5000")
    parser.add_argument("--train-reps", default="simple_stats,stats,dw_spectrum")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--layers", type=int, default=8, help="layers timed for the original extraction")
    parser.add_argument("--memory", default="1GiB", help="materialize --memory")
    parser.add_argument("--bound", default="4GiB", help="peak anonymous memory every stage must stay under")
    parser.add_argument("--work", default=str(ROOT / "stores" / "scale"))
    parser.add_argument("--keep", action="store_true", help="keep each size's dataset and store")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of bench/results/scale.json for sizes not measured now (each row keeps its date)")
    parser.add_argument("--plot-only", action="store_true", help="redraw docs/scale.png from bench/results/scale.json")
    args = parser.parse_args()
    args.original_sizes = {int(s) for s in args.original_sizes.split(",") if s}
    results = ROOT / "bench" / "results" / "scale.json"
    if args.plot_only:
        rows = json.loads(results.read_text())["rows"]
    else:
        print(f"command: {shlex.join(['python', *sys.argv])}")
        print(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}; "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        sizes = sorted(int(s) for s in args.sizes.split(","))
        rows = [r for r in json.loads(results.read_text())["rows"] if r["n"] not in sizes] if args.merge and results.exists() else []
        for n in sizes:
            rows.append(measure_size(n, args, work))
            rows.sort(key=lambda r: r["n"])
            results.parent.mkdir(exist_ok=True)
            results.write_text(json.dumps({"command": sys.argv, "machine": platform.platform(),
                                           "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                                           "rows": rows}, indent=1))
            report(rows, parse_size(args.bound))
    plot(rows, ROOT / "docs" / "scale.png")


if __name__ == "__main__":
    main()
