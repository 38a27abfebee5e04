"""The command line's vocabulary: help on every option, -h and --version, defaults read from the stage
configs, old spellings that keep working, train's default label, and a dataset given as --store."""

from __future__ import annotations

import dataclasses
import shlex
from types import SimpleNamespace

import click
import datasets
import numpy as np
import pytest
import zarr

from cli import main
from conftest import SMALL_LAYERS, assert_one_line_error, file_snapshot, lora_rows, materialize_to, run_cli, save_matrix_dataset
from pipeline import __version__, models
from pipeline.commands import materialize_args, train_command
from pipeline.errors import PipelineError
from pipeline.features import FeaturesConfig
from pipeline.hyper import Hyper
from pipeline.materialize import MaterializeConfig
from pipeline.splits import datasets_sizes, original_split, shares_of_all
from pipeline.train import TrainConfig, resolve_label
from pipeline.zoo import ZooConfig

COMMANDS = sorted(main.commands)


def _defaults(name: str) -> dict:
    """The parameters of ``pipeline NAME`` given nothing (required options filled in)."""
    args = ["--out", "x"] if name in ("synth", "zoo") else []
    return main.commands[name].make_context(name, args).params


# --- help, -h, --version ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name):
    options = [p for p in main.commands[name].params if isinstance(p, click.Option)]
    assert options
    missing = [p.opts[0] for p in options if not (p.help or "").strip()]
    assert not missing, f"pipeline {name}: options without help: {missing}"


def test_the_group_options_have_help():
    assert all((p.help or "").strip() for p in main.params if isinstance(p, click.Option))


@pytest.mark.parametrize("name", COMMANDS)
def test_h_is_help_on_every_command(name):
    short, long = run_cli(name, "-h"), run_cli(name, "--help")
    assert short.exit_code == 0 and short.output == long.output and "Usage:" in short.output


def test_version():
    for args in (("--version",), ("-h",)):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    assert run_cli("--version").output.strip() == f"pipeline {__version__}"


def test_old_spellings_are_not_listed():
    for name, hidden in (("materialize", ("--layers", "--val-test-size")), ("features", ("--output",)), ("train", ("--output",))):
        shown = run_cli(name, "--help").output
        assert all(f"{flag} " not in shown for flag in hidden), shown


# --- the defaults live in the configs -------------------------------------------------------------------


def test_train_defaults_are_the_configs():
    params = {k: v for k, v in _defaults("train").items() if k != "store"}
    assert TrainConfig(**params) == TrainConfig()
    assert {f.name for f in dataclasses.fields(Hyper)} <= set(params)  # every hyper-parameter is an option


def test_features_defaults_are_the_configs():
    params = {k: v for k, v in _defaults("features").items() if k not in ("store", "list_reps")}
    assert FeaturesConfig(**params) == FeaturesConfig()


def test_materialize_defaults_are_the_configs():
    params = _defaults("materialize")
    config = MaterializeConfig()
    for name in ("source", "labels_csv", "layers", "split_seed", "chunk_mb", "codec"):
        assert params[name] == getattr(config, name), name
    assert params["memory"] == "1GiB" and config.memory == 2**30
    assert datasets_sizes(params["val_size"], params["test_size"]) == (config.test_size, config.val_test_size)


def test_zoo_and_synth_defaults_are_the_stages():
    zoo = _defaults("zoo")
    assert ZooConfig(n=zoo["n"], rank=zoo["rank"], steps=zoo["steps"], lr=zoo["lr"], seed=zoo["seed"]) == ZooConfig()
    synth = _defaults("synth")
    assert (synth["n"], synth["rank"], synth["modules"], synth["seed"]) == (1000, 1, "q,v", 0)


# --- the split in shares of all rows ---------------------------------------------------------------------


def test_shares_and_the_datasets_sizes_are_inverse():
    assert shares_of_all(0.3, 0.67) == (0.099, 0.201)
    assert datasets_sizes(0.099, 0.201) == (0.3, 0.67)
    assert datasets_sizes(0.1, 0.1) == (0.2, 0.5)
    for held, share in ((0.4, 0.5), (0.25, 0.8), (0.5, 0.2)):
        assert datasets_sizes(*shares_of_all(held, share)) == (held, share)


