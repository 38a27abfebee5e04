"""The trainer's hyper-parameters: the one copy of their names, defaults (the original protocol) and help.

``Hyper`` is what pipeline/model.py trains with. ``TrainConfig`` (pipeline/train.py) inherits its
fields; ``pipeline train`` makes one option of each (``--batch-size`` for ``batch_size``), with its
default and its help from here (the ``help`` metadata, as HuggingFace's ``TrainingArguments`` does);
a configuration's hash records their values (``runs/<digest>`` attrs "config"), and
``commands.train_command`` turns the recorded values back into those options. Kept apart from the
trainer so that reading them imports no torch.

A model may have its own defaults for some of them (``models.Model.preset``: glnet's width is 64, not 512), so
``TrainConfig`` takes each as None when it is not given (``unset_by_default``) and then fills it from its
model's defaults: a value given explicitly, even one equal to Hyper's default, is kept as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _(default, help: str):  # noqa: A002 - the name click and argparse give it
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Hyper:
    """The model and optimisation settings of a configuration."""

    depth: int = _(3, "Hidden layers of the MLP (glnet: equivariant layers; probe: layers after the probes).")
    hidden: int = _(512, "Width of each hidden layer of the MLP (glnet: the equivariant width h; probe: the encoder's).")
    dropout: float = _(0.5, "Dropout probability after each hidden layer of the MLP.")
    lr: float = _(1e-3, "Initial learning rate (of Adam; of AdamW for glnet and probe).")
    weight_decay: float = _(1e-4, "Adam's L2 weight decay (AdamW's decoupled weight decay for glnet and probe).")
    batch_size: int = _(64, "Training batch size (a last batch of one row is skipped: BatchNorm cannot train on it).")
    epochs: int = _(300, "Most epochs per run.")
    patience: int = _(15, "Stop a run after this many epochs without a better val score; its best weights are kept.")
    plateau_patience: int = _(10, "Lower the learning rate after more than this many epochs without a better val "
                                  "score (ReduceLROnPlateau).")
    plateau_factor: float = _(0.5, "What the learning rate is multiplied by when it is lowered.")


NONE = {f.name: type(f.default)(0) for f in fields(Hyper)}  # a model that takes none of them: each recorded as 0


def unset_by_default(cls):
    """Class decorator, applied before ``dataclass``: each Hyper field of ``cls`` (a Hyper subclass) defaults to
    None, "not given", keeping its place and its help; the class resolves the Nones when it is read (TrainConfig's
    ``given``), never in place: a copy made with ``dataclasses.replace`` for another model must get that model's
    preset, not the first one's."""
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for f in fields(Hyper):
        annotations[f.name] = f"{f.type} | None"
        setattr(cls, f.name, field(default=None, metadata=f.metadata))
    cls.__annotations__ = annotations
    return cls
