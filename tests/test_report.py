"""The report: its numbers are pipeline/stats.py's on the stored predictions, every configuration stays apart
(a teammate's sweep included) in every output, --where filters, and the tables and figures are a paper's."""

from __future__ import annotations

import csv
import json
import re
import shutil
import struct

import numpy as np
import pytest
import zarr

from conftest import assert_one_line_error, run_cli
from pipeline import figures, report, stats, tables
from pipeline.report import collect, default_out, write_report
from pipeline.train import TrainConfig, train

GRID = dict(reps="simple_stats,dw_norms", layers="all,visual", runs=3, hidden=16, epochs=6, patience=3, quiet=True)
SWEEP = dict(reps="dw_norms", layers="all", runs=2, hidden=32, lr=1e-2, epochs=6, patience=3, quiet=True)
SWEPT = "dw_norms · hidden=32, lr=1e-2, epochs=6, patience=3"  # the teammate's row: what differs from the defaults


@pytest.fixture(scope="module")
def trained(signal_store, tmp_path_factory):
    """A copy of the signal store with a small grid trained: 2 reps x 2 layer sets, 3 runs each."""
    path = tmp_path_factory.mktemp("report") / "trained.zarr"
    shutil.copytree(signal_store, path, ignore=lambda folder, names: ["runs"] if folder == str(signal_store) else [])
    train(TrainConfig(store=str(path), **GRID))
    return path


@pytest.fixture(scope="module")
def swept(trained, tmp_path_factory):
    """``trained`` plus a teammate's sweep: a second configuration of dw_norms [all] with another lr and width."""
    path = tmp_path_factory.mktemp("report") / "swept.zarr"
    shutil.copytree(trained, path)
    train(TrainConfig(store=str(path), **SWEEP))
    return path


