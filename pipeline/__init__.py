"""Precompute-then-train pipeline for weight-space learning on LoRA adapters."""

from ._version import __version__
from .errors import PipelineError
from .materialize import MaterializeConfig, materialize
from .sources import Source, open_source
from .splits import original_split
from .store import FORMAT, SCHEMA_VERSION, default_store
from .synthetic import write_synthetic

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "MaterializeConfig", "PipelineError", "Source", "default_store", "materialize",
    "__version__", "open_source", "original_split", "write_synthetic",
]
