"""Benchmark, run by hand: the original training loop vs `pipeline train`, on the same stored features; or
(--models) the registered models against the MLP.

    python bench/train.py [--n 2000] [--reps <the nine>] [--runs 10] [--epochs 300] [--device auto]
    python bench/train.py --models [--n 5000] [--reps <the nine>] [--runs 10] [--epochs 300] [--raw-epochs 300]
                          [--part both|runs|grids] [--device auto]

On the --n adapter synthetic store (built under stores/bench/ with the requested representations if
missing), for each representation, with every layer and the original hyper-parameters:
 (a) the original loop: nn.Sequential MLP, a shuffled torch DataLoader, torch.optim.Adam,
     ReduceLROnPlateau, sklearn metrics on the validation set every epoch, one run after another;
 (b) `pipeline train` (Python API, --force): all runs at once as a batched ensemble, runs written
     to the store.
Both start from the same standardised features; (a) is timed from its first run to its last, (b)
including reading the features and writing the runs. (a) reports the test accuracy of the last epoch
(what the original reported, by mistake) and of the best-validation weights; (b) reports the latter.

``original_run`` is the loop as the original ran it, costs included (sklearn metrics every epoch); the
tests' oracle, tests/reference.py, is the same loop without them.

--models (default --n 5000), all in this one process, each `pipeline train` call with --force: (1) one run of
every registered model, every layer, on `ensemble` features (a model that reads the raw factors: on them),
timed by `train` (its fit) and around it (with reading the data and writing the run), with the epochs it
trained and its fit's seconds per epoch; the models that learn from the raw factors (glnet, probe) train at
most --raw-epochs epochs (on SD-shaped adapters an epoch of theirs takes minutes on a CPU: time a few and read
the seconds per epoch); (2) the whole grid, every --reps representation x all/visual/text x --runs runs, of
the MLP, of the linear probe, and knn-vote's (the raw factors x all/visual/text), and the share of the MLP
grid's time the two take (target: under 5%). --part runs or grids: only (1) or (2).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import models as models_mod  # noqa: E402
from pipeline import store as store_mod  # noqa: E402
from pipeline.model import Hyper  # noqa: E402
from pipeline.train import Setup, TrainConfig, load_data, train  # noqa: E402

ORIGINAL_REPS = ("simple_stats", "rank_based", "stats", "spectral", "matrix_norms", "distribution", "frequency",
                 "info_theoretic", "ensemble")
LAYER_SETS = "all,visual,text"


def original_run(x_train, y_train, x_val, y_val, x_test, y_test, seed: int, hp: Hyper, n_classes: int, device="cpu"):
    """One run of the original loop (classification). Returns curves, best epoch and test accuracies.

    The only departures: a one-row last batch is skipped (BatchNorm would raise), and the best
    weights are deep-copied as well as referenced, so both the original's last-epoch result and the
    intended best-weights result are reported.
    """
    from sklearn.metrics import accuracy_score, f1_score

    torch.manual_seed(seed)
    np.random.seed(seed)
    layers, width = [], x_train.shape[1]
    for _ in range(hp.depth):
        layers += [nn.Linear(width, hp.hidden), nn.BatchNorm1d(hp.hidden), nn.ReLU(), nn.Dropout(hp.dropout)]
        width = hp.hidden
    model = nn.Sequential(*layers, nn.Linear(width, n_classes)).to(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=hp.batch_size,
                                         shuffle=True)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=hp.plateau_factor,
                                                           patience=hp.plateau_patience)
    curves = {"train_loss": [], "train_score": [], "val_score": [], "lr": []}
    best, best_epoch, bad, best_copy = -np.inf, 0, 0, None
    for epoch in range(1, hp.epochs + 1):
        model.train()
        total, correct, seen = 0.0, 0, 0
        lr = optimizer.param_groups[0]["lr"]
        for xb, yb in loader:
            if len(yb) < 2:
                continue
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            out = model(xb)
            loss = criterion(out, yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
        model.eval()
        with torch.no_grad():
            val_pred = model(x_val.to(device)).argmax(1).cpu().numpy()
        val_acc = accuracy_score(y_val.numpy(), val_pred)
        f1_score(y_val.numpy(), val_pred, average="macro", zero_division=0)  # the original's per-epoch sklearn cost
        scheduler.step(val_acc)
        for name, value in zip(curves, (total / seen, correct / seen, val_acc, lr)):
            curves[name].append(value)
        if val_acc > best:
            best, best_epoch, bad = val_acc, epoch, 0
            best_copy = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= hp.patience:
                break

    def test_acc():
        model.eval()
        with torch.no_grad():
            return accuracy_score(y_test.numpy(), model(x_test.to(device)).argmax(1).cpu().numpy())

    last = test_acc()  # the original's state_dict() reference: the last epoch's weights
    model.load_state_dict(best_copy)
    return {"curves": curves, "best_epoch": best_epoch, "test_last": last, "test_best": test_acc()}


def ensure_store(n: int, reps: tuple[str, ...], home: Path) -> str:
    from pipeline.features import FeaturesConfig, compute_features
    from pipeline.materialize import MaterializeConfig, materialize
    from _data import synthetic_source
    from pipeline.synthetic import SYNTH_VERSION

    home.mkdir(parents=True, exist_ok=True)
    source = synthetic_source(home, n)
    path = home / f"train-v{SYNTH_VERSION}-n{n}.zarr"
    if not store_mod.is_ours(path):
        print(f"materializing {path}", flush=True)
    materialize(MaterializeConfig(store=str(path), source=str(source), quiet=True))  # skips what is complete
    started = time.perf_counter()
    summary = compute_features(FeaturesConfig(store=str(path), reps=",".join(reps), quiet=True))
    if summary.tasks:
        print(f"computed features {', '.join(reps)} in {time.perf_counter() - started:.1f} s", flush=True)
    return str(path)


def original_seconds_per_run(path: str | Path, reps, device: str = "cpu", seed: int = 42) -> dict[str, float]:
    """Seconds of one original training run (seed ``seed``) per representation, every layer, on a store."""
    config = TrainConfig(store=str(path), device=device, quiet=True)
    hp, root = config.hyper(), store_mod.open_root(str(path))
    seconds = {}
    for rep in reps:
        data = load_data(root, str(path), Setup((rep,), "all"), config.label)
        tensors = [torch.from_numpy(data.x[s]) for s in ("train", "val", "test")]
        labels = [torch.from_numpy(data.y[s]) for s in ("train", "val", "test")]
        started = time.perf_counter()
        original_run(tensors[0], labels[0], tensors[1], labels[1], tensors[2], labels[2], seed, hp, len(data.classes),
                     device)
        seconds[rep] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="adapters (default 2000; with --models 5000)")
    parser.add_argument("--reps", default=",".join(ORIGINAL_REPS))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--raw-epochs", type=int, default=300, help="--models: most epochs of glnet's and probe's run")
    parser.add_argument("--part", choices=["both", "runs", "grids"], default="both",
                        help="--models: (1) one run of each model, (2) the grids, or both")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--home", default=str(ROOT / "stores" / "bench"))
    parser.add_argument("--models", action="store_true", help="the registered models against the MLP (above)")
    args = parser.parse_args()
    import sklearn.metrics  # noqa: F401  (imported before timing: its import takes seconds)

    reps = tuple(r.strip() for r in args.reps.split(",") if r.strip())
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    n = args.n or (5000 if args.models else 2000)
    if args.models:
        models_benchmark(ensure_store(n, tuple(dict.fromkeys((*reps, "ensemble"))), Path(args.home)), reps, args, device, n)
        return
    path = ensure_store(n, reps, Path(args.home))
    config = TrainConfig(store=path, runs=args.runs, epochs=args.epochs, device=device, force=True, quiet=True)
    hp = config.hyper()
    root = store_mod.open_root(path)
    print(f"device {device}, torch threads {torch.get_num_threads()}, n {n}, {args.runs} runs, <= {args.epochs} epochs")
    rows = []
    for rep in reps:
        data = load_data(root, path, Setup((rep,), "all"), config.label)
        tensors = [torch.from_numpy(data.x[s]) for s in ("train", "val", "test")]
        labels = [torch.from_numpy(data.y[s]) for s in ("train", "val", "test")]
        started = time.perf_counter()
        originals = [original_run(tensors[0], labels[0], tensors[1], labels[1], tensors[2], labels[2], config.seed + r, hp,
                                  len(data.classes), device) for r in range(args.runs)]
        seconds_a = time.perf_counter() - started
        started = time.perf_counter()
        summary = train(TrainConfig(**{**config.__dict__, "reps": rep}))
        seconds_b = time.perf_counter() - started
        result = summary.results[0]
        runs = store_mod.runs_of(store_mod.open_root(path)[store_mod.run_path(result.config_hash)])
        accs_b = [runs[r].attrs["metrics"]["test"]["accuracy"] for r in range(args.runs)]
        rows.append((rep, data.width, seconds_a, seconds_b, [o["test_last"] for o in originals],
                     [o["test_best"] for o in originals], accs_b))
        print(f"{rep:15} a {seconds_a:8.1f} s   b {seconds_b:8.1f} s   a/b {seconds_a / seconds_b:6.1f}", flush=True)
    _print_table(rows)


def _timed_train(config: TrainConfig) -> tuple[float, float, list]:
    """(wall seconds of ``train``, seconds its fits took, its results)."""
    started = time.perf_counter()
    summary = train(config)
    return time.perf_counter() - started, sum(r.seconds for r in summary.results), summary.results


def models_benchmark(path: str, reps: tuple[str, ...], args, device: str, n: int) -> None:
    """--models: one run of each registered model on `ensemble` (or the raw factors), then the grids."""
    base = TrainConfig(store=path, epochs=args.epochs, device=device, force=True, quiet=True)
    if device == "cuda":  # the context and the kernels' first load are no model's cost
        torch.ones(1, device=device).sum().item()
    print(f"device {device}, torch threads {torch.get_num_threads()}, n {n}; one process, every train call --force")
    print()
    if args.part != "grids":
        _one_run_each(path, base, args)
    if args.part != "runs":
        _grids(base, reps, args)


def _one_run_each(path: str, base: TrainConfig, args) -> None:
    print("| model | input | width | train (s) | its fit (s) | x MLP (fit) | epochs | fit s/epoch | test score |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    mlp_fit = None
    for name, model in models_mod.REGISTRY.items():
        rep = models_mod.RAW if model.inputs == "raw" else "ensemble"
        if "classification" not in model.tasks:
            continue  # the bench store's label is a classification label
        epochs = args.raw_epochs if model.inputs == "raw" and "epochs" in model.options() else args.epochs
        wall, fit, (result,) = _timed_train(replace(base, model=name, reps=rep, layers="all", runs=1, epochs=epochs))
        trained = store_mod.runs_of(store_mod.open_root(path)[store_mod.run_path(result.config_hash)])[0].attrs["epochs"]
        mlp_fit = fit if name == "mlp" else mlp_fit
        ratio = f"{fit / mlp_fit:.3f}" if mlp_fit else ""
        per_epoch = f"{fit / trained:.2f}" if "epochs" in model.options() else "(one fit)"
        print(f"| {name} | {rep} | {result.width} | {wall:.2f} | {fit:.2f} | {ratio} | {trained} | {per_epoch} | "
              f"{result.test_score:.3f} |", flush=True)
    print()


def _grids(base: TrainConfig, reps: tuple[str, ...], args) -> None:
    grids = {"mlp": ",".join(reps), "linear": ",".join(reps), "knn-vote": models_mod.RAW}
    print(f"whole grids: {len(reps)} representations (knn-vote: the raw factors) x {LAYER_SETS} x {args.runs} runs")
    print()
    print("| model | configurations | train (s) | its fits (s) | share of the MLP grid (train) | (fits) |")
    print("|---|---:|---:|---:|---:|---:|")
    times = {}
    for name, grid_reps in grids.items():
        wall, fit, results = _timed_train(replace(base, model=name, reps=grid_reps, layers=LAYER_SETS, runs=args.runs))
        times[name] = (wall, fit)
        mlp_wall, mlp_fit = times["mlp"]
        print(f"| {name} | {len(results)} | {wall:.1f} | {fit:.1f} | {wall / mlp_wall:.2%} | {fit / mlp_fit:.2%} |", flush=True)
    both = [times["linear"][k] + times["knn-vote"][k] for k in (0, 1)]
    print(f"| linear + knn-vote | | {both[0]:.1f} | {both[1]:.1f} | {both[0] / times['mlp'][0]:.2%} | "
          f"{both[1] / times['mlp'][1]:.2%} |")
    print(f"\ntarget: linear + knn-vote under 5% of the MLP grid's time: "
          f"{'met' if both[0] < 0.05 * times['mlp'][0] else 'NOT met'} (train wall time)")


def _print_table(rows) -> None:
    def pm(values):
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"

    print()
    print(f"| {'representation':15} | width | a: original (s) | b: pipeline (s) | a/b | a: test acc, last epoch | "
          f"a: test acc, best val | b: test acc, best val |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    for rep, width, sa, sb, last, best, accs_b in rows:
        print(f"| {rep:15} | {width} | {sa:.1f} | {sb:.1f} | {sa / sb:.1f} | {pm(last)} | {pm(best)} | {pm(accs_b)} |")
    total_a, total_b = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"| whole grid | | {total_a:.1f} | {total_b:.1f} | {total_a / total_b:.1f} | | | |")


if __name__ == "__main__":
    main()
