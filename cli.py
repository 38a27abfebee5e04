"""The `pipeline` command: parses options, builds a stage config, calls one function."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import re
import shlex
import sys
from collections.abc import Callable

import click

from pipeline._version import __version__
from pipeline.commands import quoted
from pipeline.errors import PipelineError
from pipeline import models
from pipeline.hyper import Hyper

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 512MiB or 2GiB")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " KMGT".index(unit.upper() or " "))


# --- options whose defaults live in the stage configs, and old spellings ------------------------------

TRAIN, FEATURES, MATERIALIZE = "pipeline.train:TrainConfig", "pipeline.features:FeaturesConfig", "pipeline.materialize:MaterializeConfig"
ZOO, BUILD_ZOO, SYNTH = "pipeline.zoo:ZooConfig", "pipeline.zoo:build_zoo", "pipeline.synthetic:write_synthetic"


def config_default(where: str, name: str):
    """The default of field ``name`` of the dataclass ``module:Name`` (or of parameter ``name`` of that function)."""
    module, _, attr = where.partition(":")
    target = getattr(importlib.import_module(module), attr)
    if dataclasses.is_dataclass(target):
        return next(f.default for f in dataclasses.fields(target) if f.name == name)
    return inspect.signature(target).parameters[name].default


class _Default(click.Option):
    """An option whose default is that of the stage config's field of the same name (``field`` if the names
    differ; ``to_cli`` spells it as the option does), read when it is needed: the defaults live only in the
    configs, and neither ``pipeline --help`` nor ``pipeline info`` imports torch to show them."""

    def __init__(self, *decls, config: str | Callable, field: str | None = None, to_cli: Callable | None = None, **kwargs):
        super().__init__(*decls, show_default=True, **kwargs)
        self.config, self.field, self.to_cli = config, field, to_cli

    def get_default(self, ctx, call=True):
        value = self.config() if callable(self.config) else config_default(self.config, self.field or self.name)
        return value if self.to_cli is None or value is None else self.to_cli(value)


def option(*decls, config: str | Callable, **kwargs):
    return click.option(*decls, cls=_Default, config=config, **kwargs)


class _OldSpelling(click.Option):
    """The hidden old spelling of a renamed option: what it is given goes to the new one (``_Command``)."""

    def __init__(self, decls, *, new: str, target: str, **kwargs):
        super().__init__(decls, hidden=True, default=None, help=f"Old spelling of {new}.", **kwargs)
        self.new, self.target = new, target


def old_spelling(old: str, new: str, target: str, **kwargs):
    """``old`` keeps working as ``new`` (parameter ``target``) for the scripts that use it, and is not listed in --help."""
    return click.option(old, f"old_{target}", cls=_OldSpelling, new=new, target=target, **kwargs)


class _Command(click.Command):
    """A command whose old spellings set the parameters of the options that replaced them, as if given by those."""

    def parse_args(self, ctx, args):
        rest = super().parse_args(ctx, args)
        given = click.core.ParameterSource.COMMANDLINE
        for param in self.params:
            if not isinstance(param, _OldSpelling):
                continue
            value = ctx.params.pop(param.name)
            if ctx.get_parameter_source(param.name) is given:
                if ctx.get_parameter_source(param.target) is given:
                    raise click.UsageError(f"{param.opts[0]} is the old spelling of {param.new}: give only {param.new}", ctx)
                ctx.params[param.target] = value
                ctx.set_parameter_source(param.target, given)
        return rest


class _Group(click.Group):
    """Turns a PipelineError (or a click usage error) into one line on stderr and exit code 2, without a traceback; Ctrl-C into
    one line that says what stopped and the command that resumes it, and exit code 130 (128 + SIGINT)."""

    command_class = _Command

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


def hyper_options(command):
    """One option per hyper-parameter (pipeline/hyper.py), in Hyper's order, with its help and its default: Hyper's,
    and each model's own where it has one (models.Model.preset). Not given, it is None: TrainConfig fills in the
    default of the model chosen."""
    for f in reversed(dataclasses.fields(Hyper)):
        own = [f"{m.name}: {m.preset[f.name]}" for m in models.REGISTRY.values() if f.name in m.preset]
        shown = "; ".join([str(f.default), *own])
        command = click.option(f"--{f.name.replace('_', '-')}", f.name, type=type(f.default), default=None,
                               help=f"{f.metadata['help']}  [default: {shown}]")(command)
    return command


def _raw_memory(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except click.BadParameter as exc:
        raise PipelineError(f"--raw-memory {exc.message}") from None


def _size_text(n: int) -> str:
    """Bytes as the largest whole unit ``parse_size`` reads back: 1073741824 -> 1GiB."""
    unit = next(u for u in "TGMK " if u == " " or n % 1024 ** " KMGT".index(u) == 0)
    return f"{n // 1024 ** ' KMGT'.index(unit)}{unit.strip()}{'iB' if unit.strip() else 'B'}"


def _split_share(which: int) -> Callable:
    """The default share of all rows of val (0) or test (1): MaterializeConfig's split in those terms."""
    def default():
        from pipeline.splits import shares_of_all

        return shares_of_all(config_default(MATERIALIZE, "test_size"), config_default(MATERIALIZE, "val_test_size"))[which]
    return default


