"""Precompute-then-train pipeline for weight-space learning on LoRA adapters.

The public surface (docs/api.md): each stage with its config, the report, and the read-only readers of
a store. Names are imported on first use, so ``import pipeline`` stays cheap: torch, datasets, xarray and
dask load only with the first name that needs them.
"""

import importlib
import sys
import types

from ._version import __version__
from .errors import PipelineError

_EXPORTS = {  # public name -> the submodule that defines it
    "MaterializeConfig": "materialize", "materialize": "materialize",
    "FeaturesConfig": "features", "compute_features": "features",
    "TrainConfig": "train", "train": "train",
    "write_report": "report",
    "open_features": "views", "open_raw": "views",
    "load_runs": "results", "load_predictions": "results",
    "FORMAT": "store", "SCHEMA_VERSION": "store", "default_store": "store",
    "Source": "sources", "open_source": "sources", "original_split": "splits", "write_synthetic": "synthetic",
}
__all__ = ["PipelineError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import a public name on first use (PEP 562) and keep it, so later lookups are plain attribute reads."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """This package's module type: ``pipeline.train`` and ``pipeline.materialize`` stay the stage functions.

    Importing a submodule (``from pipeline.train import TrainConfig``) makes the import system set the
    package's attribute of that name to the submodule, over the function of the same name exported above.
    The submodule stays importable as ever (it is in sys.modules); only that overwrite is refused.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
