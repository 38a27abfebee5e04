"""The models ``pipeline train`` fits, by name: what each reads, which tasks it takes, how it is fitted.

A model fits R runs of one configuration at once (one seed each) and answers with a ``Fitted``: per-run
curves (``model.CURVES``, one value per epoch or iteration), each run's best epoch, and
``predict(x, which)``, the outputs (R, n, K) of classification (the argmax is the prediction) or (R, n, 1)
of regression (in standardised units) for ``which`` = "best" or "last". pipeline/train.py writes the
runs, curves, metrics and predictions of every model the same way, so report, info and the Python readers
see each model as configurations like any other.

What a model reads (``inputs``): "features", the stored features of the configuration's representations,
standardised, as one (n, width) float32 tensor per split; or "raw", the store's raw LoRA factors of the
layer set's modules (pipeline/rawdata.py), for the models that learn from the factors themselves.

This module imports no torch: the CLI, report and info read the registry; ``fit`` is named as
"module:function" and imported when a model is fitted.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from .errors import PipelineError
from .hyper import NONE, Hyper

TASKS = ("classification", "regression")
RAW = "raw"  # what a raw-input model's configurations name as their representation: the LoRA factors themselves


@dataclass
class Fitted:
    """What a model's fit returns for R runs; ``predict(x, which)`` -> (R, n, K or 1) on the device of x."""

    curves: dict  # name -> per run (epochs_trained,) float arrays, every name of model.CURVES
    best_epoch: Any  # (R,) int, 1-based: the epoch whose weights ``predict(x, "best")`` uses
    predict: Callable[[Any, str], Any]
    seconds: float = 0.0
    device: str = "cpu"
    one_model: bool = False  # "best" and "last" are the same model (knn-vote): the test split is predicted once


@dataclass(frozen=True)
class Size:
    """What a model's cost depends on (``Model.cost``): the numbers per adapter it reads (``width``), the (rank, in,
    out) of each raw module it reads (none for stored features), its outputs and the rows per split."""

    width: int
    shapes: tuple
    n_out: int
    n: dict  # split -> rows


def epoch_cost(forward_flops: float, size: Size, epochs: float, runs: int) -> float:
    """FLOPs of training ``runs`` runs for ``epochs`` epochs, a forward pass costing ``forward_flops`` per adapter
    and run: forward and backward (about 3 forward passes) on every training row, one on every validation row."""
    return runs * forward_flops * (3 * size.n["train"] + size.n["val"]) * epochs


@dataclass(frozen=True)
class Model:
    """One model ``pipeline train --model NAME`` fits.

    ``fixed``: the hyper-parameters the model always has, whatever is given (they are not its options and are
    recorded, with these values, in its configuration's hash). ``preset``: its own defaults for options where
    they differ from Hyper's (those of its paper's code): what a configuration gets for an option it does not
    set (``TrainConfig`` leaves an option it was not given at None until its model is known). ``version``: bump
    when a change to the model changes its results (it is part of the configuration hash).
    """

    name: str
    version: int
    inputs: str  # "features" or "raw"
    fit: str  # "module:function": fit(train, val, seeds, hp, task, n_out, on_epoch) -> Fitted; train, val: (x, y)
    cost: str  # "module:function": cost(size: Size, hp: dict, epochs, runs) -> FLOPs of fitting runs (--dry-run)
    summary: str  # one line for --help and the docs
    tasks: tuple[str, ...] = TASKS
    fixed: dict = field(default_factory=dict)
    preset: dict = field(default_factory=dict)

    def hyper(self, hp: Hyper) -> Hyper:
        """The hyper-parameters this model trains with: ``hp`` with the fixed ones set."""
        return replace(hp, **self.fixed)

    def unset(self) -> Hyper:
        """The value of each option that is not given: Hyper's defaults with this model's preset."""
        return replace(Hyper(), **self.preset)

    def defaults(self) -> dict:
        """Its hyper-parameters when none is given (what report and info name differences against)."""
        return {f.name: getattr(self.hyper(self.unset()), f.name) for f in fields(Hyper)}

    def options(self) -> tuple[str, ...]:
        """The Hyper fields that are options of this model (the others are fixed)."""
        return tuple(f.name for f in fields(Hyper) if f.name not in self.fixed)

    def fitter(self) -> Callable:
        return _resolve(self.fit)

    def flops(self, size: Size, hp: dict, epochs: float, runs: int) -> float:
        """FLOPs of fitting ``runs`` runs of at most ``epochs`` epochs (the ``--dry-run`` estimate); 0 for none."""
        return float(_resolve(self.cost)(size, hp, epochs, runs)) if runs else 0.0


def _resolve(where: str) -> Callable:
    module, function = where.split(":")
    return getattr(importlib.import_module(module), function)


REGISTRY: dict[str, Model] = {}


def register(model: Model) -> Model:
    if model.inputs not in ("features", "raw"):
        raise ValueError(f"model {model.name!r}: inputs must be 'features' or 'raw'")
    if set(model.preset) & set(model.fixed) or not set(model.preset) | set(model.fixed) <= {f.name for f in fields(Hyper)}:
        raise ValueError(f"model {model.name!r}: preset and fixed name distinct Hyper fields")
    REGISTRY[model.name] = model
    return model


def get(name: str) -> Model:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineError(f"unknown --model {name!r}; use {', '.join(REGISTRY)}") from None


def names() -> list[str]:
    return list(REGISTRY)


register(Model("mlp", 2, "features", "pipeline.model:fit", "pipeline.model:cost", "the original's MLP (Adam, early stopping, ReduceLROnPlateau)"))
register(Model("linear", 2, "features", "pipeline.linear_probe:fit", "pipeline.linear_probe:cost",
               "a converged L2 logistic regression (ridge for regression), full batch (L-BFGS), C chosen on val from "
               "10^-4..10^4; takes none of the MLP's hyper-parameters", fixed=NONE))
register(Model("knn-vote", 1, "raw", "pipeline.knn_vote:fit", "pipeline.knn_vote:cost",
               "DSiRe's vote of per-module 1-nearest-neighbours on the singular values of A, B and BA (classification "
               "only; --rep raw); takes none of the MLP's hyper-parameters", tasks=("classification",), fixed=NONE))
# The two that learn from the raw factors (docs/train.md, "Models on the raw factors"): their presets are their
# papers' settings (LoL's diffusion scripts; MVProbe's train_*_probex.py); neither has dropout.
register(Model("glnet", 1, "raw", "pipeline.glnet:fit", "pipeline.glnet:cost",
               "LoL's GL-equivariant network on the raw factors (--depth equivariant layers of width --hidden; AdamW)",
               fixed={"dropout": 0.0}, preset={"depth": 1, "hidden": 64, "weight_decay": 0.0, "batch_size": 8}))
register(Model("probe", 1, "raw", "pipeline.probe:fit", "pipeline.probe:cost",
               "MVProbe-style learned probes of dW = sBA, first-order and Gram views, never forming dW (AdamW)",
               fixed={"dropout": 0.0}, preset={"depth": 1, "lr": 3e-4, "weight_decay": 0.0, "batch_size": 128}))
