"""Benchmark, run by hand: what the integrity checks cost, this tree against a git revision.

    python bench/integrity.py [--n 1000] [--against d8728eb] [--repeats 2]

Issue 12 made every complete mark record a chunk manifest (a 4-byte tail read per chunk), every
array write all of its chunks, and every reader check that the chunks it reads exist. This runs the
same stages with the code of REV (a temporary git worktree) and of this tree, alternating, each
stage in its own process (bench/_measure.py), on one synthetic dataset of --n adapters:
materialize (a fresh store), features --rep all, train --rep dw_norms (10 runs, 20 epochs) and
verify. It prints the best time of each and the ratio this tree / REV.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _measure import run_measured  # noqa: E402

STAGES = ("materialize", "features", "train", "verify")


def stage_commands(tree: Path, source: Path, store: Path) -> dict[str, list[str]]:
    cli = [sys.executable, str(tree / "cli.py")]
    return {
        "materialize": [*cli, "materialize", "--source", str(source), "--store", str(store), "--quiet"],
        "features": [*cli, "features", "--store", str(store), "--rep", "all", "--quiet"],
        "train": [*cli, "train", "--store", str(store), "--rep", "dw_norms", "--runs", "10", "--epochs", "20", "--quiet"],
        "verify": [*cli, "verify", "--store", str(store), "--quiet"],
    }


def run_all(tree: Path, source: Path, scratch: Path) -> dict[str, float]:
    store = Path(tempfile.mkdtemp(prefix="integrity-", dir=scratch)) / "s.zarr"
    try:
        return {name: run_measured(command, tree).seconds for name, command in stage_commands(tree, source, store).items()}
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--against", default="d8728eb")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"command: python bench/integrity.py {' '.join(sys.argv[1:])}")
    scratch = ROOT / "stores" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    source = scratch / f"integrity-synth-n{args.n}"
    if not source.exists():
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "synth", "--out", str(source), "--n", str(args.n), "--quiet"],
                       check=True)
    work = Path(tempfile.mkdtemp(prefix="integrity-tree-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(work / "tree"), args.against],
                   check=True, capture_output=True)
    best = {"rev": {}, "this": {}}
    try:
        for _ in range(args.repeats):  # alternating, so drift in the machine's load hits both alike
            for name, tree in (("rev", work / "tree"), ("this", ROOT)):
                for stage, seconds in run_all(tree, source, scratch).items():
                    best[name][stage] = min(best[name].get(stage, float("inf")), seconds)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "tree")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.n} synthetic adapters, best of {args.repeats}, seconds (each stage a fresh process, start-up included)")
    print(f"| stage | at {args.against} | this tree | this / {args.against} |")
    print("|---|---:|---:|---:|")
    for stage in STAGES:
        old, new = best["rev"][stage], best["this"][stage]
        print(f"| {stage} | {old:.1f} | {new:.1f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
