"""Benchmark, run by hand: peak memory of one stage, this tree against a git revision.

    python bench/memory.py train --store STORE [--rep dw_norms] [--runs 10] [--epochs 2] [--against REV]
    python bench/memory.py materialize --source DATASET [--against REV]

No stage's memory may grow with the number of adapters beyond what it must hold. The scale run at 50k
exposed two stages that did:
- train (2.8 GiB): the final evaluation took a whole split at once. `train` here is a short training
  (few epochs; the final evaluation is the same size as in a full one) on an existing store.
- materialize (1.9 GiB with --memory 1GiB): zarr's sync() raises a missing node's KeyError from a
  local variable, a reference cycle that held the copy loop's frame, and so each module's last
  batch, until Python's cyclic GC ran. Fixed (store.member): 1.53 GiB before, 0.62 after.
  `materialize` here writes a new store from DATASET (removed afterwards).
Each runs with the code of REV (a temporary git worktree) and with this tree, each in its own process
measured by bench/_measure.py; the peak RssAnon (and VmRSS, which also counts mapped file pages) of
both is printed.
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


def measure(tree: Path, args) -> tuple[float, float, float]:
    if args.stage == "train":
        command = [sys.executable, str(tree / "cli.py"), "train", "--store", str(Path(args.store).resolve()), "--rep",
                   args.rep, "--runs", str(args.runs), "--epochs", str(args.epochs), "--force", "--quiet"]
    else:
        out = Path(tempfile.mkdtemp(prefix="memory-", dir=ROOT / "stores")) / "m.zarr"
        command = [sys.executable, str(tree / "cli.py"), "materialize", "--source", str(Path(args.source).resolve()),
                   "--store", str(out), "--memory", args.memory, "--quiet"]
    try:
        m = run_measured(command, tree)
    finally:
        if args.stage == "materialize":
            shutil.rmtree(out.parent, ignore_errors=True)
    return m.seconds, m.peak.get("RssAnon", 0) / 2**30, m.peak.get("VmRSS", 0) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "materialize"])
    parser.add_argument("--store", help="train: an existing store with the representation's features")
    parser.add_argument("--source", help="materialize: a dataset to materialize")
    parser.add_argument("--memory", default="1GiB", help="materialize --memory")
    parser.add_argument("--rep", default="dw_norms")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--against", default=None, help="a git revision to compare with (e.g. the commit before a fix)")
    args = parser.parse_args()
    print(f"command: python bench/memory.py {' '.join(sys.argv[1:])}")
    rows = []
    if args.against:
        work = Path(tempfile.mkdtemp(prefix="train-memory-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(work / "tree"), args.against],
                       check=True, capture_output=True)
        try:
            rows.append((f"at {args.against}", *measure(work / "tree", args)))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "tree")], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    rows.append(("this tree", *measure(ROOT, args)))
    what = (f"train --rep {args.rep} --runs {args.runs} --epochs {args.epochs} on {args.store}" if args.stage == "train"
            else f"materialize --source {args.source} --memory {args.memory}")
    print(f"\n{what}")
    print("| code | seconds | peak RssAnon (GiB) | peak VmRSS (GiB) |")
    print("|---|---:|---:|---:|")
    for name, seconds, anon, rss in rows:
        print(f"| {name} | {seconds:.1f} | {anon:.2f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
