"""docs/api.md runs: its ```python blocks, in order, in one namespace, against a small trained store."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import SMALL_TRAIN
from pipeline.train import TrainConfig, train

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    """The code of every block fenced as ```python exactly (```python norun is shown, not run)."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


@pytest.fixture
def walkthrough_store(trained_small, tmp_path, monkeypatch) -> Path:
    """trained_small (dw_norms [all]) plus the walk-through's dw_norms [visual] runs, in two configurations."""
    path = tmp_path / "walkthrough.zarr"
    shutil.copytree(trained_small, path)
    for lr in (1e-3, 1e-2):
        train(TrainConfig(store=str(path), **{**SMALL_TRAIN, "layers": "visual", "lr": lr}))
    monkeypatch.setenv("PIPELINE_STORE", str(path))
    return path


def test_the_page_has_its_walkthrough():
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) >= 6
    assert all("norun" not in block.splitlines()[0] for block in blocks)
    assert "```python norun" in PAGE.read_text()  # the stage calls, which write, are shown only


def test_the_walkthrough_runs(walkthrough_store, capsys):
    namespace: dict = {"__name__": "api_md"}
    for number, block in enumerate(python_blocks(PAGE.read_text()), 1):
        try:
            exec(compile(block, f"docs/api.md block {number}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"docs/api.md block {number} failed: {type(exc).__name__}: {exc}\n{block}") from exc
    printed = capsys.readouterr().out
    assert "logistic regression on dw_norms [visual]" in printed and "test adapters" in printed
    assert namespace["table"]["count"].sum() == 4  # two configurations x two runs, kept apart