store_option = click.option("--store", default=None, callback=_store_path,
                            help="Store path or URL (default: $PIPELINE_STORE or stores/default.zarr).")
dashboard_option = click.option("--dashboard", is_flag=True,
                                help="Serve the local dask cluster's dashboard, on 127.0.0.1 only (its address goes to stderr).")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars and no summary; errors still go to stderr.")
scheduler_help = "Address of a dask.distributed scheduler (or $DASK_SCHEDULER_ADDRESS)."


def personal_store_option(config: str, what: str):
    """``--personal-store`` (parameter ``output``), and ``--output``, its old spelling."""
    def decorate(command):
        command = old_spelling("--output", "--personal-store", "output")(command)
        return option("--personal-store", "output", config=config,
                      help=f"Write the {what} to this store of your own, which builds on --store (for a read-only --store).")(command)
    return decorate


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="pipeline", message="%(prog)s %(version)s",
                      help="Show the version and exit.")
def main():
    """Precompute-then-train pipeline for weight-space learning on LoRA adapters."""


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Folder to write (save_to_disk format); must not exist.")
@option("--n", type=int, config=SYNTH, help="Number of adapters.")
@option("--rank", type=int, config=SYNTH, help="LoRA rank of every adapter.")
@option("--modules", config=SYNTH, field="projections", to_cli=",".join,
        help="Attention projections that get an adapter: any of q,k,v,out.")
@option("--seed", type=int, config=SYNTH, help="Seed of the weights and labels.")
@quiet_option
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
@option("--source", config=MATERIALIZE, help="save_to_disk folder, parquet/arrow files or glob, a folder of adapter files (any layout: docs/materialize.md), zoo:digits "
                                            "or hub id (default: the built-in synthetic dataset).")
@option("--labels-csv", config=MATERIALIZE,
        help="Labels file (CSV, JSON or JSONL) of a folder of .safetensors adapters (default: labels.csv, metadata.jsonl, ... in it).")
@option("--split-column", config=MATERIALIZE, help="Labels column that gives each adapter's split (train, val, test).")
@option("--modules", "layers", config=MATERIALIZE,
        help="Regex: keep only the LoRA modules whose name (or a column name) it matches (default: every module).")
@old_spelling("--layers", "--modules", "layers")
@click.option("--label", "labels", multiple=True,
              help="A label column the source must have, else nothing is written (repeatable; every scalar column is kept anyway).")
@option("--split-seed", type=int, config=MATERIALIZE,
        help="Seed of the train/val/test split of a source with one split (a source's own splits are kept as they are).")