@pytest.mark.parametrize("val, test, fragment", [
    (0.0, 0.2, "--val-size 0.0 is not a share"), (0.1, 1.5, "--test-size 1.5 is not a share"),
    (0.5, 0.5, "no row in train"), (float("nan"), 0.2, "--val-size nan"),
])
def test_bad_shares_are_one_line(val, test, fragment):
    with pytest.raises(PipelineError, match=fragment):
        datasets_sizes(val, test)


def test_val_and_test_size_split_as_the_old_pair(synth_dir, tmp_path):
    """--val-size/--test-size give the rows the old --test-size/--val-test-size pair gave; mixing them is refused."""
    new, old = tmp_path / "new.zarr", tmp_path / "old.zarr"
    for path, split in ((new, ("--val-size", "0.1", "--test-size", "0.3")), (old, ("--test-size", "0.4", "--val-test-size", "0.75"))):
        result = run_cli("materialize", "--source", synth_dir, "--store", path, "--modules", SMALL_LAYERS, *split, "--quiet")
        assert result.exit_code == 0, result.output
    layouts = [zarr.open_group(str(p), mode="r").attrs["layout"] for p in (new, old)]
    assert layouts[0] == layouts[1] and (layouts[0]["test_size"], layouts[0]["val_test_size"]) == (0.4, 0.75)
    made = original_split(40, 0.4, 0.75, 42)
    n = {k: v["n"] for k, v in zarr.open_group(str(new), mode="r").attrs["splits"].items()}
    assert n == {k: len(v) for k, v in made.items()}
    assert_one_line_error(run_cli("materialize", "--source", synth_dir, "--store", tmp_path / "x.zarr", "--val-size", "0.1",
                                  "--val-test-size", "0.5"), "--val-size does not mix with --val-test-size")


def test_test_size_alone_is_refused_as_ambiguous(synth_dir, tmp_path):
    """--test-size once meant the held-out share (val + test): given without --val-size (or the old --val-test-size)
    an old script's split would silently change meaning, on a new store or a recorded one. Refused, nothing written."""
    path = tmp_path / "s.zarr"
    assert_one_line_error(run_cli("materialize", "--source", synth_dir, "--store", path, "--test-size", "0.3"),
                          "--test-size 0.3 alone is ambiguous", "--val-size 0.099 --test-size 0.201")
    assert not path.exists()
    materialize_to(path, synth_dir, layers=SMALL_LAYERS, test_size=0.4, val_test_size=0.75)  # val 0.1, test 0.3
    before = file_snapshot(path)
    assert_one_line_error(run_cli("materialize", "--store", path, "--test-size", "0.3"), "alone is ambiguous")
    assert file_snapshot(path) == before
    result = run_cli("materialize", "--store", path, "--val-size", "0.1", "--test-size", "0.3", "--quiet")  # the same: resumed
    assert result.exit_code == 0, result.output


def test_recorded_splits_print_as_shares_when_exact():
    assert materialize_args({"source": "s", "test_size": 0.3, "val_test_size": 0.67}) == \
        ["--source", "s", "--val-size", 0.099, "--test-size", 0.201]
    odd = materialize_args({"source": "s", "test_size": 1 / 3, "val_test_size": 0.5})  # no share gives 1/3 back exactly
    assert odd[2:] == ["--test-size", 1 / 3, "--val-test-size", 0.5]


# --- old spellings --------------------------------------------------------------------------------------


def test_materialize_layers_is_the_old_modules(synth_dir, tmp_path):
    stores = [tmp_path / "new.zarr", tmp_path / "old.zarr"]
    for path, flag in zip(stores, ("--modules", "--layers")):
        result = run_cli("materialize", "--source", synth_dir, "--store", path, flag, SMALL_LAYERS, "--quiet")
        assert result.exit_code == 0, result.output
    attrs = [zarr.open_group(str(p), mode="r").attrs for p in stores]
    assert attrs[0]["modules"] == attrs[1]["modules"] and len(attrs[0]["modules"]) == 4
    assert attrs[0]["materialize_config"]["layers"] == attrs[1]["materialize_config"]["layers"] == SMALL_LAYERS
    both = run_cli("materialize", "--source", synth_dir, "--store", tmp_path / "x.zarr", "--modules", "a", "--layers", "b")
    assert_one_line_error(both, "--layers is the old spelling of --modules")


