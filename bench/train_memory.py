"""Benchmark, run by hand: peak memory of `pipeline train` on an existing store, this tree against a git revision.

    python bench/train_memory.py --store stores/keep-n50000.zarr [--rep dw_norms] [--runs 10] [--epochs 2]
                                 [--against REV]

Training memory should not grow with the number of adapters beyond the configuration's features
(n x width floats). The scale run at 50k exposed 2.8 GiB in train: the final evaluation took a whole
split at once. This runs a short training (few epochs; the final evaluation is the same size as in a
full one) with the code of REV (a temporary git worktree) and with this tree, each in its own process
measured by bench/_measure.py, and prints the peak RssAnon of both.
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


def measure(tree: Path, args) -> tuple[float, float]:
    command = [sys.executable, str(tree / "cli.py"), "train", "--store", str(Path(args.store).resolve()), "--rep", args.rep,
               "--runs", str(args.runs), "--epochs", str(args.epochs), "--force", "--quiet"]
    m = run_measured(command, tree)
    return m.seconds, m.peak.get("RssAnon", 0) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--rep", default="dw_norms")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--against", default=None, help="a git revision to compare with (e.g. the commit before a fix)")
    args = parser.parse_args()
    print(f"command: python bench/train_memory.py {' '.join(sys.argv[1:])}")
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
    print(f"\ntrain --rep {args.rep} --runs {args.runs} --epochs {args.epochs} on {args.store}")
    print("| code | seconds | peak RssAnon (GiB) |")
    print("|---|---:|---:|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