@option("--val-size", type=float, config=_split_share(0),
        help="Share of all rows that go to val, for a source with one split (the default is the original experiment's).")
@option("--test-size", type=float, config=_split_share(1),
        help="Share of all rows that go to test, for a source with one split; train gets the rest.")
@click.option("--val-test-size", type=float, hidden=True, default=None,
              help="Old spelling: the share of the held-out rows that go to test; with it --test-size is the share "
                   "of all rows held out of train (val + test), as it was before --val-size.")
@option("--memory", config=MATERIALIZE, to_cli=_size_text, help="Budget for weights held in memory at once, like 512MiB or 2GiB.")
@option("--chunk-mb", type=float, config=MATERIALIZE, help="Target chunk size of the widest layer, in MB.")
@option("--codec", type=click.Choice(["none", "lz4", "zstd"]), config=MATERIALIZE,
        help="Compression of the raw weights (crc32c checksums always).")
@click.option("--allow-nonfinite", is_flag=True, help="Keep NaN/Inf weights instead of refusing them.")
@click.option("--min-split", type=int, default=None,
              help="Refuse a split of fewer adapters than this, or a class missing from a split (default: warn below 10).")
@click.option("--verify-source", is_flag=True,
              help="Fingerprint a folder of adapter files by their content (reads every file once more), not name, size and mtime.")
@click.option("--overwrite", is_flag=True, help="Replace a store made from a different source or layout (one of the same source and layout is resumed, not replaced: repair damage with `pipeline verify --repair`).")
@quiet_option
@click.pass_context
def materialize(ctx, store, **options):  # noqa: ARG001 - options: read from ctx.params, with where each came from
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
            given["memory"] = parse_size(given["memory"])
        except click.BadParameter as exc:
            raise PipelineError(f"--memory {exc.message}") from None
    if "labels" in given:
        given["labels"] = tuple(given["labels"])
    config = resume_config(store or default_store(), given)
    if config.source and config.source.startswith("zoo:"):  # build it here, with progress bars, if it is not built yet
        from pipeline.zoo import builtin_zoo

        with _zoo_progress(config.quiet) as bars:
            builtin_zoo(config.source, progress=bars)
    if config.source is None:  # the built-in dataset: generated here on first use, and said so
        from pipeline.synthetic import builtin_dataset

        builtin_dataset(on_generate=None if config.quiet else
                        lambda path, n: click.echo(f"generating the built-in dataset ({n} synthetic adapters) in {path}"))
    summary = run(config, progress=progress.factory("materialize", config.quiet),
                  on_wait=None if config.quiet else lambda holder: _say_waiting(f"store {config.store}", holder),
                  on_warning=None if config.quiet else lambda line: click.echo(f"warning: {line}", err=True))
    if not config.quiet:
        rate = summary.bytes_written / 1e6 / max(summary.seconds, 1e-9)
        click.echo(f"{summary.store}: {summary.modules_written} (split, module) groups written, {summary.modules_skipped} "
                   f"already complete; {summary.bytes_written / 1e6:.0f} MB in {summary.seconds:.1f} s ({rate:.0f} MB/s)")


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Folder to write (save_to_disk format, like synth's).")
@option("--n", type=int, config=ZOO, help="Number of adapters.")
@option("--rank", type=int, config=ZOO, help="LoRA rank of every adapter.")
@option("--steps", type=int, config=ZOO, help="Fine-tuning steps per adapter.")
@option("--lr", type=float, config=ZOO, help="Fine-tuning learning rate (see docs/zoo.md).")
@option("--seed", type=int, config=ZOO, help="Varies the adapters (labels, images, LoRA init, noise), not the base model.")
@option("--workers", type=int, config=BUILD_ZOO,
        help="Local dask worker processes (default: one per core; 0: in this process, no dask).")
@option("--scheduler", config=BUILD_ZOO, help=scheduler_help)
@quiet_option
def zoo(out, n, rank, steps, lr, seed, workers, scheduler, quiet):
    """Build a LoRA dataset by really fine-tuning a miniature SD UNet on 8x8 digits (offline, resumable)."""
    import time

    from pipeline.zoo import ZooConfig, build_zoo

    config = ZooConfig(n=n, rank=rank, steps=steps, lr=lr, seed=seed)
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
@option("--rep", "reps", config=FEATURES, help="Representations: all, or a comma-separated list (see --list).")
@option("--split", "splits", config=FEATURES, help="Splits: all, or a comma-separated list.")
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), config=FEATURES,
        help="Where to compute: auto is cuda when the worker running a task has a GPU (each worker decides).")