@pytest.fixture(scope="module")
def swept_report(swept, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    return write_report(str(swept), out)


def _csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _sweep(store_path) -> str:
    """The teammate's configuration: the one trained with lr 1e-2."""
    root = zarr.open_group(str(store_path), mode="r")
    [digest] = [d for d in root["runs"].group_keys() if root[f"runs/{d}"].attrs["config"]["lr"] == 1e-2]
    return digest


def _hashes(store_path, **where) -> list[str]:
    root = zarr.open_group(str(store_path), mode="r")
    return [d for d in sorted(root["runs"].group_keys())
            if all(root[f"runs/{d}"].attrs[k] == v for k, v in where.items())]


# --- the numbers ----------------------------------------------------------------------------------------------


def test_numbers_are_the_stats_of_the_stored_predictions(trained, tmp_path):
    summary = write_report(str(trained), tmp_path / "out")
    rows = _csv(tmp_path / "out" / "results.csv")
    assert len(rows) == 4
    root = zarr.open_group(str(trained), mode="r")
    labels = root["labels/test/category_label"][:]
    for r in rows:
        group = root[f"runs/{r['config_hash']}"]
        runs = [group[f"run-{i:03d}"] for i in range(3)]
        truth = labels[runs[0]["test_index"][:]]
        np.testing.assert_array_equal(truth, runs[0]["test_true"][:])
        pred = np.stack([g["test_pred"][:] for g in runs])
        acc, f1 = stats.accuracy(truth, pred), stats.macro_f1(truth, pred, len(group.attrs["classes"]))
        assert float(r["test_mean"]) == pytest.approx(np.mean([g.attrs["metrics"]["test"]["accuracy"] for g in runs]))
        assert (float(r["test_low"]), float(r["test_high"])) == pytest.approx((acc.low, acc.high))
        assert (float(r["test_f1_mean"]), float(r["test_f1_low"])) == pytest.approx((f1.estimate, f1.low))
        assert 0 <= float(r["test_low"]) <= float(r["test_mean"]) <= float(r["test_high"]) <= 1
        assert int(r["runs"]) == 3 and r["warning"] == "" and r["seeds"] == "42;43;44"
        assert float(r["train_seconds"]) == pytest.approx(sum(g.attrs["seconds"] for g in runs))
        assert r["author"] == runs[0].attrs["by"] and "@" in r["author"] and r["trained_at"] == max(g.attrs["at"] for g in runs)
        assert float(r["chance"]) == pytest.approx(0.1)
    assert "Warning" not in (tmp_path / "out" / "results.md").read_text() and summary.warnings == []


def test_best_comparison_retention_and_baseline(trained, tmp_path):
    summary = write_report(str(trained), tmp_path / "out")
    rows = {r["config_hash"]: r for r in _csv(tmp_path / "out" / "results.csv")}
    root = zarr.open_group(str(trained), mode="r")
    truth = root["labels/test/category_label"][:]

    def predictions(digest):
        group = root[f"runs/{digest}"]
        return np.stack([group[f"run-{i:03d}/test_pred"][:] for i in range(3)])

    best, comparisons = stats.compare_to_best(truth, {d: predictions(d) for d in rows}, {d: [42, 43, 44] for d in rows})
    assert {r["best_config"] for r in rows.values()} == {best} and rows[best]["vs_best_diff"] == ""
    for digest, c in comparisons.items():
        assert float(rows[digest]["vs_best_diff"]) == pytest.approx(c.difference)
        assert float(rows[digest]["vs_best_p_holm"]) == pytest.approx(c.p_adjusted)
    for digest in _hashes(trained, layer_set="visual"):
        whole = rows[digest]["retention_of"]
        assert rows[whole]["layer_set"] == "all" and rows[whole]["reps"] == rows[digest]["reps"]
        expected = stats.retention(truth, predictions(digest), predictions(whole), [42, 43, 44], [42, 43, 44])
        assert float(rows[digest]["retention"]) == pytest.approx(expected.estimate)
    train_labels = root["labels/train/category_label"][:]
    baseline = stats.majority_baseline(train_labels, truth, 10)
    assert float(next(iter(rows.values()))["majority_accuracy"]) == pytest.approx(baseline["accuracy"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"Majority class ({root.attrs['labels']['category_label']['classes'][baseline['majority_class']]})" in md
    assert "visual/all" in md and "against the best" in md and "per-class accuracy" in md
    per_class = _csv(tmp_path / "out" / "per_class.csv")
    assert len(per_class) == 4 * len(np.unique(truth))
    assert all(0 <= float(p["low"]) <= float(p["accuracy"]) <= float(p["high"]) <= 1 for p in per_class)


def test_report_cli_prints_the_tables_and_defaults_beside_the_store(trained):
    result = run_cli("report", "--store", trained)
    assert result.exit_code == 0, result.output
    assert "| dw_norms · hidden=16, epochs=6, patience=3 | 3 |" in result.output
    assert default_out(str(trained)) == trained.with_name("trained.report")
    assert (trained.with_name("trained.report") / "results.md").is_file()


def test_report_ignores_unfinished_runs_and_warns_under_three(trained, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(trained, copy)
    root = zarr.open_group(str(copy), mode="r+")
    digest = sorted(root["runs"].group_keys())[0]
    root[f"runs/{digest}/run-002"].attrs["complete"] = False
    summary = write_report(str(copy), tmp_path / "out")
    rows = {r["config_hash"]: r for r in summary.rows}
    assert rows[digest]["runs"] == 2 and "fewer than 3 runs" in rows[digest]["warning"]
    assert summary.warnings == ["1 of 4 configurations have fewer than 3 runs (2): their intervals are approximate; "
                                "train more with --runs 3 or more"]
    assert "**Warning:** 1 of 4" in (tmp_path / "out" / "results.md").read_text()
    result = run_cli("report", "--store", copy, "--out", tmp_path / "cli")
    assert "warning: 1 of 4 configurations have fewer than 3 runs" in result.output


def test_report_without_runs_is_one_line(tmp_path):
    store = tmp_path / "empty.zarr"
    root = zarr.open_group(str(store), mode="w")
    root.attrs.put({"format": "weightspace-pipeline-store", "schema_version": 1})
    assert_one_line_error(run_cli("report", "--store", store), "no finished runs", "pipeline train")


def test_default_seed_is_the_trainers():
    assert report.DEFAULT_SEED == TrainConfig.seed


def test_compact_numbers():
    assert [report.compact(v) for v in (1e-2, 1e-3, 5e-4, 0.5, 128, 0.25, 3e-5, 2.5e-3)] == \
        ["1e-2", "1e-3", "5e-4", "0.5", "128", "0.25", "3e-5", "2.5e-3"]


# --- configurations kept apart: a teammate's sweep ------------------------------------------------------------


def test_a_teammates_sweep_is_its_own_row_everywhere(swept, swept_report):
    theirs = _sweep(swept)
    ours = [d for d in _hashes(swept, layer_set="all", reps=["dw_norms"]) if d != theirs]
    assert len(ours) == 1
    out = swept_report.out
    rows = {r["config_hash"]: r for r in _csv(out / "results.csv")}
    assert len(rows) == 5 and rows[theirs]["variant"] == SWEPT and rows[theirs]["lr"] == "0.01"
    assert rows[ours[0]]["variant"] == "dw_norms · hidden=16, epochs=6, patience=3"
    assert rows[theirs]["test_mean"] != rows[ours[0]]["test_mean"] or rows[theirs]["runs"] != rows[ours[0]]["runs"]
    md = (out / "results.md").read_text()
    assert f"| {SWEPT} | 2 |" in md and "| dw_norms · hidden=16, epochs=6, patience=3 | 3 |" in md
    wide = _csv(out / "table_category_label_accuracy.csv")
    assert {SWEPT, "dw_norms · hidden=16, epochs=6, patience=3"} <= {r["configuration"] for r in wide}
    [results] = report.analyse(zarr.open_group(str(swept), mode="r"), collect(str(swept)))
    bars = figures.bar_data(results)
    assert len(bars) == 5 and {(b["variant"], b["layer_set"]) for b in bars} >= {(SWEPT, "all")}
    assert sum(b["config_hash"] == theirs for b in bars) == 1 == sum(b["config_hash"] == ours[0] for b in bars)
    ticks = [t.get_text() for t in figures.score_figure(results).axes[0].get_yticklabels()]
    assert SWEPT in ticks and "dw_norms · hidden=16, epochs=6, patience=3" in ticks
    info = json.loads(run_cli("info", "--store", swept, "--json").output)
    entries = {t["config_hash"]: t for t in info["training"]}
    assert entries[theirs]["variant"] == SWEPT and entries[theirs]["hyper"]["lr"] == 1e-2
    assert entries[theirs]["differs"] == {"hidden": 32, "lr": 1e-2, "epochs": 6, "patience": 3}
    assert entries[ours[0]]["hyper"]["lr"] == 1e-3 and "@" in entries[theirs]["author"]
    text = run_cli("info", "--store", swept).output
    assert sum(line.startswith(f"trained  {SWEPT} [all]") for line in text.splitlines()) == 1
    assert sum(line.startswith("trained  dw_norms · hidden=16, epochs=6, patience=3 [all]") for line in text.splitlines()) == 1


def test_labels_never_collide(swept):
    configs = collect(str(swept))
    assert len({(c.variant, c.attrs["layer_set"]) for c in configs}) == len(configs)
    # two configurations that differ only in something the label does not show (here: the trainer's version)
    a = configs[0]
    twin = report.Config("f" * 16, {**a.attrs, "config": {**a.attrs["config"], "train_version": 99}}, a.runs, a.group)
    again = [report.Config(c.digest, c.attrs, c.runs, c.group) for c in configs] + [twin]
    report.label_variants(again)
    labels = [(c.variant, c.attrs["layer_set"]) for c in again]
    assert len(set(labels)) == len(labels) and "#" in again[-1].variant


def test_an_old_run_without_an_author_shows_an_empty_one(trained, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(trained, copy)
    root = zarr.open_group(str(copy), mode="r+")
    digest = sorted(root["runs"].group_keys())[0]
    for i in range(3):
        run = root[f"runs/{digest}/run-{i:03d}"]
        run.attrs.put({k: v for k, v in run.attrs.asdict().items() if k not in ("by", "at")})
    rows = {r["config_hash"]: r for r in write_report(str(copy), tmp_path / "out").rows}
    assert rows[digest]["author"] == "" and rows[digest]["trained_at"] == ""
    info = json.loads(run_cli("info", "--store", copy, "--json").output)
    assert {t["config_hash"]: t["author"] for t in info["training"]}[digest] == ""


# --- --where ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where, count", [("lr=1e-2", 1), ("lr=0.001,model=mlp", 4), ("rep=dw_norms", 3),
                                          ("rep=dw_norms|simple_stats,layer_set=visual", 2), ("label=category_label", 5),
                                          ("layers=all,hidden=32", 1), ("weight-decay=1e-4", 5)])
def test_where_filters(swept, tmp_path, where, count):
    summary = write_report(str(swept), tmp_path / "out", where=where)
    assert len(summary.rows) == count
    assert len(_csv(tmp_path / "out" / "results.csv")) == count


def test_where_by_author_and_config(swept, tmp_path):
    root = zarr.open_group(str(swept), mode="r")
    digest = sorted(root["runs"].group_keys())[0]
    user = root[f"runs/{digest}/run-000"].attrs["by"].split("@")[0]
    assert len(write_report(str(swept), tmp_path / "a", where=f"author={user}").rows) == 5
    assert [r["config_hash"] for r in write_report(str(swept), tmp_path / "b", where=f"config={digest[:6]}").rows] == [digest]
    assert_one_line_error(run_cli("report", "--store", swept, "--where", "author=nobody"), "no configuration", "matches")


def test_where_mistakes_are_one_line(swept):
    line = assert_one_line_error(run_cli("report", "--store", swept, "--where", "colour=red"), "unknown field 'colour'")
    for name in ("rep", "layer_set", "label", "model", "author", "lr", "hidden"):
        assert name in line
    assert_one_line_error(run_cli("report", "--store", swept, "--where", "lr"), "field=value")
    assert_one_line_error(run_cli("report", "--store", swept, "--where", "lr=fast"), "lr is a number")


def test_confusion_of_the_configuration_where_chooses(swept, tmp_path):
    theirs = _sweep(swept)
    configs = report.select(collect(str(swept)), f"config={theirs}", str(swept))
    [results] = report.analyse(zarr.open_group(str(swept), mode="r"), configs)
    [scored] = results.scored
    counts = figures.confusion_counts(scored)
    assert counts.sum() == scored.predictions.size and np.trace(counts) == (scored.predictions == scored.truth).sum()
    fig = figures.confusion_figure(scored, "counts")
    cells = [int(t.get_text()) for t in fig.axes[0].texts]
    assert sum(cells) == counts.sum() and len(cells) == counts.size
    assert SWEPT in fig.axes[0].get_title()
    rates = [float(t.get_text()) for t in figures.confusion_figure(scored, "rates").axes[0].texts]
    assert all(0 <= r <= 1 for r in rates)
    result = run_cli("report", "--store", swept, "--where", f"config={theirs}", "--confusion", "rates", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "confusion_category_label.pdf").read_bytes()[:4] == b"%PDF"


# --- a paper's tables and figures -----------------------------------------------------------------------------


GOLDEN = tables.Table("demo_acc", "category_label: test accuracy & more", ["configuration", "runs", "all acc [95% CI]"],
                      [["dw_norms · lr=1e-2", "2", "0.650 [0.550, 0.740]†"], ["simple_stats", "3", "50% of $x_1$"]],
                      "lrr", ["† fewer than 3 runs."])


def test_latex_matches_the_golden_file():
    golden = (__import__("pathlib").Path(__file__).parent / "golden" / "table.tex").read_text()
    assert tables.latex(GOLDEN) == golden


def check_booktabs(tex: str) -> int:
    """A small parser of what the report writes: one tabular with booktabs rules in order, every row the
    column count of its spec, no bare special character. Returns the body's row count."""
    lines = tex.splitlines()
    [spec] = [re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", line).group(1) for line in lines if line.startswith(r"\begin{tabular}")]
    top, mid, bottom = (lines.index(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert top < mid < bottom and lines[bottom + 1] == r"\end{tabular}"
    rows = lines[top + 1:mid] + lines[mid + 1:bottom]
    for line in rows:
        assert line.endswith(r" \\"), line
        body = line[:-3]
        assert len(re.split(r"(?<!\\)&", body)) == len(spec), line
        assert not re.search(r"(?<!\\)[_%#]", body), line
        assert body.count("{") == body.count("}") and body.count("$") % 2 == 0, line
    return bottom - mid - 1


def test_every_latex_table_is_valid_booktabs(swept_report):
    texs = sorted(swept_report.out.glob("table_*.tex"))
    assert {t.stem for t in texs} >= {"table_category_label_accuracy", "table_category_label_f1",
                                      "table_category_label_vs_best", "table_category_label_per_class"}
    for tex in texs:
        rows = check_booktabs(tex.read_text())
        assert rows == len(_csv(tex.with_suffix(".csv"))), tex.name
    assert check_booktabs(tables.latex(GOLDEN)) == 2


def test_tables_are_sorted_by_score_with_layer_sets_as_columns(swept_report):
    wide = _csv(swept_report.out / "table_category_label_accuracy.csv")
    assert list(wide[0]) == ["configuration", "runs", "all acc [95% CI]", "visual acc [95% CI]", "visual/all"]
    scores = [float(r["all acc [95% CI]"].split()[0]) for r in wide]
    assert scores == sorted(scores, reverse=True)
    assert wide[[r["configuration"] for r in wide].index(SWEPT)]["visual acc [95% CI]"] == ""


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_figures_are_png_and_pdf_sized_for_a_paper(swept_report, swept, tmp_path):
    out = swept_report.out
    for stem in ("test_category_label", "curves_category_label", "confusion_category_label"):
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
        width, _ = _png_size(out / f"{stem}.png")
        assert width in (round(figures.COLUMN * figures.DPI), round(figures.PAGE * figures.DPI)), stem
    assert _png_size(out / "test_category_label.png")[0] == round(figures.PAGE * figures.DPI)  # long labels: a page
    column = write_report(str(swept), tmp_path / "column", width="column", where="layer_set=visual").out
    assert _png_size(column / "test_category_label.png")[0] == round(figures.COLUMN * figures.DPI)

    [results] = report.analyse(zarr.open_group(str(swept), mode="r"), collect(str(swept)))
    fig = figures.score_figure(results)
    sizes = [t.get_fontsize() for t in fig.axes[0].get_yticklabels() + fig.axes[0].get_xticklabels()]
    assert min(sizes) >= 6  # readable at print size
    assert "![test_category_label](test_category_label.png)" in (out / "results.md").read_text()


def test_regression_keeps_r2_mae_and_mape(signal_store, tmp_path):
    path = tmp_path / "reg.zarr"
    shutil.copytree(signal_store, path, ignore=lambda folder, names: ["runs"] if folder == str(signal_store) else [])
    root = zarr.open_group(str(path), mode="r+")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        values = 10.0 * root[f"labels/{split}/category_label"][:] + rng.standard_normal(root.attrs["splits"][split]["n"])
        root.create_array(f"labels/{split}/score", data=values, dimension_names=("model",))
    root.attrs["labels"] = {**root.attrs["labels"], "score": {"kind": "float", "column": "score"}}
    train(TrainConfig(store=str(path), reps="dw_norms", label="score", hidden=16, epochs=5, patience=3, runs=2, quiet=True))
    summary = write_report(str(path), tmp_path / "out")
    [r] = summary.rows
    runs = [zarr.open_group(str(path), mode="r")[f"runs/{r['config_hash']}/run-{i:03d}"] for i in range(2)]
    assert r["test_r2_mean"] == pytest.approx(np.mean([g.attrs["metrics"]["test"]["r2"] for g in runs]))
    assert r["test_mae_mean"] == pytest.approx(np.mean([g.attrs["metrics"]["test"]["mae"] for g in runs]))
    assert 0 <= r["test_mae_low"] <= r["test_mae_mean"] <= r["test_mae_high"]
    assert r["test_mape_mean"] == pytest.approx(np.mean([g.attrs["metrics"]["test"]["mape"] for g in runs]), rel=1e-5)
    assert 0 <= r["test_mape_low"] <= r["test_mape_mean"] <= r["test_mape_high"]
    assert "score: test R²" in summary.table and "MAE [95% CI]" in summary.table and "MAPE [95% CI]" in summary.table
    assert check_booktabs((tmp_path / "out" / "table_score_r2.tex").read_text()) == 1