def test_output_is_the_old_personal_store():
    params = main.commands["train"].make_context("train", ["--output", "mine.zarr"]).params
    assert params["output"] == "mine.zarr" and "old_output" not in params
    params = main.commands["features"].make_context("features", ["--personal-store", "mine.zarr"]).params
    assert params["output"] == "mine.zarr"


# --- train's label, and the retrain command -------------------------------------------------------------


def _root(labels: dict) -> SimpleNamespace:
    return SimpleNamespace(attrs={"labels": labels})


def test_the_default_label():
    original = {"category_label": {"kind": "categorical"}, "style": {"kind": "categorical"}}
    assert resolve_label(_root(original), "S", None) == "category_label"  # the original's, as before
    assert resolve_label(_root(original), "S", "style") == "style"
    assert resolve_label(_root({"style": {"kind": "categorical"}, "score": {"kind": "float"}}), "S", None) == "style"
    with pytest.raises(PipelineError, match=r"no category_label and several classification labels; choose one with --label "
                                            r"\(it has a \(integer\), b \(bool\)\)"):
        resolve_label(_root({"a": {"kind": "integer"}, "b": {"kind": "bool"}}), "S", None)
    with pytest.raises(PipelineError, match=r"no classification label.*score \(float\)"):
        resolve_label(_root({"score": {"kind": "float"}}), "S", None)


def test_train_without_label_on_a_store_without_category_label(tmp_path):
    n = 24
    rng = np.random.default_rng(0)
    source = save_matrix_dataset(tmp_path / "src", lora_rows(n, seed=3),
                                 extra={"style": [["a", "b"][i % 2] for i in range(n)], "score": rng.random(n).tolist()},
                                 extra_features={"style": datasets.Value("string"), "score": datasets.Value("float64")})
    path = tmp_path / "s.zarr"
    materialize_to(path, source)
    assert run_cli("features", "--store", path, "--rep", "dw_norms", "--quiet").exit_code == 0
    fast = ("--rep", "dw_norms", "--runs", "1", "--epochs", "2", "--hidden", "8", "--depth", "1")
    result = run_cli("train", "--store", path, *fast)
    assert result.exit_code == 0, result.output
    again = run_cli("train", "--store", path, "--label", "style", *fast)  # the same configuration: nothing to train
    assert again.exit_code == 0 and "up to date" in again.output, again.output


def _parsed_train(line: str) -> TrainConfig:
    args = shlex.split(line)
    assert args[:2] == ["pipeline", "train"]
    params = main.commands["train"].make_context("train", args[2:]).params
    return TrainConfig(**params)


@pytest.mark.parametrize("model, changes", [("mlp", {}), ("mlp", {"hidden": 32, "lr": 0.01, "plateau_factor": 0.25}),
                                           ("linear", {}), ("knn-vote", {})])
def test_train_command_gives_back_the_recorded_configuration(model, changes):
    config = TrainConfig(store="S", reps="dw_norms", layers="visual", label="style", seed=3, model=model, **changes)
    recorded = {"reps": [{"name": "dw_norms"}], "layer_set": "visual", "label": "style", "model": model, "seed": 3,
                **dataclasses.asdict(config.hyper())}
    line = train_command("S", recorded, 4)
    again = _parsed_train(line)
    assert again.hyper() == config.hyper() and again.runs == 4 and (again.label, again.seed, again.model) == ("style", 3, model)
    for name in models.get(model).fixed:
        assert f"--{name.replace('_', '-')}" not in line
    assert all(f"--{k.replace('_', '-')}" in line for k in changes)


# --- a dataset where a store is expected ----------------------------------------------------------------


def test_info_on_a_dataset_folder_says_it_is_one(synth_dir):
    line = assert_one_line_error(run_cli("info", "--store", synth_dir), "holds a dataset (a save_to_disk folder), not a pipeline store",
                                 "pipeline materialize --store")
    assert f"--source {synth_dir}" in line


def test_info_on_a_safetensors_folder_says_it_is_one(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "adapters").mkdir()
    save_file({"x": np.zeros((1, 2), np.float32)}, str(tmp_path / "adapters" / "m0.safetensors"))
    assert_one_line_error(run_cli("info", "--store", tmp_path / "adapters"), "a folder of .safetensors adapters",
                          f"--source {tmp_path / 'adapters'}")