@option("--workers", type=int, config=FEATURES,
        help="Run on a local dask cluster of N worker processes (0: in this process).")
@option("--scheduler", config=FEATURES, help=scheduler_help)
@click.option("--force", is_flag=True, help="Recompute even representations that are up to date.")
@personal_store_option(FEATURES, "features")
@click.option("--list", "list_reps", is_flag=True, help="List the representations and exit.")
@dashboard_option
@quiet_option
def features(store, list_reps, **options):
    """Compute representations of every layer into the store, in one pass over the raw chunks."""
    from pipeline import progress, representations
    from pipeline.features import FeaturesConfig, compute_features
    from pipeline.store import default_store

    if list_reps:
        click.echo(f"{'name':16} {'kind':7} {'width':>5}  {'version':>7}  invariance")
        for row in representations.describe_all():
            click.echo(f"{row['name']:16} {row['kind']:7} {row['width']:5}  {row['version']:7}  {row['invariance']}")
        return
    config = FeaturesConfig(store=store or default_store(), **options)
    quiet = config.quiet
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
@option("--rep", "reps", config=TRAIN,
        help="all (every representation in the store), a,b (separate configurations) or a+b (concatenated).")
@option("--layers", config=TRAIN,
        help="Layer sets, comma-separated: all, visual (attn1), text (attn2) or a regex on layer/module names.")
@option("--label", config=TRAIN,
        help="Label to train on: a classifier on a categorical, integer or bool label, a regressor on a float one "
             "(default: category_label, else the store's only classification label).")
@option("--runs", type=int, config=TRAIN, help="Runs per configuration (seeds seed..seed+runs-1).")
@option("--seed", type=int, config=TRAIN, help="Seed of the first run; run r uses seed + r.")
@option("--model", type=click.Choice(models.names()), config=TRAIN,
        help="; ".join(f"{m.name}: {m.summary}" for m in models.REGISTRY.values()) + ".")
@option("--task", type=click.Choice(["auto", "classification", "regression"]), config=TRAIN,
        help="auto: a float label is regressed, any other classified; regression also regresses an integer label "
             "(R², MAE, RMSE, MAPE), classification also treats its values as classes.")
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), config=TRAIN,
        help="Where to train: auto is cuda when the worker running a configuration has a GPU (each worker decides).")
@hyper_options
@click.option("--raw-memory", default=None, callback=_raw_memory,
              help="Raw factors kept on the device for the models that learn from them, like 512MiB; a split that does "
                   "not fit is streamed from the store by chunk [default: half the free GPU memory, a quarter of the RAM].")
@click.option("--force", is_flag=True, help="Retrain runs that are already finished.")
@personal_store_option(TRAIN, "runs")
@option("--workers", type=int, config=TRAIN,
        help="Train configurations in parallel on a local dask cluster of N processes (0: in this process).")
@option("--scheduler", config=TRAIN, help=scheduler_help)
@dashboard_option
@click.option("--dry-run", is_flag=True, help="Print the grid it would train, with each configuration's runs to train and "
              "estimated cost (from the store's sizes and the timings of runs already stored); train and write nothing.")
