"""The `pipeline` command: parses options, builds a stage config, calls one function."""

from __future__ import annotations

import contextlib
import re
import shlex
import sys

import click

from pipeline.commands import quoted
from pipeline.errors import PipelineError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 512MiB or 2GiB")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " KMGT".index(unit.upper() or " "))


class _Group(click.Group):
    """Turns a PipelineError (or a click usage error) into one line on stderr and exit code 2, without a traceback; Ctrl-C into
    one line that says what stopped and the command that resumes it, and exit code 130 (128 + SIGINT)."""

    def invoke(self, ctx):
        args = [*ctx._protected_args, *ctx.args]  # the command line after `pipeline`, before click consumes it
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.UsageError as exc:  # click's "Usage: ... Try ... Error: ..." block, as one line
            message = " ".join(exc.format_message().split()).rstrip(".")
            click.echo(f"error: {message}; see `pipeline {args[0] if args else ''} --help`", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(f"error: {interrupted_message(args)}", err=True)
            sys.exit(130)


def interrupted_message(args: list[str]) -> str:
    """What Ctrl-C stopped, that finished work is kept, and the command (shell-quoted) that resumes it."""
    # --force would redo what was finished: the command that resumes is the same one without it
    command = shlex.join(["pipeline", *(a for a in args if a != "--force")])
    name = f"`pipeline {args[0]}`" if args else "the command"
    if args and args[0] == "synth":  # writes its dataset in one go: nothing to resume
        return f"interrupted: {name} stopped before it finished; rerun `{command}` to write the dataset again"
    return f"interrupted: {name} stopped; finished work is kept: rerun `{command}` to resume"


def _store_path(ctx, param, value):
    if value is not None and not value.strip():
        raise PipelineError("--store is empty; give a store path, or leave --store out for $PIPELINE_STORE or stores/default.zarr")
    return value


store_option = click.option("--store", default=None, callback=_store_path,
                            help="Store path (default: $PIPELINE_STORE or stores/default.zarr).")
dashboard_option = click.option("--dashboard", is_flag=True,
                                help="Serve the local dask cluster's dashboard, on 127.0.0.1 only (its address goes to stderr).")


@click.group(cls=_Group)
def main():
    """Precompute-then-train pipeline for weight-space learning on LoRA adapters."""


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Folder to write (save_to_disk format).")
@click.option("--n", default=1000, show_default=True, help="Number of adapters.")
@click.option("--rank", default=1, show_default=True)
@click.option("--modules", default="q,v", show_default=True, help="Projections: any of q,k,v,out.")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def synth(out, n, rank, modules, seed, quiet):
    """Write a synthetic LoRA dataset in the published lora-ws format."""
    from tqdm import tqdm

    from pipeline.synthetic import write_synthetic

    with tqdm(total=n, unit="adapter", desc="synth", disable=quiet, file=sys.stderr) as bar:
        path = write_synthetic(out, n, rank, tuple(m.strip() for m in modules.split(",") if m.strip()), seed, bar.update)
    if not quiet:
        click.echo(f"wrote {n} adapters to {path}")


@main.command()
@store_option
@click.option("--source", default=None, help="save_to_disk folder, parquet/arrow files or glob, safetensors folder, or hub id. "
                                             "Default: the built-in synthetic dataset.")
@click.option("--labels-csv", default=None, help="Labels file (CSV, JSON or JSONL) of a folder of .safetensors adapters (default: labels.csv, metadata.jsonl, ... in it).")
@click.option("--split-column", default=None, help="Labels column that gives each adapter's split (train, val, test).")
@click.option("--layers", default=None, help="Regex: keep only matching modules.")
@click.option("--label", "labels", multiple=True, help="Label column that must exist (repeatable).")
@click.option("--split-seed", default=42, show_default=True)
@click.option("--test-size", default=0.3, show_default=True)
@click.option("--val-test-size", default=0.67, show_default=True, help="Share of the held-out rows that go to test.")
@click.option("--memory", default="1GiB", show_default=True, help="Budget for weights held in memory at once.")
@click.option("--chunk-mb", default=4.0, show_default=True, help="Target chunk size of the widest layer.")
@click.option("--codec", type=click.Choice(["none", "lz4", "zstd"]), default="none", show_default=True,
              help="Compression of the raw weights (crc32c checksums always).")
@click.option("--allow-nonfinite", is_flag=True, help="Keep NaN/Inf weights instead of refusing them.")
@click.option("--min-split", type=int, default=None,
              help="Refuse a split of fewer adapters than this, or a class missing from a split (default: warn below 10).")
@click.option("--verify-source", is_flag=True,
              help="Fingerprint a folder of adapter files by their content (reads every file once more), not name, size and mtime.")
@click.option("--overwrite", is_flag=True, help="Replace a store made from a different source or layout (one of the same source and layout is resumed, not replaced: repair damage with `pipeline verify --repair`).")
@click.option("--quiet", is_flag=True)
@click.pass_context
def materialize(ctx, store, source, labels_csv, split_column, layers, labels, split_seed, test_size, val_test_size, memory, chunk_mb, codec,
                allow_nonfinite, min_split, verify_source, overwrite, quiet):
    """Read each layer once per split into one chunked Zarr store.

    On an existing store, the options it was made with are used for those not given here: so
    `pipeline materialize --store S` alone resumes, or repairs, S exactly as it was made.
    """
    from pipeline import progress
    from pipeline.materialize import materialize as run, resume_config
    from pipeline.store import default_store

    given = {name: value for name, value in ctx.params.items()
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE and name != "store"}
    if "memory" in given:
        try:
            given["memory"] = parse_size(memory)
        except click.BadParameter as exc:
            raise PipelineError(f"--memory {exc.message}") from None
    if "labels" in given:
        given["labels"] = tuple(labels)
    config = resume_config(store or default_store(), given)
    if config.source and config.source.startswith("zoo:"):  # build it here, with progress bars, if it is not built yet
        from pipeline.zoo import builtin_zoo

        with _zoo_progress(quiet) as bars:
            builtin_zoo(config.source, progress=bars)
    summary = run(config, progress=progress.factory("materialize", config.quiet),
                  on_wait=None if config.quiet else lambda holder: _say_waiting(f"store {config.store}", holder),
                  on_warning=None if config.quiet else lambda line: click.echo(f"warning: {line}", err=True))
    if not config.quiet:
        rate = summary.bytes_written / 1e6 / max(summary.seconds, 1e-9)
        click.echo(f"{summary.store}: {summary.modules_written} (split, module) groups written, {summary.modules_skipped} "
                   f"already complete; {summary.bytes_written / 1e6:.0f} MB in {summary.seconds:.1f} s ({rate:.0f} MB/s)")


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Folder to write (save_to_disk format, like synth's).")
@click.option("--n", default=500, show_default=True, help="Number of adapters.")
@click.option("--rank", default=1, show_default=True)
@click.option("--steps", default=200, show_default=True, help="Fine-tuning steps per adapter.")
@click.option("--lr", default=None, type=float, help="Fine-tuning learning rate (default: ZooConfig.lr, see docs/zoo.md).")
@click.option("--seed", default=0, show_default=True, help="Varies the adapters (labels, images, LoRA init, noise), not the base model.")
@click.option("--workers", type=int, default=None, help="Local dask worker processes (default: one per core; 0: in this process, no dask).")
@click.option("--scheduler", default=None, help="Address of a dask.distributed scheduler (or $DASK_SCHEDULER_ADDRESS).")
@click.option("--quiet", is_flag=True)
def zoo(out, n, rank, steps, lr, seed, workers, scheduler, quiet):
    """Build a LoRA dataset by really fine-tuning a miniature SD UNet on 8x8 digits (offline, resumable)."""
    import time

    from pipeline.zoo import ZooConfig, build_zoo

    config = ZooConfig(n=n, rank=rank, steps=steps, seed=seed, **({"lr": lr} if lr is not None else {}))
    started = time.perf_counter()
    with _zoo_progress(quiet) as bars:
        path = build_zoo(out, config, workers=workers, scheduler=scheduler, progress=bars)
    if not quiet:
        click.echo(f"wrote {n} trained adapters to {path} in {time.perf_counter() - started:.0f} s (settings and losses: {path}/zoo.json)")


@contextlib.contextmanager
def _zoo_progress(quiet: bool):
    """A ``progress(stage, total)`` for build_zoo: one tqdm bar per stage (base training, adapters), closed at the end."""
    from tqdm import tqdm

    bars = []

    def make(stage: str, total: int):
        unit = {"base": "step"}.get(stage, "adapter")
        bars.append(tqdm(total=total, unit=unit, desc=f"zoo {stage}", disable=quiet, file=sys.stderr, dynamic_ncols=True))
        return bars[-1].update

    try:
        yield make
    finally:
        for bar in bars:
            bar.close()


def _say_waiting(what: str, holder) -> None:
    click.echo(f"{what} is {holder.describe()}; waiting for it (Ctrl-C stops this command, nothing is lost)", err=True)


@main.command()
@store_option
@click.option("--rep", "reps", default="all", show_default=True, help="Representations: all, or a comma-separated list.")
@click.option("--split", "splits", default="all", show_default=True, help="Splits: all, or a comma-separated list.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=int, default=None, help="Run on a local dask cluster of N worker processes (0: in this process).")
@click.option("--scheduler", default=None, help="Address of a dask.distributed scheduler (or $DASK_SCHEDULER_ADDRESS).")
@click.option("--force", is_flag=True, help="Recompute even representations that are up to date.")
@click.option("--output", default=None, help="Write the features to this store of your own (for a read-only --store).")
@click.option("--list", "list_reps", is_flag=True, help="List the representations and exit.")
@dashboard_option
@click.option("--quiet", is_flag=True)
def features(store, reps, splits, device, workers, scheduler, force, output, list_reps, dashboard, quiet):
    """Compute representations of every layer into the store, in one pass over the raw chunks."""
    from pipeline import progress, representations
    from pipeline.features import FeaturesConfig, compute_features
    from pipeline.store import default_store

    if list_reps:
        click.echo(f"{'name':16} {'kind':7} {'width':>5}  {'version':>7}  invariance")
        for row in representations.describe_all():
            click.echo(f"{row['name']:16} {row['kind']:7} {row['width']:5}  {row['version']:7}  {row['invariance']}")
        return
    config = FeaturesConfig(store=store or default_store(), reps=reps, splits=splits, device=device, workers=workers,
                            scheduler=scheduler, force=force, quiet=quiet, output=output, dashboard=dashboard)
    summary = compute_features(config, progress=progress.factory("features", quiet, unit="chunk"),
                               on_wait=None if quiet else lambda split, rep, holder: _say_waiting(f"{rep} on {split}", holder))
    if not quiet:
        for split in sorted(set(summary.computed) | set(summary.up_to_date)):
            done = ", ".join(summary.computed.get(split, [])) or "-"
            fresh = ", ".join(summary.up_to_date.get(split, [])) or "-"
            click.echo(f"{split}: computed {done}; up to date {fresh}")
        click.echo(f"{summary.tasks} tasks in {summary.seconds:.1f} s")


@main.command()
@store_option
@click.option("--rep", "reps", default="all", show_default=True,
              help="all (every representation in the store), a,b (separate configurations) or a+b (concatenated).")
@click.option("--layers", default="all", show_default=True,
              help="Layer sets, comma-separated: all, visual (attn1), text (attn2) or a regex on layer/module names.")
@click.option("--label", default="category_label", show_default=True)
@click.option("--runs", default=10, show_default=True, help="Runs per configuration (seeds seed..seed+runs-1).")
@click.option("--seed", default=42, show_default=True)
@click.option("--model", type=click.Choice(["mlp", "linear"]), default="mlp", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--hidden", default=512, show_default=True)
@click.option("--depth", default=3, show_default=True, help="Hidden layers of the MLP.")
@click.option("--dropout", default=0.5, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--epochs", default=300, show_default=True)
@click.option("--patience", default=15, show_default=True, help="Stop after this many epochs without a better val score.")
@click.option("--plateau-patience", default=10, show_default=True)
@click.option("--plateau-factor", default=0.5, show_default=True)
@click.option("--force", is_flag=True, help="Retrain runs that are already finished.")
@click.option("--output", default=None, help="Write the runs to this store of your own (for a read-only --store).")
@click.option("--workers", type=int, default=None,
              help="Train configurations in parallel on a local dask cluster of N processes (0: in this process).")
@click.option("--scheduler", default=None, help="Address of a dask.distributed scheduler (or $DASK_SCHEDULER_ADDRESS).")
@dashboard_option
@click.option("--quiet", is_flag=True)
def train(store, reps, layers, label, runs, seed, model, device, hidden, depth, dropout, lr, weight_decay, batch_size, epochs,
          patience, plateau_patience, plateau_factor, force, output, workers, scheduler, dashboard, quiet):
    """Train classifiers (or regressors) on stored features, all runs of a configuration at once."""
    from pipeline.store import default_store
    from pipeline.train import TrainConfig, train as run

    config = TrainConfig(store=store or default_store(), reps=reps, layers=layers, label=label, runs=runs, seed=seed,
                         model=model, device=device, hidden=hidden, depth=depth, dropout=dropout, lr=lr,
                         weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, patience=patience,
                         plateau_patience=plateau_patience, plateau_factor=plateau_factor, force=force, quiet=quiet,
                         workers=workers, scheduler=scheduler, output=output, dashboard=dashboard)

    def echo(result):
        if not quiet:
            done = f"{len(result.trained)} runs trained in {result.seconds:.1f} s" if result.trained else "up to date"
            skipped = f", {len(result.skipped)} finished before" if result.trained and result.skipped else ""
            click.echo(f"{result.setup.name:40} {result.config_hash}  width {result.width:6}  {done}{skipped}  "
                       f"test {result.score} {result.test_score:.3f}")

    summary = run(config, on_result=echo, on_wait=None if quiet else _say_waiting)
    if not quiet:
        click.echo(f"{len(summary.results)} configurations: {summary.trained} runs trained, {summary.skipped} skipped, "
                   f"{summary.seconds:.1f} s")


@main.command()
@store_option
@click.option("--out", default=None, type=click.Path(), help="Folder to write (default: <store>.report beside the store).")
def report(store, out):
    """Tables and plots of the stored runs: results.md, results.csv, PNG figures."""
    from pipeline.report import write_report
    from pipeline.store import default_store

    summary = write_report(store or default_store(), out)
    click.echo(summary.table)
    click.echo(f"wrote {len(summary.files)} files to {summary.out}")


@main.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
def info(store, as_json):
    """Show what a store holds: splits, layers, labels, representations, trained configurations, size."""
    import json

    from pipeline.info import describe, summary
    from pipeline.store import default_store

    path = store or default_store()
    click.echo(json.dumps(summary(path), indent=1) if as_json else describe(path))


@main.command()
@store_option
@click.option("--repair", is_flag=True, help="Mark the damaged pieces for recomputation and print the commands that redo them.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(store, repair, quiet):
    """Read every chunk, check every checksum and completion mark; name each damaged piece and its repair."""
    from pipeline import progress
    from pipeline.store import default_store
    from pipeline.verify import repair as mark_for_repair, verify as check

    path = store or default_store()
    report = check(path, progress=progress.factory("verify", quiet, unit="chunk"), repair=repair)
    for problem in report.problems:
        click.echo(problem.line())
    for note in report.notes:
        click.echo(note)
    checked = f"{report.arrays} arrays, {report.chunks} chunks, {report.bytes / 1e6:.0f} MB read"
    if not report.problems:
        click.echo(f"{path}: every checksum and completion mark agrees ({checked})")
        return
    click.echo(f"{path}: {len(report.problems)} problem(s) ({checked})")
    if repair:
        commands = mark_for_repair(path, report.problems)
        click.echo("marked the damaged pieces for recomputation; now run, in this order:")
        for command in commands:
            click.echo(f"  {command}")
    else:
        click.echo(f"run {quoted('verify', path, '--repair')}, then the repair commands above")
    sys.exit(1)


if __name__ == "__main__":
    main()