@quiet_option
def train(store, **options):
    """Train classifiers (or regressors) on stored features, all runs of a configuration at once."""
    from pipeline import progress
    from pipeline.store import default_store
    from pipeline.train import TrainConfig, train as run

    config = TrainConfig(store=store or default_store(), **options)
    quiet = config.quiet
    if config.dry_run:
        _print_plan(config)
        return

    def echo(result):
        if not quiet:
            done = f"{len(result.trained)} runs trained in {result.seconds:.1f} s" if result.trained else "up to date"
            skipped = f", {len(result.skipped)} finished before" if result.trained and result.skipped else ""
            click.echo(f"{result.setup.name:40} {result.config_hash}  width {result.width:6}  {done}{skipped}  "
                       f"test {result.score} {result.test_score:.3f}")

    summary = run(config, on_result=echo, on_wait=None if quiet else _say_waiting,
                  progress=progress.factory("train", quiet, unit="config"))
    if not quiet:
        click.echo(f"{len(summary.results)} configurations: {summary.trained} runs trained, {summary.skipped} skipped, "
                   f"{summary.seconds:.1f} s")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _print_plan(config) -> None:
    """train --dry-run: the grid, what each configuration would train, and what it would cost."""
    from pipeline.train_plan import plan

    p = plan(config)
    n = ", ".join(f"{split} {rows}" for split, rows in p.n.items())
    click.echo(f"dry run: {len(p.configurations)} configurations x {config.runs} runs on {config.store} ({n} rows); "
               "nothing is trained or written")
    for c in p.configurations:
        cost = f"{c.flops / 1e9:8.1f} GFLOP" + (f"  ~{_duration(c.seconds)}" if c.seconds is not None else "")
        todo = f"{c.todo} runs to train" + (f", {c.finished} finished" if c.finished else "")
        click.echo(f"  {c.setup.name:40} {c.config_hash}  width {c.width:6}  {todo:28} {cost}")
    total = sum(c.flops for c in p.configurations) / 1e9
    if p.seconds_per_gflop is None:
        when = "time unknown: no run is stored yet to time this machine by (after one configuration, --dry-run estimates it)"
    else:
        runs = f"{p.timed_runs} stored {p.timed_by} runs" if p.timed_by else f"{p.timed_runs} stored runs (of every model)"
        when = (f"about {_duration(p.seconds)} at the {runs}' median {1 / p.seconds_per_gflop:.2f} GFLOP/s "
                "(epochs as they stopped early)")
    click.echo(f"total: {p.todo} runs, {total:.1f} GFLOP, {when}")


@main.command()
@store_option
@click.option("--out", default=None, type=click.Path(), help="Folder to write the report to (default: <store>.report beside the store).")
@click.option("--where", default=None, metavar="FIELD=VALUE,...",
              help="Only the configurations that match every condition, e.g. lr=1e-3,model=mlp or rep=dw_norms|spectral; "
                   "fields: rep, layer_set, label, model, task, variant, author, config (a hash prefix), seed and every "
                   "hyper-parameter. The confusion matrix is drawn for the best configuration it selects.")
@click.option("--confusion", type=click.Choice(["counts", "rates"]), default="counts", show_default=True,
              help="What the confusion matrix's cells show: counts summed over runs, or row rates.")
@click.option("--figure-width", "width", type=click.Choice(["auto", "column", "page"]), default="auto", show_default=True,
              help="Figures one paper column (3.4 in) or one page (7 in) wide; auto: a column when they fit.")
@quiet_option
def report(store, out, where, confusion, width, quiet):
    """Tables (Markdown, CSV, LaTeX) and figures (PNG, PDF) of the stored runs, for a paper."""
    from pipeline.report import write_report
    from pipeline.store import default_store

    summary = write_report(store or default_store(), out, where=where, confusion=confusion, width=width)
    if not quiet:
        click.echo(summary.table)
        for warning in summary.warnings:
            click.echo(f"warning: {warning}", err=True)
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
